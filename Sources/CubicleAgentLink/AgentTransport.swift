import Dispatch
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// One session's connections to its agent, and the one way to reach it: links opened through init on
/// demand, kept idle by event loop under one staleness rule, and every open one known, so ending the
/// session closes those in use too. The gateway's forwarder takes and gives back links on its own loop;
/// everything else (cold invocations, streamed bodies, health checks, agent cards) calls `send`, which
/// runs over the same links.
public final class AgentTransport: Sendable {
    /// Opens a socket to the agent inside the sandbox (init connects it) and returns its descriptor.
    public typealias Connector = @Sendable () async throws -> Int32

    /// An idle link older than this is not reused: agents close idle keep-alive connections (uvicorn after
    /// 5 s), and a request sent into that race would fail.
    public static let defaultMaxIdleNanoseconds: UInt64 = 2_000_000_000
    let maxIdleNanoseconds: UInt64
    /// How long links in use outlive `close(keepingInUse: true)`; injectable, like the idle rule, for tests.
    let inUseGrace: TimeAmount
    static let maxIdleLinks = 16

    private struct State {
        var idle: [AgentLink] = []
        var open: [ObjectIdentifier: AgentLink] = [:]
        /// Background opens, one per loop at a time; cancelled by `close`.
        var opening: [ObjectIdentifier: Task<Void, Never>] = [:]
        /// WebSockets to the agent, open until either end closes them or the session ends.
        var webSockets: [ObjectIdentifier: any Channel] = [:]
        var closed = false
    }
    private let state = Mutex(State())
    let connector: Connector
    let group: any EventLoopGroup

    public init(group: any EventLoopGroup, maxIdleNanoseconds: UInt64 = defaultMaxIdleNanoseconds, inUseGrace: TimeAmount = defaultInUseGrace,
                connector: @escaping Connector) {
        self.inUseGrace = inUseGrace
        self.group = group
        self.maxIdleNanoseconds = maxIdleNanoseconds
        self.connector = connector
    }

    // MARK: - Links, for the gateway's forwarder

    /// A fresh idle link on `loop`, if there is one; stale ones met on the way are closed.
    public func take(on loop: any EventLoop) -> AgentLink? { take { $0.eventLoop === loop } }

    /// A link whose exchange ended cleanly, for the next request on its loop.
    public func giveBack(_ link: AgentLink) {
        let keep = state.withLock { s -> Bool in
            guard !s.closed, link.isActive, s.idle.count < Self.maxIdleLinks else { return false }
            s.idle.append(link)
            return true
        }
        if !keep { link.close() }
    }

    /// Opens a link on `loop` in the background, unless one is already being opened there, so a later
    /// request on that loop finds one idle.
    public func warm(on loop: any EventLoop) {
        let key = ObjectIdentifier(loop)
        state.withLock { s in
            guard !s.closed, s.opening[key] == nil else { return }
            s.opening[key] = Task {
                defer { self.state.withLock { _ = $0.opening.removeValue(forKey: key) } }
                if let link = try? await self.connect(on: loop) { self.giveBack(link) }
            }
        }
    }

    // MARK: - Exchanges, for callers in tasks

    /// Sends a request over an idle link (any loop's) or a new one; returns once the agent's response head
    /// has arrived. The response body streams with back-pressure to the agent's socket.
    public func send(_ request: AgentRequest) async throws -> AgentResponse {
        let link: AgentLink
        if let idle = take(where: { _ in true }) { link = idle } else { link = try await connect(on: group.any()) }
        return try await TaskExchange.run(request, on: link, transport: self)
    }

