import Dispatch
import NIOCore
import NIOHTTP1
import Synchronization

/// Why an exchange with an agent failed on the agent's side: it closed, or broke HTTP.
public struct AgentLinkError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Back-pressure on a channel's reads: while held, a read the pipeline asks for is kept back (the bytes
/// stay in the kernel's socket buffer) and issued once released.
public struct ReadGate {
    private var held = false
    private var pending = false

    public init() {}

    /// For a handler's `read(context:)`.
    public mutating func read(_ context: ChannelHandlerContext) {
        if held { pending = true } else { context.read() }
    }

    public mutating func hold(_ hold: Bool, _ context: ChannelHandlerContext?) {
        held = hold
        if !hold, pending, let context {
            pending = false
            context.read()
        }
    }
}

/// Who an agent connection's response parts go to, for the length of one exchange: the gateway's
/// forwarder, or a `TaskExchange` for a caller in a task. Called on the connection's event loop only.
public protocol AgentLinkSink: AnyObject {
    func agentLink(_ link: AgentLink, received part: HTTPClientResponsePart)
    func agentLinkReadComplete(_ link: AgentLink)
    func agentLinkWritabilityChanged(_ link: AgentLink)
    /// The connection closed or failed while this sink was attached.
    func agentLink(_ link: AgentLink, failed error: any Error)
}

/// The one kind of connection to an agent: a keep-alive HTTP/1.1 connection over a socket init connected
/// inside the sandbox, driven from a channel handler rather than a task. The gateway's warm path forwards
/// parts between the client's channel and this one on the same event loop, with no task switch or queue
/// between them; callers in tasks use it through `AgentTransport.send`, which attaches a `TaskExchange`.
/// It speaks NIO's HTTP/1 types: the gateway builds the agent's head itself, so converting to HTTP types
/// and back would be work for nothing. Everything but `eventLoop` and the atomics belongs to that loop.
public final class AgentLink: ChannelDuplexHandler, @unchecked Sendable {
    public typealias InboundIn = HTTPClientResponsePart
    public typealias OutboundIn = HTTPClientRequestPart
    public typealias OutboundOut = HTTPClientRequestPart

    public let eventLoop: any EventLoop
    private var context: ChannelHandlerContext?
    /// Held strongly while attached: an exchange lives as long as its link is busy with it. Cleared by
    /// `detach`, a failure or the close, so the cycle always breaks.
    private var sink: (any AgentLinkSink)?
    private var reads = ReadGate()
    private let idleSince = Atomic<UInt64>(DispatchTime.now().uptimeNanoseconds)
    private let active = Atomic<Bool>(true)
    var onClose: (@Sendable (AgentLink) -> Void)?

    init(eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    /// For both sides of a forwarded exchange: reads grow up to 256 KiB (NIO's default stops at 64 KiB), so
    /// a large body crosses in a quarter of the reads; a connection only grows its buffer while its reads
    /// keep filling it.
    public static let bodyReadAllocator = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 256 << 10)

    var isActive: Bool { active.load(ordering: .relaxed) }
    var idleNanoseconds: UInt64 { DispatchTime.now().uptimeNanoseconds &- idleSince.load(ordering: .relaxed) }

    public var isWritable: Bool { context?.channel.isWritable ?? false }

    public func attach(_ sink: any AgentLinkSink) { self.sink = sink }

    /// Ends the exchange: parts that arrive from now on are not any sink's.
    public func detach() {
        sink = nil
        holdReads(false)
        idleSince.store(DispatchTime.now().uptimeNanoseconds, ordering: .relaxed)
    }

    public func write(_ part: HTTPClientRequestPart) { context?.write(wrapOutboundOut(part), promise: nil) }
    public func flush() { context?.flush() }

    /// Back-pressure: while held, the agent's bytes stay in the kernel's socket buffer.
    public func holdReads(_ hold: Bool) { reads.hold(hold, context) }

    /// Closes the connection from any thread; an attached sink hears `failed`.
    public func close() {
        active.store(false, ordering: .relaxed)
        eventLoop.execute { self.context?.close(promise: nil) }
    }

    /// Closes the connection after `delay` on its event loop (nothing to do if it has closed by then).
    public func close(after delay: TimeAmount) {
        eventLoop.scheduleTask(in: delay) {
            self.active.store(false, ordering: .relaxed)
            self.context?.close(promise: nil)
        }
    }

    public func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    public func read(context: ChannelHandlerContext) { reads.read(context) }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let sink else {
            // An idle agent has nothing to say; bytes now would be read as the next request's response.
            context.close(promise: nil)
            return
        }
        sink.agentLink(self, received: unwrapInboundIn(data))
    }

    public func channelReadComplete(context: ChannelHandlerContext) { sink?.agentLinkReadComplete(self) }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        sink?.agentLinkWritabilityChanged(self)
        context.fireChannelWritabilityChanged()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
        if let sink {
            self.sink = nil
            sink.agentLink(self, failed: error)
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        active.store(false, ordering: .relaxed)
        self.context = nil
        if let sink {
            self.sink = nil
            sink.agentLink(self, failed: AgentLinkError("agent closed the connection"))
        }
        onClose?(self)
        onClose = nil
    }
}
