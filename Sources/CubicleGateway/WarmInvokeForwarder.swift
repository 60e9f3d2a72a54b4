import CubicleAgentCore
import CubicleAgentLink
import CubicleAuth
import CubicleSessions
import CubicleShells
import Dispatch
import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1

extension HTTPServerBuilder {
    /// The data plane's HTTP/1 connections: HTTP with InvokeAgentRuntime for live sessions forwarded on the
    /// event loop, and WebSocket upgrades (`LiveConnections`). `WarmInvokeForwarder` goes after Hummingbird's
    /// connection-state handler, so idle timeouts, keep-alive and graceful shutdown see every request,
    /// forwarded or not (Hummingbird's `additionalChannelHandlers` go before it, where a forwarded request
    /// would be closed under by an idle timeout or a graceful shutdown).
    public static func dataPlane(sessions: SessionManager, admission: Admission, shells: ShellRegistry, logger: Logger,
                                 idleTimeout: TimeAmount?) -> HTTPServerBuilder {
        let live = LiveConnections(sessions: sessions, admission: admission, shells: shells, logger: logger)
        let authenticator = admission.authenticator
        return .init { responder in
            UpgradableHTTPChannel(responder: responder, idleTimeout: idleTimeout, prepare: { channel in
                try channel.syncOptions?.setOption(.recvAllocator, value: AgentLink.bodyReadAllocator)
                LoopbackCongestion.apply(to: channel)
            }, handlers: { sync in
                // A runtime with a JWT authorizer takes the task road: its tokens are checked asynchronously.
                try sync.addHandler(WarmInvokeForwarder(authenticator: authenticator) { runtime, qualifier, owner, id in
                    sessions.liveSession(runtime: runtime, qualifier: qualifier, owner: owner, sessionID: id) { $0.authorizer == nil }
                })
            }, decide: { head, _ in await live.decide(head) })
        }
    }
}

