import CubicleAgentCore
@testable import CubicleAgentLink
@testable import CubicleGateway
import CubicleRuntimes
import CubicleSessions
import HTTPTypes
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOHTTPTypes
import Synchronization
import Testing

/// The warm road's state machine on NIO's EmbeddedChannel, as Hummingbird tests its handlers: the client's
/// channel holds the forwarder, the agent's channel an AgentLink behind NIO's HTTP/1 client codec, both on
/// one embedded loop. No sockets, no sandbox: the test plays client and agent byte by byte.
@Suite struct WarmInvokeForwarderTests {
    /// A session as the invocation core sees it, counting the requests it was kept busy for.
    final class FakeSession: InvocationTarget {
        let runtime = RuntimeConfig(name: "demo", command: ["agent"])
        let agent: AgentTransport
        let busy = Mutex<(started: Int, ended: Int)>((0, 0))

        init(group: any EventLoopGroup) {
            agent = AgentTransport(group: group, maxIdleNanoseconds: 60_000_000_000) { throw AgentLinkError("no agent to connect to in this test") }
        }
        func requestStarted() { busy.withLock { $0.started += 1 } }
        func requestEnded() { busy.withLock { $0.ended += 1 } }
        func endedCause(waitingUpTo seconds: Double) async -> String? { nil }
    }

    /// Counts reads the pipeline lets through to the socket, to see the forwarder's back-pressure.
    final class ReadCounter: ChannelOutboundHandler {
        typealias OutboundIn = Any
        var reads = 0
        func read(context: ChannelHandlerContext) {
            reads += 1
            context.read()
        }
    }

    struct Harness {
        let loop = EmbeddedEventLoop()
        let session: FakeSession
        let client: EmbeddedChannel
        let reads = ReadCounter()
        let sessionID = "session-0123456789-0123456789-0123456789"

        init() throws {
            session = FakeSession(group: loop)
            let target = session
            client = EmbeddedChannel(loop: loop)
            try client.pipeline.syncOperations.addHandler(reads)
            try client.pipeline.syncOperations.addHandler(WarmInvokeForwarder { runtime, _, _, _ in runtime == "demo" ? target : nil })
            try client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
        }

