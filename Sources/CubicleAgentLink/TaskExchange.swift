import NIOCore
import NIOHTTP1

/// A request for `AgentTransport.send`: the head, and a writer for its body parts.
public struct AgentRequest: Sendable {
    public var head: HTTPRequestHead
    /// The body's length when the client declared it, so its last part goes out with the end of the request.
    public var bodyLength: Int?
    public var writeBody: @Sendable (AgentBodyWriter) async throws -> Void

    public init(head: HTTPRequestHead, bodyLength: Int? = nil,
                writeBody: @escaping @Sendable (AgentBodyWriter) async throws -> Void = { _ in }) {
        self.head = head
        self.bodyLength = bodyLength
        self.writeBody = writeBody
    }
}

/// The agent's response: its head at once, its body as it arrives, with back-pressure all the way to the
/// agent's socket, so a 100 MB response is never held whole.
public struct AgentResponse: Sendable {
    public let head: HTTPResponseHead
    public let body: AgentResponseBody
    let exchange: TaskExchange

    /// Drops the exchange (the client went away): the connection to the agent is closed, which is how the
    /// agent learns its request was cancelled.
    public func abort() { exchange.abort() }
}

public struct AgentResponseBody: AsyncSequence, Sendable {
    public typealias Element = ByteBuffer
    typealias Producer = NIOThrowingAsyncSequenceProducer<ByteBuffer, any Error,
                                                          NIOAsyncSequenceProducerBackPressureStrategies.HighLowWatermark, TaskExchange.Demand>
    let producer: Producer

    public struct AsyncIterator: AsyncIteratorProtocol {
        var inner: Producer.AsyncIterator
        public mutating func next() async throws -> ByteBuffer? { try await inner.next() }
    }
    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(inner: producer.makeAsyncIterator()) }
}

/// Writes a request's body to the agent. The head waits for the first part and the part that completes a
/// declared length carries the end, so a small request is one write(2) rather than three, each of which
/// would wake the agent. A write returns once the link can take more (back-pressure from the agent).
public final class AgentBodyWriter: @unchecked Sendable {
    // Used by one task at a time: the one writing the body.
    private let exchange: TaskExchange
    private var remaining: Int?
    private var ended = false

    init(_ exchange: TaskExchange, length: Int?) {
        self.exchange = exchange
        self.remaining = length
    }

    public func write(_ buffer: ByteBuffer) async throws {
        var end = false
        if let r = remaining {
            remaining = r - buffer.readableBytes
            end = remaining! <= 0
        }
        try await exchange.send(buffer, end: end)
        if end { ended = true }
    }

    /// Ends the request unless its last part already did. Nothing more is sent after the end: by then the
    /// agent may have answered and the exchange be over.
    func finish() async throws {
        guard !ended else { return }
        try await exchange.send(nil, end: true)
        ended = true
    }
}

/// One exchange over an `AgentLink` for a caller in a task: the request body is written while the response
/// is read (full duplex, as an echoing agent needs), the head is handed over once it arrives and the body
/// as a back-pressured sequence. Everything mutable belongs to the link's event loop.
final class TaskExchange: AgentLinkSink, @unchecked Sendable {
    /// A request body this small fits the socket's buffers, so it is written by the caller before the
    /// response is read, without a task of its own; larger ones (or of unknown length) are written by a
    /// task the exchange owns while the response is read.
    static let inlineBodyLimit = 64 << 10

    private let link: AgentLink
    private let transport: AgentTransport
    private let loop: any EventLoop
    private var pendingHead: HTTPRequestHead?
    private let head: EventLoopPromise<HTTPResponseHead>
    private var headSettled = false
    private var source: AgentResponseBody.Producer.Source!
    private var keepAlive = false
    private var requestDone = false
    private var responseEnded = false
    private var answeredEarly = false
    private var over = false
    /// Writers waiting for the link to drain.
    private var drained: [EventLoopPromise<Void>] = []
    /// The task writing a large body; ended with the exchange.
    private var writer: Task<Void, Never>?

    private init(link: AgentLink, transport: AgentTransport, head: HTTPRequestHead) {
        self.link = link
        self.transport = transport
        self.loop = link.eventLoop
        self.pendingHead = head
        self.head = link.eventLoop.makePromise()
    }

