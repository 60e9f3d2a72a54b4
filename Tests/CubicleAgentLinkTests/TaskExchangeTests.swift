#if canImport(Glibc)
import Glibc
#endif
@testable import CubicleAgentLink
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

/// `AgentTransport.send`, the task road over the same links, against a fake agent on a socketpair.
extension AgentLinkTests {
    static func post(_ length: Int?) -> HTTPRequestHead {
        var headers: HTTPHeaders = ["Host": "localhost"]
        if let length { headers.add(name: "Content-Length", value: String(length)) }
        return HTTPRequestHead(version: .http1_1, method: .POST, uri: "/invocations", headers: headers)
    }

    static func collect(_ response: AgentResponse) async throws -> String {
        var text = ""
        for try await buffer in response.body { text += String(buffer: buffer) }
        return text
    }

    /// A bodiless POST sent in a task of its own over a transport of its own; `body` gets the task and the
    /// agent's end of the connection, the request already read from it.
    func withBodilessSend(_ body: (FakeAgent, Task<AgentResponse, any Error>, Int32) async throws -> Void) async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, connector: agent.connector)
            defer { transport.close() }
            let response = Task { try await transport.send(AgentRequest(head: Self.post(0), bodyLength: 0)) }
            let fd = try await agent.waitForEnd(0)
            _ = await agent.read(fd, atLeast: 1)
            try await body(agent, response, fd)
        }
    }

    @Test(arguments: [true, false])
    func sendWritesTheRequestReadsTheResponseAndKeepsTheLinkWhileFresh(fresh: Bool) async throws {
        try await withGroup(threads: 2) { group, agent in
            // An idle link is reused while younger than the limit: a minute, or none at all.
            let transport = AgentTransport(group: group, maxIdleNanoseconds: fresh ? 60_000_000_000 : 0, connector: agent.connector)
            defer { transport.close() }
            for round in 0..<3 {
                let response = Task { try await transport.send(AgentRequest(head: Self.post(2), bodyLength: 2) { try await $0.write(ByteBuffer(string: "{}")) }) }
                let fd = try await agent.waitForEnd(fresh ? 0 : round)
                let request = String(decoding: await agent.read(fd, atLeast: 1), as: UTF8.self)
                try #require(request.hasPrefix("POST /invocations HTTP/1.1\r\n"), "round \(round)")
                #expect(request.hasSuffix("\r\n\r\n{}"), "head and body in one write")
                agent.write(fd, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                let answered = try await response.value
                #expect(answered.head.status == .ok)
                #expect(try await Self.collect(answered) == "hello", "round \(round)")
            }
            #expect(agent.count == (fresh ? 1 : 3), fresh ? "one connection carried every exchange" : "a stale link is not reused")
        }
    }

    @Test func aResponseEndsOnlyOnceTheRequestIsWrittenAndItsLinkIsNotReused() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, connector: agent.connector)
            defer { transport.close() }
            // Far more than the socket buffers hold, so the writer must wait for the agent to read.
            let size = 8 << 20
            let written = Atomic<Int>(0)
            async let response = transport.send(AgentRequest(head: Self.post(size), bodyLength: size) { writer in
                let part = ByteBuffer(repeating: UInt8(ascii: "x"), count: 64 << 10)
                for _ in 0..<(size / part.readableBytes) {
                    // Counted as it is handed over: the last part carries the end, and the response may end
                    // as soon as that part is written.
                    written.add(part.readableBytes, ordering: .relaxed)
                    try await writer.write(part)
                }
            })
            let fd = try await agent.waitForEnd(0)
            _ = await agent.read(fd, atLeast: 1)
            // The agent answers before reading the body, as a server refusing it might.
            agent.write(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
            let answered = try await response
            #expect(written.load(ordering: .relaxed) < size, "the writer is held by the full socket")
            async let text = Self.collect(answered)
            let rest = await agent.read(fd, atLeast: size)
            #expect(rest.count >= size - (1 << 20))
            #expect(try await text == "no")
            #expect(written.load(ordering: .relaxed) == size, "the body ended after the request did")
            #expect(await agent.closedByPeer(fd), "a link whose response came before its request ended is closed, not reused")
        }
    }

    @Test func abortingMidResponseClosesTheAgentsConnection() async throws {
        try await withBodilessSend { agent, response, fd in
            agent.write(fd, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
            let answered = try await response.value
            var parts = answered.body.makeAsyncIterator()
            #expect(try await parts.next().map { String(buffer: $0) } == "first")
            answered.abort()
            #expect(await agent.closedByPeer(fd), "the agent learns the request was cancelled")
            await #expect(throws: (any Error).self) { while try await parts.next() != nil {} }
        }
    }

    @Test func anAgentThatClosesBeforeAnsweringFailsTheSend() async throws {
        try await withBodilessSend { agent, response, fd in
            agent.closeAll()
            await #expect(throws: AgentLinkError.self) { _ = try await response.value }
        }
    }

    @Test func aBrokenResponseFailsTheSend() async throws {
        try await withBodilessSend { agent, response, fd in
            agent.write(fd, "HTTP/1.1 200 OK\r\nContent-Length: zz\r\n\r\n")
            await #expect(throws: (any Error).self) { _ = try await response.value }
            #expect(await agent.closedByPeer(fd))
        }
    }

    @Test func fetchGivesUpOnASilentAgentAndDropsItsLink() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, connector: agent.connector)
            defer { transport.close() }
            let fetched = Task { try await transport.fetch(path: "/ping", timeoutSeconds: 0.2) }
            let fd = try await agent.waitForEnd(0)
            let request = String(decoding: await agent.read(fd, atLeast: 1), as: UTF8.self)
            #expect(request.hasPrefix("GET /ping HTTP/1.1\r\n"))
            await #expect(throws: AgentLinkError.self) { _ = try await fetched.value }
            #expect(await agent.closedByPeer(fd), "an answer arriving late must not be read as the next request's")
        }
    }

    @Test func aCancelledSendClosesItsLink() async throws {
        try await withBodilessSend { agent, task, fd in
            task.cancel()
            await #expect(throws: (any Error).self) { _ = try await task.value }
            #expect(await agent.closedByPeer(fd))
        }
    }
}