/// InvokeAgentRuntime for a live session, forwarded straight from the client's channel to an idle agent
/// connection on the same event loop, part by part, with back-pressure both ways: no task, queue or thread
/// between the two sockets. Everything else (a session to start, no idle connection on this loop, a body
/// without Content-Length, anything invalid) goes on to Hummingbird and `DataPlane` untouched, so this is
/// only a shorter road for the common warm request and answers exactly as `DataPlane.invoke` would.
final class WarmInvokeForwarder: ChannelDuplexHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private enum Reading { case betweenRequests, passingOn, forwarding, verifying }

    /// A live session by runtime, owner and id, without a hop to the registry actor: the forwarder runs on
    /// the event loop, and a task switch per request is what the warm road exists to avoid.
    typealias Lookup = @Sendable (_ runtime: String, _ qualifier: String?, _ owner: String, _ sessionID: String) -> (any InvocationTarget)?
    private let lookup: Lookup
    /// With a principals file, a signed invocation is held here until its body's hash verifies the signature;
    /// only then does any of it go to the agent. Anything that does not verify, or is not permitted, is
    /// handed to the task road whole, which checks it again and answers the refusal.
    private let authenticator: Authenticator?
    private var held: Held?
    private struct Held {
        var head: HTTPRequest
        var carried: ForwardedInvoke.Carried
        var parts: [HTTPRequestPart] = []
        var hash = PayloadHash()
    }
    /// The next head goes to the task road whatever it is (a held request being handed on).
    private var bypass = false
    private var context: ChannelHandlerContext?
    private var reading = Reading.betweenRequests
    /// Requests handed on whose responses have not ended; a forwarded response must not interleave with them.
    private var responsesOwed = 0
    private var exchange: ForwardedInvoke?
    /// Parts of requests pipelined behind a forwarded one that is still being answered.
    private var queued = CircularBuffer<HTTPRequestPart>()
    private var reads = ReadGate()
    /// The last invocation handed on (its session may have been starting): once no response is owed, an
    /// agent link is opened on this loop for it, so the client's next invocation can be forwarded.
    private var warmingUp: (runtime: String, qualifier: String?, owner: String, id: String)?
    /// The last invocation target and the runtime it names: a client sends the same one again and again.
    private var lastTarget: (path: String, runtime: String, qualifier: String?)?

    init(authenticator: Authenticator? = nil, lookup: @escaping Lookup) {
        self.authenticator = (authenticator?.requiresSignatures ?? false) ? authenticator : nil
        self.lookup = lookup
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        // Not channelInactive: Hummingbird's connection-state handler, before this one, does not pass it on.
        context.channel.closeFuture.assumeIsolated().whenComplete { _ in
            self.exchange?.clientClosed()
            self.exchange = nil
        }
    }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = unwrapInboundIn(data)
        if !queued.isEmpty || (reading == .betweenRequests && exchange != nil) {
            queued.append(part)
            updateReads()
            return
        }
        handle(part, context)
    }

    private func handle(_ part: HTTPRequestPart, _ context: ChannelHandlerContext) {
        switch reading {
        case .betweenRequests:
            if case .head(let head) = part, responsesOwed == 0, !bypass {
                if let authenticator {
                    if let carried = signedInvocation(head) {
                        held = Held(head: head, carried: carried)
                        reading = .verifying
                        return
                    }
                } else if let forwarded = ForwardedInvoke.start(head, owner: SessionKey.anonymousOwner, lookup: lookup, client: context, forwarder: self) {
                    exchange = forwarded
                    reading = .forwarding
                    return
                }
            }
            if case .head(let head) = part {
                bypass = false
                reading = .passingOn
                responsesOwed += 1
                if authenticator == nil, let (runtime, qualifier, id) = invocation(head) { warmingUp = (runtime, qualifier, SessionKey.anonymousOwner, id) }
            }
            context.fireChannelRead(wrapInboundOut(part))
        case .verifying:
            // In place (optional chaining): a copy would copy the hash's state with every part.
            if case .body(let buffer) = part { buffer.withUnsafeReadableBytes { held?.hash.update(bufferPointer: $0) } }
            held?.parts.append(part)
            guard case .end = part, let h = held else { return }
            held = nil
            reading = .betweenRequests
            verified(h, context)
        case .passingOn:
            if case .end = part { reading = .betweenRequests }
            context.fireChannelRead(wrapInboundOut(part))
        case .forwarding:
            if case .end = part { reading = .betweenRequests }
            exchange?.clientSent(part)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        exchange?.clientReadComplete()
        context.fireChannelReadComplete()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) {
            responsesOwed -= 1
            if responsesOwed == 0, let (runtime, qualifier, owner, id) = warmingUp {
                warmingUp = nil
                lookup(runtime, qualifier, owner, id)?.agent.warm(on: context.eventLoop)
            }
        }
        context.write(data, promise: promise)
    }

    func read(context: ChannelHandlerContext) { reads.read(context) }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        exchange?.clientWritabilityChanged()
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        exchange?.clientClosed()
        exchange = nil
        context.fireErrorCaught(error)
    }

    /// A signed InvokeAgentRuntime the warm road may carry once verified: small enough to hold, signed
    /// (not a bearer token). Anything else goes to the task road.
    private func signedInvocation(_ head: HTTPRequest) -> ForwardedInvoke.Carried? {
        guard let carried = ForwardedInvoke.carriable(head, maxLength: SpooledBody.memoryLimit, forwarder: self),
              head.headerFields[.authorization].map({ !$0.hasPrefix("Bearer ") }) ?? false else { return nil }
        return carried
    }

    /// The held request's signature checked whole, head and body together once the body has come: the
    /// verification's code and data stay hot in one pass (split around the body's parts, it cost more).
    private func verify(_ h: Held, _ authenticator: Authenticator) -> Caller? {
        guard let target = h.head.path else { return nil }
        let question = target.utf8.firstIndex(of: UInt8(ascii: "?"))
        let path = question.map { String(target[..<$0]) } ?? target
        let query = question.map { String(target[target.index(after: $0)...]) } ?? ""
        guard let check = try? authenticator.begin(method: "POST", path: path, query: query, authority: h.head.authority,
                                                   headers: Admission.lowercased(h.head.headerFields)) else { return nil }
        return try? check.verify(payloadHash: h.hash.finish())
    }

    /// A held request whose body has all come: forwarded if its signature verifies, it is permitted and its
    /// session is live with an idle link here; otherwise handed on whole, in order, to the task road.
    private func verified(_ h: Held, _ context: ChannelHandlerContext) {
        if let authenticator, let caller = verify(h, authenticator) {
            let (_, runtime, qualifier, id) = h.carried
            let arn = authenticator.runtimeARN(runtime)
            let permitted = authenticator.allows(caller, "bedrock-agentcore:InvokeAgentRuntime", arn)
                && (h.head.headerFields[.agentCoreUserID] == nil || authenticator.allows(caller, "bedrock-agentcore:InvokeAgentRuntimeForUser", arn))
            if permitted, let forwarded = ForwardedInvoke.start(h.head, h.carried, owner: caller.owner, lookup: lookup, client: context, forwarder: self) {
                exchange = forwarded
                reading = .forwarding
                for part in h.parts { handle(part, context) }
                return
            }
            if permitted { warmingUp = (runtime, qualifier, caller.owner, id) }
        }
        bypass = true
        handle(.head(h.head), context)
        for part in h.parts { handle(part, context) }
    }

    /// The runtime and session of a valid InvokeAgentRuntime head; nil for anything else.
    func invocation(_ head: HTTPRequest) -> (runtime: String, qualifier: String?, id: String)? {
        guard head.method == .post, let target = head.path,
              let id = try? Validate.sessionID(head.headerFields[.agentCoreSessionID]) else { return nil }
        if let last = lastTarget, last.path == target { return (last.runtime, last.qualifier, id) }
        let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        guard case .invoke(let address)? = try? Route.parse(method: "POST", path: String(parts[0]), query: parts.count > 1 ? String(parts[1]) : nil)
        else { return nil }
        lastTarget = (target, address.name, address.qualifier)
        return (address.name, address.qualifier, id)
    }

    /// Reads stop while the agent cannot take more of the request, and while pipelined requests wait.
    func updateReads() { reads.hold(!queued.isEmpty || (exchange?.agentIsFull ?? false), context) }

    /// The forwarded exchange is over; requests that queued behind it are handled now, in order.
    func exchangeEnded() {
        exchange = nil
        guard let context else { return }
        let replaying = !queued.isEmpty
        while !queued.isEmpty, !(reading == .betweenRequests && exchange != nil) {
            handle(queued.removeFirst(), context)
        }
        if replaying { context.fireChannelReadComplete() }
        exchange?.clientReadComplete()
        updateReads()
    }
}

