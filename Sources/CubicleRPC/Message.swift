/// JSON-RPC 2.0 messages on the control channel. One extension to the standard: a message that carries
/// descriptors says how many in `fds`, and they arrived attached to its frame.
public enum RPCMessage: Equatable, Sendable {
    case request(id: Int64, method: String, params: JSON, fds: Int)
    case notification(method: String, params: JSON, fds: Int)
    case result(id: Int64, value: JSON, fds: Int)
    case error(id: Int64?, RPCError)

    public static let maxFDs = 4

    public var fdCount: Int {
        switch self {
        case .request(_, _, _, let n), .notification(_, _, let n), .result(_, _, let n): n
        case .error: 0
        }
    }

    public func encoded() -> [UInt8] {
        var o: [String: JSON] = ["jsonrpc": "2.0"]
        switch self {
        case .request(let id, let method, let params, let fds):
            o["id"] = .int(id); o["method"] = .string(method); o["params"] = params
            if fds > 0 { o["fds"] = .int(Int64(fds)) }
        case .notification(let method, let params, let fds):
            o["method"] = .string(method); o["params"] = params
            if fds > 0 { o["fds"] = .int(Int64(fds)) }
        case .result(let id, let value, let fds):
            o["id"] = .int(id); o["result"] = value
            if fds > 0 { o["fds"] = .int(Int64(fds)) }
        case .error(let id, let err):
            o["id"] = id.map { .int($0) } ?? .null
            var e: [String: JSON] = ["code": .int(Int64(err.code)), "message": .string(err.message)]
            // Only what is known: an invented errno 0 would read as "success" on the other side.
            var data: [String: JSON] = [:]
            if let step = err.step { data["step"] = .string(step) }
            if let errno = err.errno { data["errno"] = .int(Int64(errno)) }
            if !data.isEmpty { e["data"] = .object(data) }
            o["error"] = .object(e)
        }
        return JSON.object(o).serialized()
    }

    /// Strict decoding: anything that is not exactly one of the four shapes is refused.
    public static func decode(_ payload: [UInt8]) throws(RPCDecodeError) -> RPCMessage {
        let json: JSON
        do { json = try JSON.parse(payload) } catch { throw .json(error) }
        guard let o = json.objectValue else { throw .shape("message is not an object") }
        guard o["jsonrpc"] == "2.0" else { throw .shape("jsonrpc must be \"2.0\"") }
        var fds = 0
        if let f = o["fds"] {
            guard let n = f.intValue, n >= 0, n <= Int64(maxFDs) else { throw .shape("fds out of range") }
            fds = Int(n)
        }
        let id: Int64?
        switch o["id"] {
        case nil, .null?: id = nil
        case .int(let i)?: id = i
        default: throw .shape("id must be an integer")
        }
        if let m = o["method"] {
            guard let method = m.stringValue, !method.isEmpty, method.utf8.count <= 64 else { throw .shape("bad method") }
            let params = o["params"] ?? .object([:])
            guard params.objectValue != nil else { throw .shape("params must be an object") }
            guard o["result"] == nil, o["error"] == nil else { throw .shape("request with result or error") }
            if let id { return .request(id: id, method: method, params: params, fds: fds) }
            return .notification(method: method, params: params, fds: fds)
        }
        if let r = o["result"] {
            guard let id, o["error"] == nil else { throw .shape("result needs an id and no error") }
            return .result(id: id, value: r, fds: fds)
        }
        if let e = o["error"]?.objectValue {
            guard fds == 0 else { throw .shape("error with fds") }
            guard let code = e["code"]?.intValue, let message = e["message"]?.stringValue else { throw .shape("bad error object") }
            let data = e["data"]
            let errno = data?["errno"]?.intValue
            return .error(id: id, RPCError(code: Int(clamping: code), message: String(message.prefix(1024)),
                                            step: data?["step"]?.stringValue.map { String($0.prefix(256)) },
                                            errno: errno.map { Int32(clamping: $0) }))
        }
        throw .shape("neither request, notification, result nor error")
    }
}

public struct RPCError: Error, Equatable, Sendable, CustomStringConvertible {
    public var code: Int
    public var message: String
    public var step: String?
    public var errno: Int32?

    public init(code: Int, message: String, step: String? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.step = step
        self.errno = errno
    }

    public static let invalidRequest = -32600
    public static let methodNotFound = -32601
    public static let invalidParams = -32602
    public static let failed = -32000

    public var description: String {
        var s = "\(message) (code \(code)"
        if let step { s += ", step \(step)" }
        if let errno { s += ", errno \(errno)" }
        return s + ")"
    }
}

public enum RPCDecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    case json(JSONError)
    case shape(String)

    public var description: String {
        switch self {
        case .json(let e): e.description
        case .shape(let s): "malformed RPC message: \(s)"
        }
    }
}

/// Method and notification names; one place, so host and init cannot drift. The shapes that go with them
/// are `InitRequest`, `InitReply` and `InitNotification` (InitProtocol.swift); the first frame is
/// `InitConfig`.
public enum RPCMethod {
    /// host -> init, first frame: the sandbox to build (`InitConfig`). Answered by the `ready` notification.
    public static let configure = "sandbox.configure"
    /// host -> init, second frame when the root is an image: its layers (top first) as idmapped mounts.
    public static let imageLayers = "sandbox.imageLayers"
    public static let startAgent = "agent.start"
    public static let connect = "agent.connect"
    public static let runCommand = "command.run"
    public static let openShell = "shell.open"
    public static let endCommand = "command.end"
    public static let status = "sandbox.status"
    public static let agentLogs = "agent.logs"

    /// init -> host notifications.
    public static let ready = "ready"
    public static let failed = "failed"
    public static let agentExited = "agent.exited"
    public static let commandExited = "command.exited"
}