extension AgentLinkTests {
    /// An agent that answers and exits: its session ends (the exit is reported) while the answer is still in
    /// flight to us. Closing the transport keeping the links in use lets that answer arrive whole, and the
    /// link is closed when given back (a plain close cuts it: `endingTheSessionClosesLinksInUseAndTheirSinkHearsIt`).
    @Test func anExitedAgentsLastAnswerStillArrives() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, inUseGrace: .seconds(60), connector: agent.connector)
            let response = Task { try await transport.send(AgentRequest(head: Self.post(0), bodyLength: 0)) }
            let fd = try await agent.waitForEnd(0)
            _ = await agent.read(fd, atLeast: 1)
            // The exit is heard before the answer is read.
            transport.close(keepingInUse: true)
            try await group.next().submit {}.get()  // whatever the close queued on the link's loop has run
            agent.write(fd, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            let answered = try await response.value
            #expect(try await Self.collect(answered) == "hello")
            #expect(await agent.closedByPeer(fd), "the link is closed once given back to a closed transport")
        }
    }

    /// A link in use whose agent never answers is closed after the grace all the same: nothing waiting on it
    /// outlives its session by more than that.
    @Test func aLinkInUseIsClosedAfterTheGraceEvenIfNoAnswerComes() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, inUseGrace: .milliseconds(100), connector: agent.connector)
            let response = Task { try await transport.send(AgentRequest(head: Self.post(0), bodyLength: 0)) }
            let fd = try await agent.waitForEnd(0)
            _ = await agent.read(fd, atLeast: 1)
            transport.close(keepingInUse: true)
            await #expect(throws: (any Error).self) { _ = try await response.value }
            #expect(await agent.closedByPeer(fd))
        }
    }
}
