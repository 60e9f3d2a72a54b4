import AsyncAlgorithms
import Dispatch
import HTTPTypes
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOPosix
import Synchronization

public struct AgentClientError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The agent's response: its head at once, its body as it arrives, with back-pressure all the way to the
/// agent's socket, so a 100 MB response is never held whole.
public struct AgentResponse: Sendable {
    public var head: HTTPResponse
    public var body: AsyncThrowingChannel<ByteBuffer, any Error>
    let connection: AgentConnection

    /// Drops the exchange (the client went away): the connection to the agent is closed, which is how
    /// the agent learns its request was cancelled.
    public func abort() { connection.abort() }
}

/// A request to send: the head, and a writer for its body parts (nothing for a bodiless request).
public struct AgentRequest: Sendable {
    public var head: HTTPRequest
    /// The body's length when the client declared it, so its last part goes out with the end of the request.
    public var bodyLength: Int?
    public var writeBody: @Sendable (AgentBodyWriter) async throws -> Void

    public init(head: HTTPRequest, bodyLength: Int? = nil, writeBody: @escaping @Sendable (AgentBodyWriter) async throws -> Void = { _ in }) {
        self.head = head
        self.bodyLength = bodyLength
        self.writeBody = writeBody
    }
}

/// Writes a request to the agent with as few flushes as it can: the head waits for the first body part,
/// and the part that completes a declared length carries the end, so a small request is one write(2)
/// rather than three, each of which would wake the agent.
public final class AgentBodyWriter: @unchecked Sendable {
    private let outbound: NIOAsyncChannelOutboundWriter<HTTPRequestPart>
    private var head: HTTPRequest?
    private var remaining: Int?
    private var ended = false

    init(_ outbound: NIOAsyncChannelOutboundWriter<HTTPRequestPart>, head: HTTPRequest, length: Int?) {
        self.outbound = outbound
        self.head = head
        self.remaining = length
    }

    public func write(_ buffer: ByteBuffer) async throws {
        var parts: [HTTPRequestPart] = []
        if let h = head { parts.append(.head(h)); head = nil }
        parts.append(.body(buffer))
        if let r = remaining {
            remaining = r - buffer.readableBytes
            if remaining! <= 0 { parts.append(.end(nil)); ended = true }
        }
        try await outbound.write(contentsOf: parts)
    }

    func finish() async throws {
        var parts: [HTTPRequestPart] = []
        if let h = head { parts.append(.head(h)); head = nil }
        if !ended { parts.append(.end(nil)); ended = true }
        if !parts.isEmpty { try await outbound.write(contentsOf: parts) }
    }
}

final class Exchange: Sendable {
    let request: AgentRequest
    let head = OneShot<HTTPResponse>()
    let body = AsyncThrowingChannel<ByteBuffer, any Error>()
    init(_ request: AgentRequest) { self.request = request }

    func fail(_ error: any Error) {
        head.resolve(.failure(error))
        body.fail(error)
    }
}

/// One keep-alive HTTP/1.1 connection to an agent, over a socket init connected inside the sandbox.
/// One task owns the channel and runs its exchanges in turn.
final class AgentConnection: Sendable {
    private let jobs: AsyncStream<Exchange>.Continuation
    private let task = Mutex<Task<Void, Never>?>(nil)
    private let alive = Atomic<Bool>(true)
    private let idleSince = Atomic<UInt64>(DispatchTime.now().uptimeNanoseconds)

    var isAlive: Bool { alive.load(ordering: .relaxed) }
    var idleNanoseconds: UInt64 { DispatchTime.now().uptimeNanoseconds &- idleSince.load(ordering: .relaxed) }

    private init(jobs: AsyncStream<Exchange>.Continuation) { self.jobs = jobs }

    static func open(fd: Int32, group: any EventLoopGroup, onIdle: @escaping @Sendable (AgentConnection) -> Void) async throws -> AgentConnection {
        let channel: NIOAsyncChannel<HTTPResponsePart, HTTPRequestPart>
        do {
            channel = try await ClientBootstrap(group: group)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .withConnectedSocket(fd) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(HTTP1ToHTTPClientCodec())
                        return try NIOAsyncChannel<HTTPResponsePart, HTTPRequestPart>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            close(fd)
            throw error
        }
        let (stream, continuation) = AsyncStream<Exchange>.makeStream()
        let connection = AgentConnection(jobs: continuation)
        let t = Task { await connection.run(channel, jobs: stream, onIdle: onIdle) }
        connection.task.withLock { $0 = t }
        return connection
    }