        /// An agent connection with its link idle in the session's transport.
        func idleAgent() throws -> (EmbeddedChannel, AgentLink) {
            let link = AgentLink(eventLoop: loop)
            let agent = EmbeddedChannel(loop: loop)
            try agent.pipeline.syncOperations.addHTTPClientHandlers()
            try agent.pipeline.syncOperations.addHandler(link)
            try agent.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 8080)).wait()
            session.agent.giveBack(link)
            return (agent, link)
        }

        static let invokePath = "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A123456789012%3Aruntime%2Fdemo/invocations"

        func invoke(_ body: String, path: String = Self.invokePath) -> [HTTPRequestPart] {
            let head = HTTPRequest(method: .post, scheme: "http", authority: "127.0.0.1", path: path,
                                   headerFields: [.contentLength: String(body.utf8.count), .agentCoreSessionIDForTests: sessionID,
                                                  .init("X-Amzn-Trace-Id")!: "Root=1-trace"])
            return [.head(head), .body(ByteBuffer(string: body)), .end(nil)]
        }

        /// Everything the agent has been sent, as text.
        func agentReceived(_ agent: EmbeddedChannel) throws -> String {
            var text = ""
            while let buffer = try agent.readOutbound(as: ByteBuffer.self) { text += String(buffer: buffer) }
            return text
        }

        func clientGot() throws -> [HTTPResponsePart] {
            var parts: [HTTPResponsePart] = []
            while let part = try client.readOutbound(as: HTTPResponsePart.self) { parts.append(part) }
            return parts
        }

        func passedOn() throws -> [HTTPRequestPart] {
            var parts: [HTTPRequestPart] = []
            while let part = try client.readInbound(as: HTTPRequestPart.self) { parts.append(part) }
            return parts
        }
    }

    @Test func aWarmInvokeGoesStraightToAnIdleLinkAndTheLinkGoesBack() throws {
        let h = try Harness()
        let (agent, link) = try h.idleAgent()
        for part in h.invoke(#"{"prompt":"2+5"}"#) { try h.client.writeInbound(part) }
        #expect(try h.passedOn().isEmpty, "nothing reaches Hummingbird")
        let sent = try h.agentReceived(agent)
        #expect(sent.hasPrefix("POST /invocations HTTP/1.1\r\n"))
        #expect(sent.lowercased().contains("x-amzn-bedrock-agentcore-runtime-session-id: \(h.sessionID)"))
        #expect(sent.lowercased().contains("x-amzn-bedrock-agentcore-runtime-request-id: "))
        #expect(sent.hasSuffix("\r\n\r\n" + #"{"prompt":"2+5"}"#))
        #expect(h.session.busy.withLock { $0 } == (1, 0), "busy while the agent answers")

        try agent.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Private: no\r\n\r\n" + #"{"a":7"#))
        let got = try h.clientGot()
        try #require(got.count == 3)
        guard case .head(let head) = got[0], case .body(let body) = got[1], case .end = got[2] else {
            Issue.record("parts out of order: \(got)")
            return
        }
        #expect(head.status == .ok)
        #expect(head.headerFields[.contentType] == "application/json", "JSON when the agent names no type")
        #expect(head.headerFields[.agentCoreSessionIDForTests] == h.sessionID)
        #expect(head.headerFields[.init("X-Amzn-Trace-Id")!] == "Root=1-trace", "the request's trace header comes back")
        #expect(head.headerFields[.init("X-Private")!] == nil, "the agent's own headers do not")
        #expect(head.headerFields[.contentLength] == "6")
        #expect(String(buffer: body) == #"{"a":7"#)
        #expect(h.session.busy.withLock { $0 } == (1, 1))
        #expect(h.session.agent.take(on: h.loop) === link, "the link is idle again for the next request")
    }

    @Test func withoutAnIdleLinkTheRequestIsHandedOnUntouched() throws {
        let h = try Harness()
        let parts = h.invoke("{}")
        for part in parts { try h.client.writeInbound(part) }
        let passed = try h.passedOn()
        #expect(passed.count == 3)
        if case .head(let head) = passed.first { #expect(head.path == Harness.invokePath) } else { Issue.record("no head passed on") }
        #expect(h.session.busy.withLock { $0 } == (0, 0), "the task road counts it, not this one")
    }

    @Test func aPipelinedRequestWaitsForTheForwardedOneAndThenTakesTheSameLink() throws {
        let h = try Harness()
        let (agent, _) = try h.idleAgent()
        for part in h.invoke("one") + h.invoke("two") { try h.client.writeInbound(part) }
        let first = try h.agentReceived(agent)
        #expect(first.hasSuffix("one") && !first.contains("two"), "the second request waits")
        try agent.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1"))
        let second = try h.agentReceived(agent)
        #expect(second.hasSuffix("two"), "then goes to the agent over the same link")
        try agent.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2"))
        let bodies = try h.clientGot().compactMap { part -> String? in
            if case .body(let b) = part { return String(buffer: b) }
            return nil
        }
        #expect(bodies == ["1", "2"], "answers in order")
        #expect(try h.passedOn().isEmpty)
    }

    @Test func theAgentClosingMidResponseClosesTheClient() throws {
        let h = try Harness()
        let (agent, _) = try h.idleAgent()
        for part in h.invoke("{}") { try h.client.writeInbound(part) }
        try agent.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
        _ = try agent.close().wait()
        h.loop.run()
        // An empty part orders the close after the writes before it; it frames nothing.
        let got = try h.clientGot().filter { if case .body(let b) = $0 { return b.readableBytes > 0 } else { return true } }
        #expect(got.count == 2, "the head and what came of the body went out")
        #expect(!h.client.isActive, "a client can only learn of a broken response from the connection closing")
        #expect(h.session.busy.withLock { $0 } == (1, 1))
        #expect(h.session.agent.take(on: h.loop) == nil)
    }

    @Test func theClientGoingAwayClosesTheAgentsConnection() throws {
        let h = try Harness()
        let (agent, _) = try h.idleAgent()
        let parts = h.invoke("{}")
        try h.client.writeInbound(parts[0])
        _ = try h.client.close().wait()
        h.loop.run()
        #expect(!agent.isActive, "closing the agent's connection is how it learns the request was cancelled")
        #expect(h.session.busy.withLock { $0 } == (1, 1))
    }

    @Test func aFullAgentStopsTheClientsReadsUntilItDrains() throws {
        let h = try Harness()
        let (agent, _) = try h.idleAgent()
        let parts = h.invoke("{}")
        try h.client.writeInbound(parts[0])
        agent.isWritable = false
        agent.pipeline.fireChannelWritabilityChanged()
        try h.client.writeInbound(HTTPRequestPart.body(ByteBuffer(string: "{")))
        let before = h.reads.reads
        h.client.read()
        #expect(h.reads.reads == before, "the request's bytes stay in the kernel while the agent cannot take them")
        agent.isWritable = true
        agent.pipeline.fireChannelWritabilityChanged()
        #expect(h.reads.reads == before + 1, "the held read goes out once the agent drains")
    }
}

extension HTTPField.Name {
    static let agentCoreSessionIDForTests = HTTPField.Name(AgentCoreHeader.sessionID)!
}
