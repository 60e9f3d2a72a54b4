import CubicleJSON

/// InvokeAgentRuntimeCommandShell's wire format: each WebSocket binary message is one channel byte and a
/// payload (Kubernetes' v5.channel.k8s.io framing, as the bedrock-agentcore SDK's `ShellFramer` encodes it).
/// cubicled's admin shells (`cubicle exec -it`) speak it too, so there is one shell protocol.
public enum ShellChannel: UInt8, Sendable {
    /// Raw bytes, client to shell.
    case stdin = 0x00
    /// Raw bytes, shell to client.
    case stdout = 0x01
    /// UTF-8 notices from cubicled (not the shell's own stderr: a terminal has one stream).
    case stderr = 0x02
    /// A Status JSON, to the client: the connection confirmed (`metadata.shellId`), or the shell's end.
    case status = 0x03
    /// `{"width": COLUMNS, "height": ROWS}`, client to shell.
    case resize = 0x04
    /// Empty, either way; echoed.
    case heartbeat = 0x05
    /// Empty: from the client, end the shell now; from cubicled, the shell ends for a reason of its own.
    case close = 0xFF
}

public enum ShellProtocol {
    /// The 101's header naming the shell (the SDK reads the shellId from it).
    public static let shellIDHeader = "X-Amzn-Bedrock-AgentCore-Shell-Id"

    /// shellId: 1 to 128 characters, none of `?`, `#`, `&` (the SDK's rule), and printable ASCII here.
    public static func validShellID(_ id: String) -> Bool {
        (1...128).contains(id.utf8.count) && id.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "?") && $0 != UInt8(ascii: "#") && $0 != UInt8(ascii: "&") }
    }

    public static func frame(_ channel: ShellChannel, _ payload: some Sequence<UInt8>) -> [UInt8] { [channel.rawValue] + payload }

    /// A frame read from a client: its channel and payload, or nil for an empty frame or an unknown channel.
    public static func parse(_ bytes: [UInt8]) -> (ShellChannel, ArraySlice<UInt8>)? {
        guard let first = bytes.first, let channel = ShellChannel(rawValue: first) else { return nil }
        return (channel, bytes.dropFirst())
    }

    /// A resize's terminal size (rows, columns), each 1...1000; nil if it is not one.
    public static func size(fromResize payload: ArraySlice<UInt8>) -> (rows: Int, cols: Int)? {
        guard payload.count <= 256, case .object(let o)? = try? JSON.parse(String(decoding: payload, as: UTF8.self)),
              let width = o["width"]?.intValue, let height = o["height"]?.intValue,
              (1...1000).contains(width), (1...1000).contains(height) else { return nil }
        return (Int(height), Int(width))
    }

    /// The first frame of a connection: which shell it is, and whether it existed before.
    public static func confirmation(shellID: String, reconnected: Bool) -> [UInt8] {
        frame(.status, JSON.object(["kind": "Status", "apiVersion": "v1", "metadata": .object(["shellId": .string(shellID), "reconnected": .bool(reconnected)]),
                                    "status": "Success"]).text.utf8)
    }

    /// The shell's end: Success for exit code 0; otherwise Failure with the exit code (128 + signal for a
    /// signal, as a shell reports it) and the signal.
    public static func exitStatus(exitCode: Int32?, signal: Int32?) -> [UInt8] {
        let code = exitCode ?? (128 + (signal ?? 9))
        guard code != 0 else {
            return frame(.status, JSON.object(["kind": "Status", "apiVersion": "v1", "metadata": .object([:]), "status": "Success"]).text.utf8)
        }
        var causes: [JSON] = [.object(["reason": "ExitCode", "message": .string(String(code))])]
        if let signal { causes.append(.object(["reason": "Signal", "message": .string(String(signal))])) }
        return frame(.status, JSON.object(["kind": "Status", "apiVersion": "v1", "metadata": .object([:]), "status": "Failure", "reason": "NonZeroExitCode",
                                           "message": .string("command terminated with exit code \(code)"), "details": .object(["causes": .array(causes)])]).text.utf8)
    }

    /// The exit code a Status frame reports (0 for Success), or nil if it is a confirmation or not a status.
    public static func exitCode(fromStatus payload: ArraySlice<UInt8>) -> Int32? {
        guard case .object(let o)? = try? JSON.parse(String(decoding: payload, as: UTF8.self)) else { return nil }
        if case .object(let meta)? = o["metadata"], meta["shellId"] != nil { return nil }
        if o["status"]?.stringValue == "Success" { return 0 }
        guard case .object(let details)? = o["details"], case .array(let causes)? = details["causes"] else { return 1 }
        for case .object(let cause) in causes where cause["reason"]?.stringValue == "ExitCode" {
            return cause["message"]?.stringValue.flatMap { Int32($0) } ?? 1
        }
        return 1
    }
}
