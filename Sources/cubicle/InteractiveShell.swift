#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleAgentLink
import CubicleCLI
import CubicleJSON
import Dispatch
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// `cubicle exec -it`: this terminal, in raw mode, joined to a shell in the session over the admin socket,
/// in the data plane's shell protocol (ShellProtocol). Keys go to the shell as they are typed (Ctrl-C is a
/// byte for the shell's terminal to turn into SIGINT for its foreground job, not a signal to us); window
/// changes follow SIGWINCH; the exit status comes back as ours.
enum InteractiveShell {
    static func run(socketPath: String, session: String, command: [String]) throws -> Int32 {
        guard isatty(0) == 1, isatty(1) == 1 else { throw CLIError("exec -it needs a terminal on stdin and stdout", exitCode: 2) }
        let (rows, cols) = windowSize()
        var query = "rows=\(rows)&cols=\(cols)&term=" + PercentEncoding.encode(getenv("TERM").map { String(cString: $0) } ?? "xterm-256color")
        if !command.isEmpty { query += "&command=" + PercentEncoding.encode(JSON.array(command.map { .string($0) }).text) }
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path(session, "/shell") + "?" + query, headers: ["Host": "localhost"])
        let result = Box<Result<Int32, any Error>>()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { result.value = .success(try await connect(socketPath, head)) } catch { result.value = .failure(error) }
            done.signal()
        }
        done.wait()
        switch result.value! {
        case .success(let code): return code
        case .failure(let error as CLIError): throw error
        case .failure(let error): throw CLIError("exec -it: \(error)")
        }
    }

    private static func connect(_ socketPath: String, _ head: HTTPRequestHead) async throws -> Int32 {
        let upgrade = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(unixDomainSocketPath: socketPath) { channel in
                channel.eventLoop.makeCompletedFuture { try WebSocketClient.upgrade(channel, head: head, automaticErrorHandling: true) }
            }
        switch try await upgrade.get().result() {
        case .refused(let status, let body):
            let message = (try? JSON.parse(String(decoding: body, as: UTF8.self)))?["error"]?.stringValue ?? "status \(status)"
            throw CLIError(message)
        case .open(let frames, _, _):
            let terminal = RawTerminal()
            defer { terminal.restore() }
            return try await serve(frames)
        }
    }

    private static func serve(_ frames: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>) async throws -> Int32 {
        try await frames.executeThenClose { inbound, outbound in
            try await withThrowingTaskGroup(of: Int32?.self) { group in
                // Keys, read on a thread of their own (a blocking read of the terminal).
                let keys = AsyncStream<[UInt8]> { continuation in
                    DispatchQueue(label: "cubicle-keys").async {
                        var buffer = [UInt8](repeating: 0, count: 4096)
                        while true {
                            let n = read(0, &buffer, buffer.count)
                            if n < 0 && errno == EINTR { continue }
                            if n <= 0 { break }
                            continuation.yield(Array(buffer[0..<n]))
                        }
                        continuation.finish()
                    }
                }
                group.addTask {
                    for await bytes in keys {
                        for chunk in stride(from: 0, to: bytes.count, by: 60_000) {
                            try await outbound.write(binary(ShellProtocol.frame(.stdin, bytes[chunk..<min(bytes.count, chunk + 60_000)])))
                        }
                    }
                    return nil
                }
                // Window changes.
                let resizes = AsyncStream<Void> { continuation in
                    signal(SIGWINCH, SIG_IGN)
                    let source = Box<any DispatchSourceSignal>()
                    source.value = DispatchSource.makeSignalSource(signal: SIGWINCH)
                    source.value?.setEventHandler { continuation.yield() }
                    source.value?.resume()
                    continuation.onTermination = { _ in source.value?.cancel() }
                }
                group.addTask {
                    for await _ in resizes {
                        let (rows, cols) = windowSize()
                        try await outbound.write(binary(ShellProtocol.frame(.resize, JSON.object(["width": .int(Int64(cols)), "height": .int(Int64(rows))]).text.utf8)))
                    }
                    return nil
                }
                // The terminal's output, and the exit status.
                group.addTask {
                    var code: Int32 = 255
                    for try await frame in inbound {
                        switch frame.opcode {
                        case .binary:
                            let bytes = Array(frame.unmaskedData.readableBytesView)
                            switch ShellProtocol.parse(bytes) {
                            case (.stdout, let payload)?: FileHandleOut.write(1, Array(payload))
                            case (.stderr, let payload)?: FileHandleOut.write(2, Array(payload))
                            case (.status, let payload)?: if let exit = ShellProtocol.exitCode(fromStatus: payload) { code = exit }
                            case (.heartbeat, _)?: try await outbound.write(binary(ShellProtocol.frame(.heartbeat, [])))
                            default: break
                            }
                        case .connectionClose:
                            return code
                        default:
                            break
                        }
                    }
                    return code
                }
                var code: Int32 = 255
                while let next = try await group.next() {
                    if let next { code = next; break }
                }
                group.cancelAll()
                return code
            }
        }
    }

    static func binary(_ bytes: [UInt8]) -> WebSocketFrame {
        WebSocketFrame(fin: true, opcode: .binary, maskKey: .random(), data: ByteBuffer(bytes: bytes))
    }

    static func windowSize() -> (rows: Int, cols: Int) {
        var size = winsize()
        guard ioctl(1, UInt(TIOCGWINSZ), &size) == 0, size.ws_row > 0, size.ws_col > 0 else { return (24, 80) }
        return (Int(size.ws_row), Int(size.ws_col))
    }
}

/// The terminal in raw mode until `restore` (input byte by byte, no echo, no signals from keys: the
/// shell's terminal does all of that).
final class RawTerminal {
    private var saved = termios()
    private let active: Bool
    init() {
        active = tcgetattr(0, &saved) == 0
        guard active else { return }
        var raw = saved
        cfmakeraw(&raw)
        _ = tcsetattr(0, TCSANOW, &raw)
    }
    func restore() { if active { _ = tcsetattr(0, TCSANOW, &saved) } }
}

final class Box<T>: @unchecked Sendable { var value: T? }