    static func run(_ request: AgentRequest, on link: AgentLink, transport: AgentTransport) async throws -> AgentResponse {
        let exchange = TaskExchange(link: link, transport: transport, head: request.head)
        let sequence = AgentResponseBody.Producer.makeSequence(
            backPressureStrategy: .init(lowWatermark: 2, highWatermark: 8), finishOnDeinit: false, delegate: Demand(exchange))
        exchange.source = sequence.source
        let body = AgentResponseBody(producer: sequence.sequence)
        let writeBody = request.writeBody, length = request.bodyLength
        do {
            if let length, length <= inlineBodyLimit {
                let writer = AgentBodyWriter(exchange, length: length)
                try await writeBody(writer)
                try await writer.finish()
            } else {
                let task = Task {
                    do {
                        let writer = AgentBodyWriter(exchange, length: length)
                        try await writeBody(writer)
                        try await writer.finish()
                    } catch {
                        exchange.loop.execute { exchange.fail(error) }
                    }
                }
                exchange.loop.execute { if exchange.over { task.cancel() } else { exchange.writer = task } }
            }
            let head = try await withTaskCancellationHandler {
                try await exchange.head.futureResult.get()
            } onCancel: {
                exchange.abort()
            }
            return AgentResponse(head: head, body: body, exchange: exchange)
        } catch {
            exchange.abort()
            throw error
        }
    }

    /// Writes a body part (nil for none) and, with `end`, the end of the request; waits while the link is full.
    func send(_ buffer: ByteBuffer?, end: Bool) async throws {
        try await loop.flatSubmit { [self] () -> EventLoopFuture<Void> in
            guard !over else { return loop.makeFailedFuture(AgentLinkError("the exchange with the agent has ended")) }
            if let head = pendingHead {
                pendingHead = nil
                link.attach(self)
                link.write(.head(head))
            }
            if let buffer { link.write(.body(.byteBuffer(buffer))) }
            if end { link.write(.end(nil)) }
            link.flush()
            if end {
                requestDone = true
                finishIfDone()
            }
            guard !link.isWritable, !over else { return loop.makeSucceededVoidFuture() }
            let promise = loop.makePromise(of: Void.self)
            drained.append(promise)
            return promise.futureResult
        }.get()
    }

    /// From any thread: ends the exchange and closes the link.
    func abort() { loop.execute { self.fail(AgentLinkError("the exchange with the agent was abandoned")) } }

    // MARK: AgentLinkSink (on the loop)

    func agentLink(_ link: AgentLink, received part: HTTPClientResponsePart) {
        guard !over else { return }
        switch part {
        case .head(let h):
            guard h.status.code >= 200 else { return }
            guard !headSettled else { return fail(AgentLinkError("agent sent a second response head")) }
            headSettled = true
            keepAlive = h.isKeepAlive
            head.succeed(h)
        case .body(let buffer):
            guard headSettled else { return fail(AgentLinkError("agent sent a body before its response head")) }
            switch source.yield(buffer) {
            case .produceMore: break
            case .stopProducing: link.holdReads(true)
            case .dropped: fail(AgentLinkError("the response body was abandoned"))
            }
        case .end:
            guard headSettled else { return fail(AgentLinkError("agent ended a response it never began")) }
            responseEnded = true
            answeredEarly = !requestDone
            finishIfDone()
        }
    }

    func agentLinkReadComplete(_ link: AgentLink) {}

    func agentLinkWritabilityChanged(_ link: AgentLink) {
        guard link.isWritable else { return }
        let waiting = drained
        drained = []
        waiting.forEach { $0.succeed() }
    }

    func agentLink(_ link: AgentLink, failed error: any Error) { fail(error) }

    // MARK: -

    /// The response ends for the caller only once the request has been written to its end: a server drains
    /// an unread request body itself once its response is complete, and two readers of one body is a crash.
    private func finishIfDone() {
        guard requestDone, responseEnded, !over else { return }
        over = true
        writer = nil
        link.detach()
        // The link goes back before the caller can see the end: a caller that sends again at once finds it.
        if keepAlive && !answeredEarly { transport.giveBack(link) } else { link.close() }
        source.finish()
    }

    private func fail(_ error: any Error) {
        guard !over else { return }
        over = true
        link.detach()
        link.close()
        if !headSettled {
            headSettled = true
            head.fail(error)
        }
        source.finish(error)
        let waiting = drained
        drained = []
        waiting.forEach { $0.fail(error) }
        writer?.cancel()
        writer = nil
    }

    /// The body's consumer asks for more, or has gone away.
    struct Demand: NIOAsyncSequenceProducerDelegate {
        let exchange: TaskExchange
        init(_ exchange: TaskExchange) { self.exchange = exchange }

        func produceMore() {
            exchange.loop.execute { if !exchange.over { exchange.link.holdReads(false) } }
        }

        func didTerminate() {
            // After the end this changes nothing; before it, the caller dropped the body mid-way.
            exchange.loop.execute { exchange.fail(AgentLinkError("the response body was abandoned")) }
        }
    }
}