/// One forwarded invocation: the client's request parts go to the agent link, the agent's response parts
/// to the client, both on the client's event loop. What is sent and answered is `Invocation`'s.
final class ForwardedInvoke: AgentLinkSink, @unchecked Sendable {
    private let forwarder: WarmInvokeForwarder
    private let client: ChannelHandlerContext
    private let link: AgentLink
    private let invocation: Invocation
    private var requestDone = false
    /// Whether the agent's connection may carry another request, once its head has come.
    private var responseKeepAlive: Bool?
    private var responseDone = false
    /// The exchange has completed or failed; parts still arriving from the client are dropped.
    private var over = false
    private var answeredBeforeRequestEnded = false
    /// Failed before the response began, and AgentCore's error has been written.
    private var errorAnswered = false
    /// AgentCore's request time limit: the synchronous one until the response begins, then the one for its
    /// kind (a stream's for text/event-stream), both from the request's start.
    private var timeLimit: Scheduled<Void>?
    private let begun = NIODeadline.now()

    /// Forwards `head` when it is an InvokeAgentRuntime this road can carry; nil hands it on.
    static func start(_ head: HTTPRequest, owner: String, lookup: WarmInvokeForwarder.Lookup, client: ChannelHandlerContext,
                      forwarder: WarmInvokeForwarder) -> ForwardedInvoke? {
        let started = DispatchTime.now().uptimeNanoseconds
        guard let carried = carriable(head, maxLength: Limits.maxPayloadBytes, forwarder: forwarder) else { return nil }
        return start(head, carried, owner: owner, started: started, lookup: lookup, client: client, forwarder: forwarder)
    }

    /// What the warm road needs of a head it can carry: its declared length, runtime and session.
    typealias Carried = (length: Int, runtime: String, qualifier: String?, id: String)

