import Dispatch
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

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

/// Who an agent connection's response parts go to, for the length of one exchange. Called on the
/// connection's event loop only.
public protocol AgentLinkSink: AnyObject {
    func agentLink(_ link: AgentLink, received part: HTTPClientResponsePart)
    func agentLinkReadComplete(_ link: AgentLink)
    func agentLinkWritabilityChanged(_ link: AgentLink)
    /// The connection closed or failed while this sink was attached.
    func agentLink(_ link: AgentLink, failed error: any Error)
}

/// A keep-alive connection to an agent driven from a channel handler rather than a task: the gateway's
/// warm path forwards parts between the client's channel and this one on the same event loop, with no
/// task switch or queue between them. It speaks NIO's HTTP/1 types: the gateway builds the agent's head
/// itself, so converting to HTTP types and back would be work for nothing. Everything but `eventLoop` and
/// the atomics belongs to that loop.
public final class AgentLink: ChannelDuplexHandler, @unchecked Sendable {
    public typealias InboundIn = HTTPClientResponsePart
    public typealias OutboundIn = HTTPClientRequestPart
    public typealias OutboundOut = HTTPClientRequestPart

    public let eventLoop: any EventLoop
    private var context: ChannelHandlerContext?
    private weak var sink: (any AgentLinkSink)?
    private var reads = ReadGate()
    private let idleSince = Atomic<UInt64>(DispatchTime.now().uptimeNanoseconds)
    private let active = Atomic<Bool>(true)
    fileprivate var onClose: (@Sendable (AgentLink) -> Void)?

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
            sink.agentLink(self, failed: AgentClientError("agent closed the connection"))
        }
        onClose?(self)
        onClose = nil
    }
}

/// A session's `AgentLink`s: idle ones by event loop, and every open one, so ending the session closes
/// those in use too.
final class AgentLinks: Sendable {
    private struct State {
        var idle: [AgentLink] = []
        var open: [ObjectIdentifier: AgentLink] = [:]
        var opening: Set<ObjectIdentifier> = []
        var closed = false
    }
    private let state = Mutex(State())

    func take(on loop: any EventLoop) -> AgentLink? {
        let (found, stale) = state.withLock { s -> (AgentLink?, [AgentLink]) in
            var stale: [AgentLink] = []
            var found: AgentLink?
            s.idle.removeAll { link in
                guard found == nil, link.eventLoop === loop else { return false }
                if link.isActive && link.idleNanoseconds < AgentPool.maxIdleNanoseconds { found = link } else { stale.append(link) }
                return true
            }
            return (found, stale)
        }
        stale.forEach { $0.close() }
        return found
    }

    func giveBack(_ link: AgentLink) {
        let keep = state.withLock { s -> Bool in
            guard !s.closed, link.isActive, s.idle.count < AgentPool.maxIdleConnections else { return false }
            s.idle.append(link)
            return true
        }
        if !keep { link.close() }
    }

    /// Opens one link on `loop` in the background unless one is already being opened there.
    func open(on loop: any EventLoop, connector: @escaping AgentPool.Connector) {
        let key = ObjectIdentifier(loop)
        guard state.withLock({ s in !s.closed && s.opening.insert(key).inserted }) else { return }
        Task {
            defer { self.state.withLock { _ = $0.opening.remove(key) } }
            guard let fd = try? await connector() else { return }
            let link = AgentLink(eventLoop: loop)
            link.onClose = { [weak self] l in self?.state.withLock { _ = $0.open.removeValue(forKey: ObjectIdentifier(l)) } }
            let channel: any Channel
            do {
                channel = try await ClientBootstrap(group: loop)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelOption(.recvAllocator, value: AgentLink.bodyReadAllocator)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHTTPClientHandlers()
                            try channel.pipeline.syncOperations.addHandler(link)
                        }
                    }
                    .withConnectedSocket(fd).get()
            } catch {
                Glibc.close(fd)
                return
            }
            let admitted = self.state.withLock { s -> Bool in
                guard !s.closed, link.isActive else { return false }
                s.open[ObjectIdentifier(link)] = link
                return true
            }
            guard admitted else { channel.close(promise: nil); return }
            self.giveBack(link)
        }
    }

    func close() {
        let all = state.withLock { s -> [AgentLink] in
            s.closed = true
            s.idle = []
            return Array(s.open.values)
        }
        all.forEach { $0.close() }
    }
}