    func submit(_ exchange: Exchange) {
        if case .terminated = jobs.yield(exchange) { exchange.fail(AgentClientError("connection to the agent closed")) }
    }

    func abort() {
        alive.store(false, ordering: .relaxed)
        jobs.finish()
        task.withLock { $0?.cancel() }
    }

    private func run(_ channel: NIOAsyncChannel<HTTPResponsePart, HTTPRequestPart>, jobs: AsyncStream<Exchange>,
                     onIdle: @escaping @Sendable (AgentConnection) -> Void) async {
        channel.channel.closeFuture.whenComplete { [self] _ in
            alive.store(false, ordering: .relaxed)
            self.jobs.finish()
        }
        var pending: Exchange?
        do {
            try await channel.executeThenClose { inbound, outbound in
                var responses = inbound.makeAsyncIterator()
                for await exchange in jobs {
                    pending = exchange
                    let reusable = try await Self.perform(exchange, &responses, outbound)
                    pending = nil
                    guard reusable, alive.load(ordering: .relaxed) else { break }
                    idleSince.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
                    onIdle(self)
                }
            }
        } catch {
            pending?.fail(error)
        }
        alive.store(false, ordering: .relaxed)
        self.jobs.finish()
        // Exchanges queued behind a failed one never ran.
        for await queued in jobs { queued.fail(AgentClientError("connection to the agent closed")) }
    }

    /// A request body this small fits the socket's buffers, so it is written before the response is read,
    /// without a second task; larger ones (or of unknown length) are written while the response is read.
    static let inlineBodyLimit = 64 << 10

    /// Runs one exchange full duplex: the request body is written while the response is read, as an
    /// echoing agent needs. Returns whether the connection can carry another request.
    private static func perform(_ exchange: Exchange, _ responses: inout NIOAsyncChannelInboundStream<HTTPResponsePart>.AsyncIterator,
                                _ outbound: NIOAsyncChannelOutboundWriter<HTTPRequestPart>) async throws -> Bool {
        if let length = exchange.request.bodyLength, length <= inlineBodyLimit {
            let writer = AgentBodyWriter(outbound, head: exchange.request.head, length: length)
            try await exchange.request.writeBody(writer)
            try await writer.finish()
            return try await readResponse(exchange, &responses)
        }
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                let writer = AgentBodyWriter(outbound, head: exchange.request.head, length: exchange.request.bodyLength)
                try await exchange.request.writeBody(writer)
                try await writer.finish()
            }
            let head = try await readHead(exchange, &responses)
            try await readBody(exchange, &responses)
            // The response ends for the client only once the request body has been read to its end: the
            // server drains an unread request body itself once a response is complete, and two readers of
            // one body is a crash in NIO.
            try await group.waitForAll()
            exchange.body.finish()
            return head.headerFields[.connection]?.lowercased() != "close"
        }
    }

    private static func readResponse(_ exchange: Exchange, _ responses: inout NIOAsyncChannelInboundStream<HTTPResponsePart>.AsyncIterator) async throws -> Bool {
        let head = try await readHead(exchange, &responses)
        try await readBody(exchange, &responses)
        exchange.body.finish()
        return head.headerFields[.connection]?.lowercased() != "close"
    }

    private static func readHead(_ exchange: Exchange, _ responses: inout NIOAsyncChannelInboundStream<HTTPResponsePart>.AsyncIterator) async throws -> HTTPResponse {
        while true {
            guard let part = try await responses.next() else { throw AgentClientError("agent closed the connection before responding") }
            guard case .head(let h) = part else { throw AgentClientError("agent sent a body before its response head") }
            if h.status.kind != .informational {
                exchange.head.resolve(.success(h))
                return h
            }
        }
    }

    private static func readBody(_ exchange: Exchange, _ responses: inout NIOAsyncChannelInboundStream<HTTPResponsePart>.AsyncIterator) async throws {
        while true {
            guard let part = try await responses.next() else { throw AgentClientError("agent closed the connection mid-response") }
            switch part {
            case .body(let buffer):
                await exchange.body.send(buffer)
                try Task.checkCancellation()
            case .end:
                return
            case .head:
                throw AgentClientError("agent sent a second response head")
            }
        }
    }
}