    /// An InvokeAgentRuntime head this road can carry, or nil. A client asking to close after this
    /// response is left to Hummingbird, which closes it.
    static func carriable(_ head: HTTPRequest, maxLength: Int, forwarder: WarmInvokeForwarder) -> Carried? {
        let fields = head.headerFields
        guard fields[.transferEncoding] == nil, fields[.expect] == nil, fields[.connection] == nil,
              let length = fields[.contentLength].flatMap({ Int($0) }), (0...maxLength).contains(length),
              let (runtime, qualifier, id) = forwarder.invocation(head) else { return nil }
        return (length, runtime, qualifier, id)
    }

    /// Forwards a head `carriable` accepted (a held, verified one is not checked twice).
    static func start(_ head: HTTPRequest, _ carried: Carried, owner: String, started: UInt64 = DispatchTime.now().uptimeNanoseconds,
                      lookup: WarmInvokeForwarder.Lookup, client: ChannelHandlerContext, forwarder: WarmInvokeForwarder) -> ForwardedInvoke? {
        let (length, runtime, qualifier, id) = carried
        let fields = head.headerFields
        guard let target = lookup(runtime, qualifier, owner, id) else { return nil }
        guard let link = target.agent.take(on: client.eventLoop) else {
            target.agent.warm(on: client.eventLoop)
            return nil
        }
        Telemetry.forwardedOnEventLoop(runtime: runtime)
        let invocation = Invocation(target: target, sessionID: id, requestID: RequestID.make(), requestHeaders: fields, started: started)
        let forwarded = ForwardedInvoke(forwarder: forwarder, client: client, link: link, invocation: invocation)
        forwarded.limit(at: forwarded.begun + .seconds(Int64(target.runtime.limits.requestSeconds)))
        link.attach(forwarded)
        // Not flushed: the body usually came in the same read, and goes out in the same write.
        link.write(.head(invocation.agentHead(declaredLength: length)))
        return forwarded
    }

    private init(forwarder: WarmInvokeForwarder, client: ChannelHandlerContext, link: AgentLink, invocation: Invocation) {
        self.forwarder = forwarder
        self.client = client
        self.link = link
        self.invocation = invocation
    }

    private var inFlight: InFlight { invocation.inFlight }

    private func limit(at deadline: NIODeadline) {
        timeLimit?.cancel()
        timeLimit = client.eventLoop.scheduleTask(deadline: deadline) { [self] in self.timedOut() }
    }

    /// Before the response began: AgentCore's error; after: the response is cut.
    private func timedOut() {
        guard !over else { return }
        let limits = invocation.target.runtime.limits
        if responseKeepAlive == nil {
            agentFailed(AgentCoreError.requestTimeLimit(limits.requestSeconds))
        } else {
            agentFailed(AgentLinkError("the response passed the runtime's request time limit"))
        }
    }

    /// The request is not finished and the agent's socket buffer is full.
    var agentIsFull: Bool { !over && !requestDone && !link.isWritable }

    func clientSent(_ part: HTTPRequestPart) {
        switch part {
        case .body(let buffer):
            guard !over else { return }
            inFlight.received(buffer.readableBytes)
            link.write(.body(.byteBuffer(buffer)))
            if !link.isWritable { forwarder.updateReads() }
        case .end:
            requestDone = true
            if over {
                // Failed before the request ended, its error already answered: the exchange ends here.
                if errorAnswered { forwarder.exchangeEnded() }
                return
            }
            link.write(.end(nil))
            link.flush()
            finishIfDone()
        case .head:
            break
        }
    }

    func clientReadComplete() { if !over { link.flush() } }

    func clientWritabilityChanged() { if !over { link.holdReads(!client.channel.isWritable) } }

    /// The client went away: closing the agent's connection is how the agent learns its request was cancelled.
    func clientClosed() {
        guard !over else { return }
        over = true
        timeLimit?.cancel()
        link.detach()
        link.close()
        inFlight.abort()
    }

    // MARK: AgentLinkSink

