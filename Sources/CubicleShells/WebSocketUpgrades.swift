import CubicleAgentLink
import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOWebSocket
import Synchronization

/// What becomes of a connection's first request when it asks for a WebSocket.
public enum UpgradeDecision: Sendable {
    /// Not a WebSocket route: the request goes on as HTTP.
    case notOurs
    /// Refused with this response; the connection ends after it.
    case refused(status: Int, headers: HTTPFields, body: [UInt8])
    /// Upgraded with these headers; `serve` runs for the life of the socket, `abandon` if the 101 never
    /// goes out (the client left while the far end was being opened).
    case accepted(HTTPHeaders, serve: @Sendable (NIOAsyncChannel<WebSocketFrame, WebSocketFrame>) async -> Void, abandon: @Sendable () -> Void)
}

/// Hummingbird's HTTP/1 child channel, with a WebSocket upgrade possible on a connection's first request
/// (NIO's typed upgrader holds it while `decide` runs, then either the socket becomes a WebSocket or the
/// HTTP pipeline is set up and the request goes on through it). The data plane and the admin socket both
/// serve through it; `handlers` adds what a listener puts after the connection-state handler.
public struct UpgradableHTTPChannel: ServerChildChannel, HTTPChannelHandler {
    public enum Connection: Sendable {
        case http(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        case webSocket(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, serve: @Sendable (NIOAsyncChannel<WebSocketFrame, WebSocketFrame>) async -> Void)
        case refused(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>, status: Int, headers: HTTPFields, body: [UInt8])
    }
    public struct Value: ServerChildChannelValue {
        let connection: EventLoopFuture<Connection>
        public let channel: any Channel
    }
    public let responder: HTTPChannelHandler.Responder
    let idleTimeout: TimeAmount?
    let prepare: @Sendable (any Channel) throws -> Void
    let handlers: @Sendable (ChannelPipeline.SynchronousOperations) throws -> Void
    let decide: @Sendable (HTTPRequestHead, any Channel) async -> UpgradeDecision

    public init(responder: @escaping HTTPChannelHandler.Responder, idleTimeout: TimeAmount?,
                prepare: @escaping @Sendable (any Channel) throws -> Void = { _ in },
                handlers: @escaping @Sendable (ChannelPipeline.SynchronousOperations) throws -> Void = { _ in },
                decide: @escaping @Sendable (HTTPRequestHead, any Channel) async -> UpgradeDecision) {
        self.responder = responder
        self.idleTimeout = idleTimeout
        self.prepare = prepare
        self.handlers = handlers
        self.decide = decide
    }

    public func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            try prepare(channel)
            // Until its first request head is whole, nothing else times a connection out (Hummingbird's
            // idle handler joins after it): an idle or trickling client is closed at the same deadline.
            let firstHead = FirstHeadDeadline(idleTimeout)
            try channel.pipeline.syncOperations.addHandler(firstHead)
            let decided = NIOLoopBoundBox<UpgradeDecision?>(nil, eventLoop: channel.eventLoop)
            let decide = self.decide
            let upgrader = NIOTypedWebSocketServerUpgrader<Connection>(
                maxFrameSize: WebSocketClient.maxFrameBytes,
                shouldUpgrade: { channel, head in
                    firstHead.cancel(channel)
                    let promise = channel.eventLoop.makePromise(of: UpgradeDecision.self)
                    promise.completeWithTask { await decide(head, channel) }
                    return promise.futureResult.map { decision in
                        // The client left while this was decided: what was opened for it is let go now
                        // (once the decision is kept, the close below lets it go instead).
                        if case .accepted(_, _, let abandon) = decision, !channel.isActive {
                            abandon()
                            return nil
                        }
                        decided.value = decision
                        if case .accepted(let headers, _, _) = decision { return headers }
                        return nil
                    }
                },
                upgradePipelineHandler: { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        guard case .accepted(_, let serve, _)? = decided.value else { throw ChannelError.inappropriateOperationForState }
                        decided.value = nil
                        return .webSocket(try NIOAsyncChannel(wrappingChannelSynchronously: channel), serve: serve)
                    }
                })
            // An upgrade accepted whose 101 never went out (the client left after the decision): what was
            // opened for it is let go.
            channel.closeFuture.whenComplete { _ in
                if case .accepted(_, _, let abandon)? = decided.value { decided.value = nil; abandon() }
            }
            var configuration = NIOUpgradableHTTPServerPipelineConfiguration<Connection>(upgradeConfiguration: .init(
                upgraders: [upgrader],
                notUpgradingCompletionHandler: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        firstHead.cancel(channel)
                        let sync = channel.pipeline.syncOperations
                        try sync.addHandler(HTTP1ToHTTPServerCodec(secure: false))
                        if case .refused(let status, let headers, let body)? = decided.value {
                            return .refused(try NIOAsyncChannel(wrappingChannelSynchronously: channel), status: status, headers: headers, body: body)
                        }
                        try sync.addHandler(HTTPConnectionStateHandler(idleTimeout: idleTimeout.map { .init($0) }, logger: logger))
                        try sync.addHandler(ClientPresence.Watch())
                        try handlers(sync)
                        return .http(try NIOAsyncChannel(wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true)))
                    }
                }))
            // Hummingbird's HTTP1Channel settings.
            configuration.enablePipelining = false
            configuration.enableErrorHandling = false
            configuration.enableResponseHeaderValidation = false
            configuration.decoderConfiguration.maxHeaderFieldCount = 1000
            return Value(connection: try channel.pipeline.syncOperations.configureUpgradableHTTPServerPipeline(configuration: configuration), channel: channel)
        }
    }

    public func handle(value: Value, logger: Logger) async {
        let connection: Connection
        do { connection = try await value.connection.get() } catch {
            logger.debug("connection set-up failed: \(error)")
            return
        }
        switch connection {
        case .http(let http):
            await handleHTTP(asyncChannel: http, logger: logger)
        case .webSocket(let socket, let serve):
            await serve(socket)
        case .refused(let http, let status, let headers, let body):
            try? await http.executeThenClose { _, outbound in
                var fields = headers
                fields[.connection] = "close"
                fields[.contentLength] = String(body.count)
                try await outbound.write(contentsOf: [.head(HTTPResponse(status: .init(code: status), headerFields: fields)),
                                                      .body(ByteBuffer(bytes: body)), .end(nil)])
            }
        }
    }
}