/// Keep-alive connections to one sandbox's agent, opened through init on demand.
public final class AgentPool: Sendable {
    public typealias Connector = @Sendable () async throws -> Int32
    private let connector: Connector
    private let group: any EventLoopGroup
    private let idle = Mutex<(connections: [AgentConnection], closed: Bool)>(([], false))
    /// An idle connection older than this is not reused: agents close idle keep-alive connections
    /// (uvicorn after 5 s), and a request sent into that race would fail.
    static let maxIdleNanoseconds: UInt64 = 2_000_000_000
    static let maxIdleConnections = 16

    public init(group: any EventLoopGroup, connector: @escaping Connector) {
        self.group = group
        self.connector = connector
    }

    private func takeIdle() -> AgentConnection? {
        let (found, stale) = idle.withLock { s -> (AgentConnection?, [AgentConnection]) in
            var stale: [AgentConnection] = []
            while let c = s.connections.popLast() {
                if c.isAlive && c.idleNanoseconds < Self.maxIdleNanoseconds { return (c, stale) }
                stale.append(c)
            }
            return (nil, stale)
        }
        stale.forEach { $0.abort() }
        return found
    }

    private func putIdle(_ connection: AgentConnection) {
        let keep = idle.withLock { s -> Bool in
            guard !s.closed, s.connections.count < Self.maxIdleConnections else { return false }
            s.connections.append(connection)
            return true
        }
        if !keep { connection.abort() }
    }

    /// Sends a request; returns once the agent's response head has arrived.
    public func send(_ request: AgentRequest) async throws -> AgentResponse {
        let connection: AgentConnection
        if let c = takeIdle() {
            connection = c
        } else {
            guard !idle.withLock({ $0.closed }) else { throw AgentClientError("session is ending") }
            let fd = try await connector()
            connection = try await AgentConnection.open(fd: fd, group: group) { [weak self] c in self?.putIdle(c) }
        }
        let exchange = Exchange(request)
        connection.submit(exchange)
        do {
            let head = try await withTaskCancellationHandler {
                try await exchange.head.value
            } onCancel: {
                connection.abort()
                exchange.fail(CancellationError())
            }
            return AgentResponse(head: head, body: exchange.body, connection: connection)
        } catch {
            connection.abort()
            throw error
        }
    }

    /// A small request whose whole response is read, bounded in size and time: health checks.
    public func fetch(_ head: HTTPRequest, maxBytes: Int = 64 << 10, timeoutSeconds: Double) async throws -> (HTTPResponse, [UInt8]) {
        try await withThrowingTaskGroup(of: (HTTPResponse, [UInt8]).self) { group in
            group.addTask {
                let response = try await self.send(AgentRequest(head: head))
                var bytes: [UInt8] = []
                do {
                    for try await buffer in response.body {
                        bytes += buffer.readableBytesView
                        if bytes.count > maxBytes { throw AgentClientError("agent response over \(maxBytes) bytes") }
                    }
                } catch {
                    response.abort()
                    throw error
                }
                return (response.head, bytes)
            }
            group.addTask {
                try await Task.sleep(nanoseconds: UInt64(timeoutSeconds * 1e9))
                throw AgentClientError("agent did not answer within \(timeoutSeconds) s")
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }

    // MARK: - Links for the gateway's warm path

    private let links = AgentLinks()

    /// An idle link on `loop`, if there is a fresh one.
    public func takeLink(on loop: any EventLoop) -> AgentLink? { links.take(on: loop) }

    /// A link whose exchange ended cleanly, for the next request on its loop.
    public func giveBack(_ link: AgentLink) { links.giveBack(link) }

    /// Opens a link on `loop` in the background, so a later request there can take one.
    public func openLink(on loop: any EventLoop) { links.open(on: loop, connector: connector) }

    public func close() {
        links.close()
        let all = idle.withLock { s -> [AgentConnection] in
            s.closed = true
            defer { s.connections = [] }
            return s.connections
        }
        all.forEach { $0.abort() }
    }
}
