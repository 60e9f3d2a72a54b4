import CubicleAgentCore
import Dispatch
import NIOCore
import NIOWebSocket

/// One client's WebSocket to a shell, in InvokeAgentRuntimeCommandShell's channel protocol
/// (`ShellProtocol`): keyboard in, terminal out, resizes, heartbeats, and the shell's exit status. Whatever
/// the client sends is untrusted: an unknown channel, a bad resize or a flood ends the connection, never the
/// shell or cubicled.
public enum ShellSocket {
    /// More frames than this from the client within a second closes the connection (AgentCore's limit).
    public static let maxFramesPerSecond = 250

    /// How the connection ended.
    public enum End: Equatable, Sendable {
        /// The shell exited (its status was sent).
        case exited
        /// The client asked for the shell's end (CLOSE channel).
        case ended
        /// The client left or broke the protocol: the shell waits for another.
        case detached
        /// Another client took the shell over (close 4000).
        case kicked
        case timeLimit
    }

    public static func serve(_ client: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, shell: Shell, reconnected: Bool, seconds: Int) async -> End {
        let generation = shell.attach()
        let end: End = (try? await client.executeThenClose { inbound, outbound in
            try await outbound.write(binary(ShellProtocol.confirmation(shellID: shell.id, reconnected: reconnected)))
            return await withTaskGroup(of: End?.self) { group -> End in
                // Terminal to client, from the buffer, so what a dropped client missed is there for the next.
                group.addTask {
                    while true {
                        switch await shell.next(generation) {
                        case .output(let bytes):
                            do { try await outbound.write(binary(ShellProtocol.frame(.stdout, bytes))) } catch { return Task.isCancelled ? nil : .detached }
                            shell.delivered(bytes.count, generation)
                        case .exited(let exit):
                            try? await outbound.write(binary(ShellProtocol.exitStatus(exitCode: exit.exitCode, signal: exit.signal)))
                            try? await outbound.write(WebSocketClose.frame(1000, "the shell exited"))
                            return .exited
                        case .kicked:
                            // Cancelled: the connection is ending for another reason, already told.
                            if Task.isCancelled { return nil }
                            try? await outbound.write(WebSocketClose.frame(4000, "kicked by new connection"))
                            return .kicked
                        }
                    }
                }
                // Client to terminal.
                group.addTask {
                    var rate = RateWindow(limit: maxFramesPerSecond)
                    do {
                        for try await frame in inbound {
                            guard rate.admit(now: DispatchTime.now().uptimeNanoseconds) else {
                                try? await outbound.write(WebSocketClose.frame(1008, "more than \(maxFramesPerSecond) frames in one second"))
                                return .detached
                            }
                            switch frame.opcode {
                            case .connectionClose:
                                try? await outbound.write(WebSocketClose.frame(1000, "detached"))
                                return .detached
                            case .ping:
                                try await outbound.write(WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData))
                                continue
                            case .binary, .text:
                                break
                            default:
                                continue
                            }
                            let bytes = Array(frame.unmaskedData.readableBytesView)
                            switch ShellProtocol.parse(bytes) {
                            case (.stdin, let payload)?:
                                try await shell.write(payload)
                            case (.resize, let payload)?:
                                guard let size = ShellProtocol.size(fromResize: payload) else {
                                    try? await outbound.write(WebSocketClose.frame(1007, "a resize is {\"width\": 1-1000, \"height\": 1-1000}"))
                                    return .detached
                                }
                                shell.resize(rows: size.rows, cols: size.cols)
                            case (.heartbeat, _)?:
                                try await outbound.write(binary(ShellProtocol.frame(.heartbeat, [])))
                            case (.close, _)?:
                                shell.hangUp()
                                return .ended
                            default:
                                try? await outbound.write(WebSocketClose.frame(1003, "not a channel a client sends on (stdin 0, resize 4, heartbeat 5, close 255)"))
                                return .detached
                            }
                        }
                    } catch {}
                    return .detached
                }
                group.addTask {
                    try? await Task.sleep(for: .seconds(seconds))
                    if Task.isCancelled { return nil }
                    try? await outbound.write(WebSocketClose.frame(1008, "connection time limit of \(seconds) seconds reached"))
                    return .timeLimit
                }
                var first = End.detached
                while let next = await group.next() {
                    guard let next else { continue }
                    first = next
                    // A hang-up's exit status still goes out before the connection closes.
                    if next == .ended { continue }
                    break
                }
                group.cancelAll()
                return first
            }
        }) ?? .detached
        switch end {
        case .detached, .timeLimit: shell.detach(generation)
        case .exited, .ended, .kicked: break
        }
        return end
    }

    static func binary(_ bytes: [UInt8]) -> WebSocketFrame { WebSocketFrame(fin: true, opcode: .binary, data: ByteBuffer(bytes: bytes)) }
}