public enum WebSocketClose {
    /// A close frame with `code` and a reason (cut to fit a control frame); `masked` from a client's side.
    public static func frame(_ code: UInt16, _ reason: String, masked: Bool = false) -> WebSocketFrame {
        var data = ByteBuffer()
        data.writeInteger(code)
        data.writeString(String(reason.utf8.prefix(120)) ?? "")
        return WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: masked ? .random() : nil, data: data)
    }

    /// The code of a close frame, if it has one.
    public static func code(of frame: WebSocketFrame) -> UInt16? {
        var data = frame.unmaskedData
        return data.readInteger(as: UInt16.self)
    }
}

/// Closes a connection whose first request head has not come whole within the idle timeout; cancelled
/// (and gone from the pipeline) once it has.
final class FirstHeadDeadline: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = NIOAny
    private let timeout: TimeAmount?
    private var timer: Scheduled<Void>?
    init(_ timeout: TimeAmount?) { self.timeout = timeout }

    func handlerAdded(context: ChannelHandlerContext) {
        guard let timeout else { return }
        let channel = context.channel
        timer = context.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
    }

    /// On the channel's event loop.
    func cancel(_ channel: any Channel) {
        timer?.cancel()
        timer = nil
        channel.pipeline.syncOperations.removeHandler(self, promise: nil)
    }
}

/// Events in the last second, for a per-second cap.
public struct RateWindow: Sendable {
    let limit: Int
    private var times: [UInt64] = []
    private var head = 0
    public init(limit: Int) { self.limit = limit; times.reserveCapacity(limit) }

    /// Records an event at `now` (nanoseconds); false if it makes more than `limit` within a second.
    public mutating func admit(now: UInt64) -> Bool {
        if times.count < limit {
            times.append(now)
            return true
        }
        // A ring of the last `limit` events; the oldest is at `head`.
        guard now - times[head] >= 1_000_000_000 else { return false }
        times[head] = now
        head = (head + 1) % limit
        return true
    }
}

/// The request context of both listeners: it keeps the connection's channel, so a request can ask who is
/// on the other end (the admin socket's peer credentials) or whether they are still there (`ClientPresence`).
public struct ConnectionContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    public let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Whether the client of an HTTP connection is still there, for work that runs quietly on its behalf (a
/// command that prints nothing learns nothing from writes). Gone: it closed its side (EOF; the server allows
/// half-closure, so the channel itself stays up) or the connection closed.
public final class ClientPresence: Sendable {
    private let left = Atomic<Bool>(false)
    public var hasLeft: Bool { left.load(ordering: .relaxed) }
    /// `hasLeft`, for code that knows nothing of connections.
    public var probe: @Sendable () -> Bool { { [self] in hasLeft } }

    /// The presence of `channel`'s client, if the channel is one of `UpgradableHTTPChannel`'s HTTP connections.
    public static func of(_ channel: any Channel) async -> ClientPresence? {
        try? await channel.eventLoop.submit { try channel.pipeline.syncOperations.handler(type: Watch.self).presence }.get()
    }

    /// In the pipeline after Hummingbird's connection-state handler, which passes user events on (not
    /// channelInactive, hence the close future).
    final class Watch: ChannelInboundHandler, RemovableChannelHandler {
        typealias InboundIn = HTTPRequestPart
        typealias InboundOut = HTTPRequestPart
        let presence = ClientPresence()

        func handlerAdded(context: ChannelHandlerContext) {
            context.channel.closeFuture.whenComplete { [presence] _ in presence.left.store(true, ordering: .relaxed) }
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .inputClosed? = event as? ChannelEvent { presence.left.store(true, ordering: .relaxed) }
            context.fireUserInboundEventTriggered(event)
        }
    }
}
