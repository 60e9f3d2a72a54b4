import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// A WebSocket client's upgrade, as NIO's typed upgrader does it: to an agent's `/ws` (over the session's
/// transport) and, in the CLI, to cubicled's admin socket for an interactive shell.
public enum WebSocketClient {
    /// How an upgrade ended.
    public enum Result: Sendable {
        /// Upgraded: frames both ways, and the subprotocol the server chose, if any.
        case open(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, subprotocol: String?, headers: HTTPHeaders)
        /// The server answered with this status instead; the connection is closed after it.
        case refused(status: UInt, body: [UInt8])
    }

    /// Frames over this size, either way, are refused (close 1009): AgentCore's limit.
    public static let maxFrameBytes = 64 << 10

    /// Sets `channel` (connected, in its initializer) up to send `head` as an upgrade request.
    /// - Parameter automaticErrorHandling: NIO answers a protocol error (a frame over the limit) with a
    ///   close by itself; without it the error fails the inbound stream, so the reader learns why.
    public static func upgrade(_ channel: any Channel, head: HTTPRequestHead, automaticErrorHandling: Bool) throws -> EventLoopFuture<Pending> {
        let upgrader = NIOTypedWebSocketClientUpgrader<Pending>(maxFrameSize: maxFrameBytes, enableAutomaticErrorHandling: automaticErrorHandling) { channel, response in
            channel.eventLoop.makeCompletedFuture {
                .open(try NIOAsyncChannel(wrappingChannelSynchronously: channel), subprotocol: response.headers.first(name: "sec-websocket-protocol"),
                      headers: response.headers)
            }
        }
        let configuration = NIOTypedHTTPClientUpgradeConfiguration<Pending>(
            upgradeRequestHead: head, upgraders: [upgrader],
            notUpgradingCompletionHandler: { channel in
                // The response comes through only once this has returned: what is kept of it comes after.
                let refusal = RefusedUpgrade(promise: channel.eventLoop.makePromise())
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(refusal)
                    return .refused(refusal.promise.futureResult)
                }
            })
        var pipeline = NIOUpgradableHTTPClientPipelineConfiguration(upgradeConfiguration: configuration)
        // Frames the server sends right behind its 101 can come in the same read as the response head: the
        // HTTP decoder must hand them on when it leaves, not drop them (NIO's client default), or a shell's
        // first prompt or an agent's greeting is lost.
        pipeline.leftOverBytesStrategy = .forwardBytes
        return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: pipeline)
    }

    /// What the upgrade handler settles on; a refusal's status and body come after it.
    public enum Pending: Sendable {
        case open(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, subprotocol: String?, headers: HTTPHeaders)
        case refused(EventLoopFuture<(UInt, [UInt8])>)

        public func result() async throws -> Result {
            switch self {
            case .open(let frames, let subprotocol, let headers): return .open(frames, subprotocol: subprotocol, headers: headers)
            case .refused(let response):
                let (status, body) = try await response.get()
                return .refused(status: status, body: body)
            }
        }
    }
}

extension AgentTransport {
    /// Opens a WebSocket to the agent over a socket from the same connector as every other link, known to
    /// the transport like them, so the session's end closes it. `head` is the upgrade request (GET, the
    /// path, the headers the agent is to see); the upgrade's own headers are added here.
    public func openWebSocket(_ head: HTTPRequestHead) async throws -> WebSocketClient.Result {
        guard !isClosed else { throw AgentLinkError("the session is ending") }
        let fd = try await connector()
        // The initializer hands back the upgrade's future, not its end: the request goes out only once the
        // channel is active, after the initializer.
        let upgrade = try await ClientBootstrap(group: group.any())
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .withConnectedSocket(fd) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try self.track(channel)
                    return try WebSocketClient.upgrade(channel, head: head, automaticErrorHandling: false)
                }
            }
        return try await upgrade.get().result()
    }
}

/// The status and (up to 16 KiB of) the body of a response to an upgrade that was not taken.
private final class RefusedUpgrade: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<(UInt, [UInt8])>
    private var status: UInt = 0
    private var body: [UInt8] = []
    private var done = false
    init(promise: EventLoopPromise<(UInt, [UInt8])>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): status = head.status.code
        case .body(let buffer): if body.count < 16 << 10 { body += buffer.readableBytesView.prefix((16 << 10) - body.count) }
        case .end:
            finish()
            context.close(promise: nil)
        }
    }
    func channelInactive(context: ChannelHandlerContext) { finish() }

    private func finish() {
        guard !done else { return }
        done = true
        if status != 0 { promise.succeed((status, body)) } else { promise.fail(AgentLinkError("the server closed the connection before answering the upgrade")) }
    }
}
