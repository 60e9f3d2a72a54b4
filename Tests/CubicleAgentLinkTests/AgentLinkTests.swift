#if canImport(Glibc)
import Glibc
#endif
@testable import CubicleAgentLink
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

/// Agent links over a socketpair whose other end the test plays as the agent: no sandbox, no root.
@Suite struct AgentLinkTests {
    /// The agent's ends of the sockets the transport connected, in order.
    final class FakeAgent: Sendable {
        let ends = Mutex<[Int32]>([])
        var connector: AgentTransport.Connector {
            { [self] in
                var fds: [Int32] = [0, 0]
                guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw AgentLinkError("socketpair") }
                ends.withLock { $0.append(fds[1]) }
                return fds[0]
            }
        }
        func end(_ i: Int) -> Int32? { ends.withLock { $0.count > i ? $0[i] : nil } }

        /// The agent's blocking reads run on a thread of their own: on the tests' cooperative pool, a few of
        /// them blocked at once would starve the tasks that are to send what they wait for.
        static let readers: NIOThreadPool = {
            let pool = NIOThreadPool(numberOfThreads: 16)
            pool.start()
            return pool
        }()
        func blocking<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
            try! await Self.readers.runIfActive(work)
        }

        func readRequest(_ fd: Int32) async -> String { await blocking { self.readRequestBlocking(fd) } }
        func read(_ fd: Int32, atLeast bytes: Int) async -> [UInt8] { await blocking { self.readBlocking(fd, atLeast: bytes) } }
        func closedByPeer(_ fd: Int32) async -> Bool { await blocking { self.closedByPeerBlocking(fd) } }

        /// read(2), again after a signal: the sandbox tests running beside these end children, and SIGCHLD
        /// lands on whichever thread it likes.
        static func readRetrying(_ fd: Int32, _ buf: inout [UInt8]) -> Int {
            while true {
                let n = Glibc.read(fd, &buf, buf.count)
                if n < 0 && errno == EINTR { continue }
                return n
            }
        }

        private func readRequestBlocking(_ fd: Int32) -> String {
            var got: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 4096)
            while !String(decoding: got, as: UTF8.self).contains("\r\n\r\n") {
                let n = Self.readRetrying(fd, &buf)
                if n <= 0 { break }
                got += buf[0..<n]
            }
            return String(decoding: got, as: UTF8.self)
        }

        /// Reads until `bytes` bytes have come (head and body together), or the peer closes.
        private func readBlocking(_ fd: Int32, atLeast bytes: Int) -> [UInt8] {
            var got: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            while got.count < bytes {
                let n = Self.readRetrying(fd, &buf)
                if n <= 0 { break }
                got += buf[0..<n]
            }
            return got
        }

        /// The socket the transport connected `i`-th, once it has.
        func waitForEnd(_ i: Int) async throws -> Int32 {
            for _ in 0..<1000 {
                if let fd = end(i) { return fd }
                try await Task.sleep(nanoseconds: 2_000_000)
            }
            throw AgentLinkError("the transport connected no socket \(i)")
        }

        /// Whether the transport closed its end within two seconds (unread bytes are discarded on the way).
        private func closedByPeerBlocking(_ fd: Int32) -> Bool {
            var buf = [UInt8](repeating: 0, count: 65536)
            for _ in 0..<200 {
                var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let ready = poll(&p, 1, 10)
                if ready < 0 && errno == EINTR { continue }
                guard ready >= 0 else { return false }
                if p.revents != 0 {
                    let n = Self.readRetrying(fd, &buf)
                    if n <= 0 { return true }
                }
            }
            return false
        }

        var count: Int { ends.withLock { $0.count } }

        func write(_ fd: Int32, _ text: String) { _ = Array(text.utf8).withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } }
        func closeAll() { ends.withLock { $0.forEach { close($0) }; $0 = [] } }
    }

    final class RecordingSink: AgentLinkSink, @unchecked Sendable {
        var parts: [String] = []
        var failure: (any Error)?
        func agentLink(_ link: AgentLink, received part: HTTPClientResponsePart) {
            switch part {
            case .head(let h): parts.append("head \(h.status.code)")
            case .body(let b): parts.append("body \(String(buffer: b))")
            case .end: parts.append("end")
            }
        }
        func agentLinkReadComplete(_ link: AgentLink) {}
        func agentLinkWritabilityChanged(_ link: AgentLink) {}
        func agentLink(_ link: AgentLink, failed error: any Error) { failure = error }
    }

    /// A group of its own per test, shut down however the test ends.
    func withGroup(threads: Int, _ body: (MultiThreadedEventLoopGroup, FakeAgent) async throws -> Void) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        let agent = FakeAgent()
        do { try await body(group, agent) } catch {
            agent.closeAll()
            try await group.shutdownGracefully()
            throw error
        }
        agent.closeAll()
        try await group.shutdownGracefully()
    }

    /// Waits up to 2 s for `condition`, checked on `loop`, where the link's state lives.
    func eventually(on loop: any EventLoop, _ condition: @escaping @Sendable () -> Bool) async throws {
        for _ in 0..<1000 {
            if try await loop.submit(condition).get() { return }
            try await Task.sleep(nanoseconds: 2_000_000)
        }
    }

    func waitForLink(_ transport: AgentTransport, on loop: any EventLoop) async throws -> AgentLink {
        for _ in 0..<500 {
            if let link = transport.take(on: loop) { return link }
            try await Task.sleep(nanoseconds: 2_000_000)
        }
        throw AgentLinkError("no link was opened")
    }

    @Test func aLinkIsOpenedPerLoopAndReusedAfterAnExchange() async throws {
        try await withGroup(threads: 2) { group, agent in
            let transport = AgentTransport(group: group, maxIdleNanoseconds: 60_000_000_000, connector: agent.connector)
            defer { transport.close() }
            let loop = group.next(), other = group.next()
            #expect(loop !== other)
            transport.warm(on: loop)
            let link = try await waitForLink(transport, on: loop)
            #expect(transport.take(on: other) == nil, "a link serves only its own loop")

            let sink = RecordingSink()
            try await loop.submit {
                link.attach(sink)
                link.write(.head(HTTPRequestHead(version: .http1_1, method: .POST, uri: "/invocations", headers: ["Host": "localhost", "Content-Length": "2"])))
                link.write(.body(.byteBuffer(ByteBuffer(string: "{}"))))
                link.write(.end(nil))
                link.flush()
            }.get()
            let fd = try #require(agent.end(0))
            let request = await agent.readRequest(fd)
            #expect(request.hasPrefix("POST /invocations HTTP/1.1\r\n"))
            agent.write(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            try await eventually(on: loop) { sink.parts.count >= 3 }
            let parts = try await loop.submit { sink.parts }.get()
        #expect(parts == ["head 200", "body hi", "end"])

            try await loop.submit { link.detach() }.get()
            transport.giveBack(link)
            #expect(transport.take(on: loop) === link, "a link whose exchange ended is taken again")
        }
    }

    @Test func endingTheSessionClosesLinksInUseAndTheirSinkHearsIt() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, connector: agent.connector)
            let loop = group.next()
            transport.warm(on: loop)
            let link = try await waitForLink(transport, on: loop)
            let sink = RecordingSink()
            try await loop.submit { link.attach(sink) }.get()
            transport.close()
            try await eventually(on: loop) { sink.failure != nil }
            let heard = try await loop.submit { sink.failure != nil }.get()
            #expect(heard, "the link's sink heard it close")
            transport.warm(on: loop)
            try await Task.sleep(nanoseconds: 50_000_000)
            #expect(transport.take(on: loop) == nil, "a closed transport opens no more links")
        }
    }

    @Test func anIdleAgentThatSpeaksUpLosesItsLink() async throws {
        try await withGroup(threads: 1) { group, agent in
            let transport = AgentTransport(group: group, connector: agent.connector)
            defer { transport.close() }
            let loop = group.next()
            transport.warm(on: loop)
            let link = try await waitForLink(transport, on: loop)
            transport.giveBack(link)
            // Unasked-for bytes would otherwise be read as the next request's response.
            agent.write(try #require(agent.end(0)), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            var taken: AgentLink? = link
            for _ in 0..<500 {
                try await Task.sleep(nanoseconds: 2_000_000)
                taken = transport.take(on: loop)
                if taken == nil { break }
                transport.giveBack(taken!)
            }
            #expect(taken == nil)
        }
    }
}