    func agentLink(_ link: AgentLink, received part: HTTPClientResponsePart) {
        guard !over else { return }
        switch part {
        case .head(let head):
            guard head.status.code >= 200 else { return }
            guard responseKeepAlive == nil else { return agentFailed(AgentLinkError("agent sent a second response head")) }
            let client: (status: HTTPResponse.Status, fields: HTTPFields)
            do { client = try invocation.clientHead(head) } catch { return agentFailed(error) }
            responseKeepAlive = head.isKeepAlive
            if head.headers.first(name: "content-type")?.lowercased().hasPrefix("text/event-stream") == true {
                limit(at: begun + .seconds(Int64(invocation.target.runtime.limits.streamSeconds)))
            }
            inFlight.attach(status: client.status.code, abort: {})
            var fields = client.fields
            if let length = head.headers.first(name: "content-length") { fields[.contentLength] = length }
            self.client.write(NIOAny(HTTPResponsePart.head(HTTPResponse(status: client.status, headerFields: fields))), promise: nil)
        case .body(let buffer):
            guard responseKeepAlive != nil else { return agentFailed(AgentLinkError("agent sent a body before its response head")) }
            inFlight.sent(buffer.readableBytes)
            client.write(NIOAny(HTTPResponsePart.body(buffer)), promise: nil)
            if !client.channel.isWritable { link.holdReads(true) }
        case .end:
            guard responseKeepAlive != nil else { return agentFailed(AgentLinkError("agent ended a response it never began")) }
            client.writeAndFlush(NIOAny(HTTPResponsePart.end(nil)), promise: nil)
            responseDone = true
            answeredBeforeRequestEnded = !requestDone
            finishIfDone()
        }
    }

    func agentLinkReadComplete(_ link: AgentLink) { if !over { client.flush() } }

    func agentLinkWritabilityChanged(_ link: AgentLink) { forwarder.updateReads() }

    func agentLink(_ link: AgentLink, failed error: any Error) { agentFailed(error) }

    private func finishIfDone() {
        guard requestDone, responseDone, !over else { return }
        over = true
        timeLimit?.cancel()
        inFlight.complete()
        link.detach()
        let reusable = !answeredBeforeRequestEnded && responseKeepAlive == true
        if reusable { invocation.target.agent.giveBack(link) } else { link.close() }
        forwarder.exchangeEnded()
    }

    /// The agent failed the request. Mid-response the client can only learn it from the connection
    /// closing; before the response began it gets AgentCore's error, naming why the session ended if it did.
    private func agentFailed(_ error: any Error) {
        guard !over else { return }
        over = true
        timeLimit?.cancel()
        link.detach()
        link.close()
        inFlight.abort()
        if responseKeepAlive != nil {
            // What has come of the response goes out first, as on the task road: the close waits for the
            // writes before it (an empty part completes in order and frames nothing). Closing at once drops
            // what the client's socket has not taken yet, bytes the agent did send.
            let written = client.eventLoop.makePromise(of: Void.self)
            client.writeAndFlush(NIOAny(HTTPResponsePart.body(ByteBuffer())), promise: written)
            let channel = client.channel
            written.futureResult.whenComplete { _ in channel.close(promise: nil) }
            return
        }
        let invocation = self.invocation
        // The cause may take a moment to be known (init reports the agent's exit after the link closes).
        client.eventLoop.makeFutureWithTask { await invocation.failure(error) }.assumeIsolated().whenSuccess { failure in
            Invocation.countRefusal(runtime: invocation.target.runtime.name, status: failure.status, started: invocation.started)
            self.answer(failure)
        }
    }

    private func answer(_ error: AgentCoreError) {
        guard client.channel.isActive else { return }
        var fields = Invocation.errorHeaders(error, requestID: invocation.requestID)
        fields[.contentLength] = String(error.body.count)
        let head = HTTPResponse(status: .init(code: error.status), headerFields: fields)
        client.write(NIOAny(HTTPResponsePart.head(head)), promise: nil)
        client.write(NIOAny(HTTPResponsePart.body(ByteBuffer(bytes: error.body))), promise: nil)
        client.writeAndFlush(NIOAny(HTTPResponsePart.end(nil)), promise: nil)
        errorAnswered = true
        // The rest of the request body, if any, is read and dropped before the next request is taken.
        if requestDone { forwarder.exchangeEnded() }
    }
}