    /// A small GET whose whole response is read, bounded in size and time: health checks.
    public func fetch(path: String, maxBytes: Int = 64 << 10, timeoutSeconds: Double) async throws -> (status: UInt, body: [UInt8]) {
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: ["Host": "localhost", "Content-Length": "0"])
        return try await withThrowingTaskGroup(of: (UInt, [UInt8]).self) { group in
            group.addTask {
                let response = try await self.send(AgentRequest(head: head, bodyLength: 0))
                var bytes: [UInt8] = []
                do {
                    for try await buffer in response.body {
                        bytes += buffer.readableBytesView
                        if bytes.count > maxBytes { throw AgentLinkError("agent response over \(maxBytes) bytes") }
                    }
                } catch {
                    response.abort()
                    throw error
                }
                return (response.head.status.code, bytes)
            }
            group.addTask {
                try await Task.sleep(nanoseconds: UInt64(timeoutSeconds * 1e9))
                throw AgentLinkError("agent did not answer within \(timeoutSeconds) s")
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }

    public static let defaultInUseGrace = TimeAmount.seconds(1)

    /// Closes every link, idle or in use (an attached exchange hears `failed`), and opens no more.
    /// `keepingInUse`: links in use get `inUseGrace` first (closed at once if given back meanwhile): for an
    /// agent that has exited, whose last response may still be in flight to us. Bounded, so nothing that
    /// waits on such a link can outlive its session by more than that.
    public func close(keepingInUse: Bool = false) {
        let (idle, inUse, opening, webSockets) = state.withLock { s -> ([AgentLink], [AgentLink], [Task<Void, Never>], [any Channel]) in
            s.closed = true
            let idle = s.idle
            s.idle = []
            let idleIDs = Set(idle.map { ObjectIdentifier($0) })
            return (idle, s.open.values.filter { !idleIDs.contains(ObjectIdentifier($0)) }, Array(s.opening.values), Array(s.webSockets.values))
        }
        opening.forEach { $0.cancel() }
        webSockets.forEach { $0.close(promise: nil) }
        idle.forEach { $0.close() }
        if keepingInUse { inUse.forEach { $0.close(after: inUseGrace) } } else { inUse.forEach { $0.close() } }
    }

    // MARK: -

    var isClosed: Bool { state.withLock { $0.closed } }

    /// Keeps `channel` (a WebSocket's) until it closes, so `close` ends it with the session; throws if
    /// the session is already ending.
    func track(_ channel: any Channel) throws {
        let key = ObjectIdentifier(channel)
        let admitted = state.withLock { s -> Bool in
            guard !s.closed else { return false }
            s.webSockets[key] = channel
            return true
        }
        guard admitted else { throw AgentLinkError("the session is ending") }
        channel.closeFuture.whenComplete { [weak self] _ in self?.state.withLock { _ = $0.webSockets.removeValue(forKey: key) } }
    }

    private func take(where matches: (AgentLink) -> Bool) -> AgentLink? {
        let (found, stale) = state.withLock { s -> (AgentLink?, [AgentLink]) in
            var stale: [AgentLink] = []
            var found: AgentLink?
            // Newest first: the link most recently used is the least likely to have been closed by the agent.
            for i in s.idle.indices.reversed() where found == nil && matches(s.idle[i]) {
                let link = s.idle.remove(at: i)
                if link.isActive && link.idleNanoseconds < maxIdleNanoseconds { found = link } else { stale.append(link) }
            }
            return (found, stale)
        }
        stale.forEach { $0.close() }
        return found
    }

    /// A new link on `loop` over a socket from the connector.
    func connect(on loop: any EventLoop) async throws -> AgentLink {
        guard !state.withLock({ $0.closed }) else { throw AgentLinkError("the session is ending") }
        let fd = try await connector()
        let link = AgentLink(eventLoop: loop)
        link.onClose = { [weak self] l in self?.state.withLock { _ = $0.open.removeValue(forKey: ObjectIdentifier(l)) } }
        // From here the descriptor is NIO's: it closes it when setting the channel up fails, so closing it
        // here too could close another connection's descriptor that reused the number.
        let channel = try await ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.recvAllocator, value: AgentLink.bodyReadAllocator)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(link)
                }
            }
            .withConnectedSocket(fd).get()
        let admitted = state.withLock { s -> Bool in
            guard !s.closed, link.isActive else { return false }
            s.open[ObjectIdentifier(link)] = link
            return true
        }
        guard admitted else {
            channel.close(promise: nil)
            throw AgentLinkError("the session is ending")
        }
        return link
    }
}
