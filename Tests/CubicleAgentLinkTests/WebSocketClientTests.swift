#if canImport(Glibc)
import Glibc
#endif
@testable import CubicleAgentLink
import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket
import Testing

/// `AgentTransport.openWebSocket` (and the CLI's shell client, which upgrades the same way) against a fake
/// agent on a socketpair.
extension AgentLinkTests {
    /// A server may send its first frame right behind the 101, and both then arrive in one read: the frame
    /// must not go with the HTTP decoder when the upgrade removes it. The agent here writes them with one
    /// write(2), so they always come together. (NIO's client pipeline drops such bytes by default; a shell's
    /// first prompt went missing that way.)
    @Test func aFrameThatCameInTheSameReadAsThe101IsKept() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, connector: agent.connector)
            defer { transport.close() }
            let opening = Task {
                try await transport.openWebSocket(HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ws", headers: ["Host": "localhost"]))
            }
            let fd = try await agent.waitForEnd(0)
            let request = await agent.readRequest(fd)
            let key = try #require(request.split(separator: "\r\n").compactMap { line -> Substring? in
                let parts = line.split(separator: ":", maxSplits: 1)
                guard parts.count == 2, parts[0].lowercased() == "sec-websocket-key" else { return nil }
                return parts[1].drop { $0 == " " }
            }.first)
            let accept = Data(Insecure.SHA1.hash(data: Array((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").utf8))).base64EncodedString()
            let response = Array("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: \(accept)\r\n\r\n".utf8)
            let greeting: [UInt8] = [0x81, 5] + Array("hello".utf8)  // a text frame, unmasked as a server's are
            let bytes = response + greeting
            #expect(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count)

            guard case .open(let frames, _, _) = try await opening.value else {
                Issue.record("the upgrade was refused")
                return
            }
            // Bounded: a lost frame would leave the read waiting forever.
            let first = try await withThrowingTaskGroup(of: WebSocketFrame?.self) { tasks in
                tasks.addTask { try await frames.executeThenClose { inbound, _ in try await inbound.first { _ in true } } }
                tasks.addTask {
                    try await Task.sleep(nanoseconds: 5_000_000_000)
                    frames.channel.close(promise: nil)
                    return nil
                }
                defer { tasks.cancelAll() }
                return try await tasks.next() ?? nil
            }
            let frame = try #require(first, "the frame that came with the 101 never reached the reader")
            #expect(frame.opcode == .text)
            #expect(String(buffer: frame.unmaskedData) == "hello")
        }
    }
}
