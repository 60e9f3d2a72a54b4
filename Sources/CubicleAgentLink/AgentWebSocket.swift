import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// A WebSocket to the agent's `/ws`, over a socket from the same connector as every other link, and known
/// to the transport like them, so the session's end closes it.
public enum AgentWebSocket: Sendable {
    /// The agent took the upgrade: frames both ways, and the response's subprotocol, if it chose one.
    case open(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, subprotocol: String?)
    /// The agent answered the upgrade with this status instead (an agent without a `/ws` route: 404).
    case refused(status: UInt)

    /// Frames over this size, either way, are refused (close 1009): AgentCore's limit.
    public static let maxFrameBytes = 64 << 10
}

extension AgentTransport {
    /// Opens a WebSocket to the agent: `head` is the upgrade request (GET, the path, the headers the agent
    /// is to see); the upgrade's own headers are added here.
    public func openWebSocket(_ head: HTTPRequestHead) async throws -> AgentWebSocket {
        guard !isClosed else { throw AgentLinkError("the session is ending") }
        let fd = try await connector()
        let loop = group.any()
        let negotiated = try await ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .withConnectedSocket(fd) { channel in
                channel.eventLoop.makeCompletedFuture {
                    // Closed with the session, as every link is.
                    try self.track(channel)
                    // Without NIO's automatic error handling a frame over the limit fails the inbound stream,
                    // so the relay learns why the agent's side ended.
                    let upgrader = NIOTypedWebSocketClientUpgrader<Negotiated>(maxFrameSize: AgentWebSocket.maxFrameBytes,
                                                                                enableAutomaticErrorHandling: false) { channel, response in
                        channel.eventLoop.makeCompletedFuture {
                            let frames = try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(wrappingChannelSynchronously: channel)
                            return .open(frames, subprotocol: response.headers.first(name: "sec-websocket-protocol"))
                        }
                    }
                    let configuration = NIOTypedHTTPClientUpgradeConfiguration<Negotiated>(
                        upgradeRequestHead: head, upgraders: [upgrader],
                        notUpgradingCompletionHandler: { channel in
                            // The response comes through only once this has returned: its status is all that is
                            // kept, the connection closed after it.
                            let status = RefusedUpgradeStatus(promise: channel.eventLoop.makePromise())
                            return channel.eventLoop.makeCompletedFuture {
                                try channel.pipeline.syncOperations.addHandler(status)
                                return .refused(status.promise.futureResult)
                            }
                        })
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(configuration: .init(upgradeConfiguration: configuration))
                }
            }
        switch try await negotiated.get() {
        case .open(let frames, let subprotocol): return .open(frames, subprotocol: subprotocol)
        case .refused(let status): return .refused(status: try await status.get())
        }
    }
}

/// What the upgrade handler settles on; a refusal's status comes after it.
private enum Negotiated: Sendable {
    case open(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, subprotocol: String?)
    case refused(EventLoopFuture<UInt>)
}

/// The status of a response to an upgrade the agent did not take; the connection is closed after it.
private final class RefusedUpgradeStatus: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<UInt>
    init(promise: EventLoopPromise<UInt>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let head) = unwrapInboundIn(data) {
            promise.succeed(head.status.code)
            context.close(promise: nil)
        }
    }
    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(AgentLinkError("the agent closed the connection before answering the upgrade"))
    }
}
