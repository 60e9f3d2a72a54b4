import AsyncAlgorithms
import CubicleAgentCore
import CubicleAgentLink
import CubicleAuth
import CubicleControlPlane
import CubicleRuntimes
import CubicleSessions
import CubicleShells
import Dispatch
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import Prometheus
import Synchronization

/// The AgentCore data plane: routes each request, validates it, finds or makes its session and streams
/// between the client and the agent. Errors leave here only as AgentCore error shapes.
public struct DataPlane: HTTPResponder {
    /// With the connection's channel, so a command can tell whether its client is still there.
    public typealias Context = ConnectionContext

    let sessions: SessionManager
    let group: any EventLoopGroup
    let logger: Logger
    /// The registry behind the swift-metrics backend cubicled bootstraps.
    let prometheus: PrometheusCollectorRegistry
    /// The control plane on the same listener; nil: its routes are refused (see `controlPlaneRefusal`).
    let controlPlane: ControlPlane?
    /// Why the control plane does not answer here, if it does not: until callers are authenticated, it
    /// changes what runs as which role only for this host's own users, on loopback.
    let controlPlaneRefusal: String?
    /// Who may call, checked for every request but /ping and /metrics.
    let admission: Admission

    public init(sessions: SessionManager, group: any EventLoopGroup, logger: Logger, prometheus: PrometheusCollectorRegistry,
                admission: Admission, controlPlane: ControlPlane? = nil, controlPlaneRefusal: String? = nil) {
        self.admission = admission
        self.sessions = sessions
        self.group = group
        self.logger = logger
        self.prometheus = prometheus
        self.controlPlane = controlPlane
        self.controlPlaneRefusal = controlPlaneRefusal
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        let started = DispatchTime.now().uptimeNanoseconds
        let requestID = RequestID.make()
        do {
            let target = request.head.path ?? "/"
            let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            let path = String(parts[0]), query = parts.count > 1 ? String(parts[1]) : nil
            guard let route = try Self.dataRoute(method: request.method.rawValue, path: path, query: query) else {
                // Not the data plane's: the control plane's, or nothing (Route's own error says which).
                var response = try await controlPlane(request, path: path, query: query ?? "")
                response.headers[.xAmznRequestID] = requestID
                return response
            }
            var response: Response
            switch route {
            case .ping:
                response = Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: #"{"status":"Healthy"}"#)))
            case .metrics:
                response = await metrics()
            case .invoke(let address):
                do {
                    response = try await invoke(request, address, path: path, query: query ?? "", requestID: requestID)
                } catch {
                    // A name from the client labels a metric only if it is configured, so made-up names cannot
                    // grow the registry without bound.
                    let runtime = sessions.catalog.contains(address.name) ? address.name : "unknown"
                    Invocation.countRefusal(runtime: runtime, status: error.status, started: started)
                    throw error
                }
            case .stopSession(let address):
                response = try await stop(request, address, path: path, query: query ?? "")
            case .command(let address):
                response = try await command(request, address, path: path, query: query ?? "", channel: context.channel)
            case .agentCard(let address):
                response = try await agentCard(request, address, path: path, query: query ?? "", requestID: requestID)
            case .webSocket, .shell:
                // Upgrades are taken before a request gets here (DataPlaneChannel): this one did not ask for
                // one, or came after another request on its connection.
                throw AgentCoreError(.validation, "\(path) is a WebSocket endpoint: open it with a WebSocket upgrade (GET with Upgrade: websocket) as the first request of a connection")
            }
            response.headers[.xAmznRequestID] = requestID
            return response
        } catch let error as AgentCoreError {
            return Self.errorResponse(error, requestID: requestID)
        }
    }

    /// The data plane's route; nil when no data-plane route matches and the control plane may have one.
    static func dataRoute(method: String, path: String, query: String?) throws(AgentCoreError) -> Route? {
        do { return try Route.parse(method: method, path: path, query: query) } catch {
            if error.kind == .resourceNotFound { return nil }
            throw error
        }
    }

    /// A `bedrock-agentcore-control` operation.
    private func controlPlane(_ request: Request, path: String, query: String) async throws(AgentCoreError) -> Response {
        guard let route = try ControlRoute.parse(method: request.method.rawValue, path: path) else {
            throw AgentCoreError(.resourceNotFound, "No operation matches \(request.method.rawValue) \(String(path.prefix(200)))")
        }
        let credential = try admission.credential(request.head, path: path, query: query)
        guard let controlPlane else {
            throw AgentCoreError(.accessDenied, controlPlaneRefusal ?? "The control plane is not served by this cubicled")
        }
        let body = try await Self.collect(request.body, limit: ControlPlane.maxBodyBytes)
        _ = try admission.controlCaller(credential, payloadHash: Self.hash(body), action: route.action, resource: route.resource(admission.authenticator))
        return await controlPlane.serve(method: request.method.rawValue, path: path, query: query, body: body)!.response
    }

    /// Prometheus text: everything Telemetry records, with live sessions by state counted now.
    private func metrics() async -> Response {
        var counts: [String: Int] = [:]
        for s in sessions.liveSessions { counts[s.lifecycle.state.name, default: 0] += 1 }
        Telemetry.liveSessions(counts)
        if let storage = sessions.storage {
            let volumes = await storage.list()
            Telemetry.sessionStorage(volumes: volumes.count, bytes: volumes.reduce(0) { $0 + $1.bytes })
        }
        var bytes: [UInt8] = []
        prometheus.emit(into: &bytes)
        return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    static func errorResponse(_ error: AgentCoreError, requestID: String) -> Response {
        Response(status: .init(code: error.status), headers: Invocation.errorHeaders(error, requestID: requestID),
                 body: .init(byteBuffer: ByteBuffer(bytes: error.body)))
    }

    private func sessionID(_ request: Request) throws(AgentCoreError) -> String {
        try Validate.sessionID(request.headers[.agentCoreSessionID])
    }

    /// What new sessions of `address` get: its authorizer decides how callers are checked.
    private func config(_ address: RuntimeAddress) throws(AgentCoreError) -> RuntimeConfig {
        do { return try sessions.resolve(address.name, qualifier: address.qualifier) } catch { throw AgentCoreError(error) }
    }

    static func hash(_ bytes: [UInt8]) -> String {
        var h = PayloadHash()
        h.update(bytes)
        return h.finish()
    }

    // MARK: - InvokeAgentRuntime

    /// The task road: for a session to find or start, or when the warm road does not apply (no idle link on
    /// this loop, a body without Content-Length). Answers as `ForwardedInvoke` does, through `Invocation`.
    private func invoke(_ request: Request, _ runtime: RuntimeAddress, path: String, query: String, requestID: String) async throws(AgentCoreError) -> Response {
        let credential = try admission.credential(request.head, path: path, query: query)
        let declaredLength = request.headers[.contentLength].flatMap { Int($0) }
        try Validate.payloadLength(declaredLength)
        // A signature covers the body: it is read and hashed whole (spooled past a megabyte) before the
        // agent may see any of it.
        let spooled: SpooledBody?
        if case .signature = credential {
            spooled = try await SpooledBody.read(request.body, limit: Limits.maxPayloadBytes, directory: admission.spoolDirectory)
        } else {
            spooled = nil
        }
        var actions = ["bedrock-agentcore:InvokeAgentRuntime"]
        if request.headers[.agentCoreUserID] != nil { actions.append("bedrock-agentcore:InvokeAgentRuntimeForUser") }
        let caller = try await admission.caller(credential, payloadHash: spooled?.hash, runtime: runtime.name, actions: actions) { () throws(AgentCoreError) in try config(runtime) }
        let id = try sessionID(request)
        let session = try await sessions.session(runtime, owner: caller.owner, sessionID: id)
        let invocation = Invocation(target: session, sessionID: id, requestID: requestID, requestHeaders: request.headers)
        let inFlight = invocation.inFlight
        let body = request.body
        let agentRequest = AgentRequest(head: invocation.agentHead(declaredLength: declaredLength), bodyLength: declaredLength) { writer in
            if let spooled {
                try await spooled.write(to: writer) { inFlight.received($0) }
                return
            }
            var total = 0
            for try await buffer in body {
                total += buffer.readableBytes
                inFlight.received(buffer.readableBytes)
                guard total <= Limits.maxPayloadBytes else { throw AgentCoreError.invalidField("payload", "Member must have length less than or equal to \(Limits.maxPayloadBytes)") }
                try await writer.write(buffer)
            }
        }
        let agentResponse: AgentResponse
        let head: (status: HTTPResponse.Status, fields: HTTPFields)
        // AgentCore's request time limits: the synchronous limit until the response begins; then the whole
        // exchange ends at the limit for its kind (a stream's, for text/event-stream).
        let limits = session.runtime.limits
        let begun = ContinuousClock.now
        do {
            agentResponse = try await Self.within(seconds: limits.requestSeconds) { try await session.agent.send(agentRequest) }
            do { head = try invocation.clientHead(agentResponse.head) } catch {
                agentResponse.abort()
                throw error
            }
        } catch {
            throw await invocation.failure(error)
        }
        inFlight.attach(status: head.status.code, abort: agentResponse.abort)
        let streamed = agentResponse.head.headers.first(name: "content-type")?.lowercased().hasPrefix("text/event-stream") ?? false
        let deadline = begun + .seconds(streamed ? limits.streamSeconds : limits.requestSeconds)
        // Past it the response is cut: the client sees its connection end, the agent its request cancelled.
        let cutter = Task { [agentResponse] in
            try? await Task.sleep(until: deadline, clock: .continuous)
            if !Task.isCancelled { agentResponse.abort() }
        }
        if let length = agentResponse.head.headers.first(name: "content-length").flatMap({ Int($0) }), length <= Self.wholeResponseLimit {
            defer { cutter.cancel() }
            // Small and of known length: read whole, so head and body reach the client in one write.
            var whole = ByteBuffer()
            do {
                for try await var buffer in agentResponse.body {
                    inFlight.sent(buffer.readableBytes)
                    whole.writeBuffer(&buffer)
                }
            } catch {
                inFlight.abort()
                throw await invocation.failure(error)
            }
            inFlight.complete()
            return Response(status: head.status, headers: head.fields, body: .init(byteBuffer: whole))
        }
        return Response(status: head.status, headers: head.fields, body: Self.stream(agentResponse, inFlight, cutter: cutter))
    }

    /// `operation`, or the synchronous request limit's error once `seconds` have passed (the operation is
    /// cancelled, which abandons the exchange with the agent).
    static func within<T: Sendable>(seconds: Int, _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
        try await withThrowingTaskGroup(of: T.self) { group in
            group.addTask { try await operation() }
            group.addTask {
                try await Task.sleep(for: .seconds(seconds))
                throw AgentCoreError.requestTimeLimit(seconds)
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
    }

    /// Agent responses up to this size with a Content-Length are sent to the client in one piece.
    static let wholeResponseLimit = 64 << 10

    /// The agent's body as it comes; if the client goes away the exchange is aborted, which closes
    /// the agent's connection.
    static func stream(_ response: AgentResponse, _ inFlight: InFlight, cutter: Task<Void, Never>? = nil) -> ResponseBody {
        let contentLength = response.head.headers.first(name: "content-length").flatMap { Int($0) }
        return ResponseBody(contentLength: contentLength) { writer in
            defer { cutter?.cancel() }
            do {
                for try await buffer in response.body {
                    inFlight.sent(buffer.readableBytes)
                    try await writer.write(buffer)
                }
                inFlight.complete()
                try await writer.finish(nil)
            } catch {
                inFlight.abort()
                throw error
            }
        }
    }

    // MARK: - StopRuntimeSession

    private func stop(_ request: Request, _ runtime: RuntimeAddress, path: String, query: String) async throws(AgentCoreError) -> Response {
        let credential = try admission.credential(request.head, path: path, query: query)
        let body = try await Self.collect(request.body, limit: 64 << 10)
        let caller = try await admission.caller(credential, payloadHash: Self.hash(body), runtime: runtime.name,
                                                actions: ["bedrock-agentcore:StopRuntimeSession"]) { () throws(AgentCoreError) in try config(runtime) }
        let id = try sessionID(request)
        // Keyed by the caller: another caller's session under this id is not found, by the same lookup.
        do { try await sessions.stop(runtime: runtime.name, qualifier: runtime.qualifier, owner: caller.owner, sessionID: id) } catch { throw AgentCoreError(error) }
        return Response(status: .ok, headers: [.contentType: "application/json", .agentCoreSessionID: id],
                        body: .init(byteBuffer: ByteBuffer(string: "{}")))
    }

    // MARK: - InvokeAgentRuntimeCommand

    private func command(_ request: Request, _ runtime: RuntimeAddress, path: String, query: String, channel: any Channel) async throws(AgentCoreError) -> Response {
        let credential = try admission.credential(request.head, path: path, query: query)
        let body = try await Self.collect(request.body, limit: 256 << 10)
        let caller = try await admission.caller(credential, payloadHash: Self.hash(body), runtime: runtime.name,
                                                actions: ["bedrock-agentcore:InvokeAgentRuntimeCommand"]) { () throws(AgentCoreError) in try config(runtime) }
        let id = try sessionID(request)
        let command = try CommandRequest(body: body)
        // Commands run in a live session of the caller's only, never starting one: the same lookup answers
        // "not found" whether or not another caller has a session under this id.
        guard let session = sessions.liveSession(runtime: runtime.name, qualifier: runtime.qualifier, owner: caller.owner, sessionID: id) else {
            throw AgentCoreError(.resourceNotFound, SessionError.sessionNotFound(id).description)
        }
        let running: RunningCommand
        do { running = try await session.runCommand(command, group: group) } catch { throw AgentCoreError(error) }
        var headers: HTTPFields = [.contentType: EventStream.contentType, .agentCoreSessionID: id]
        for name in AgentCoreHeader.trace { if let n = HTTPField.Name(name), let v = request.headers[n] { headers[n] = v } }
        let clientLeft = await ClientPresence.of(channel)?.probe
        return Response(status: .ok, headers: headers, body: ResponseBody { writer in
            try await running.stream(clientLeft: clientLeft) { event in
                try await writer.write(ByteBuffer(bytes: event.message.encoded()))
            }
            try await writer.finish(nil)
        })
    }

    // MARK: - GetAgentCard

    private func agentCard(_ request: Request, _ runtime: RuntimeAddress, path: String, query: String, requestID: String) async throws(AgentCoreError) -> Response {
        let credential = try admission.credential(request.head, path: path, query: query)
        let body = try await Self.collect(request.body, limit: 64 << 10)
        let caller = try await admission.caller(credential, payloadHash: Self.hash(body), runtime: runtime.name,
                                                actions: ["bedrock-agentcore:GetAgentCard"]) { () throws(AgentCoreError) in try config(runtime) }
        let id = try sessionID(request)
        let session = try await sessions.session(runtime, owner: caller.owner, sessionID: id)
        guard session.runtime.serverProtocol == .a2a else {
            throw AgentCoreError(.validation, "GetAgentCard is only for A2A runtimes; \(runtime.name) serves \(session.runtime.serverProtocol.rawValue)")
        }
        let invocation = Invocation(target: session, sessionID: id, requestID: requestID, requestHeaders: request.headers)
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/.well-known/agent-card.json",
                                   headers: ["Host": "localhost", AgentCoreHeader.sessionID: id, AgentCoreHeader.requestID: requestID])
        let response: AgentResponse
        let clientHead: (status: HTTPResponse.Status, fields: HTTPFields)
        do {
            response = try await session.agent.send(AgentRequest(head: head, bodyLength: 0))
            do { clientHead = try invocation.clientHead(response.head) } catch {
                response.abort()
                throw error
            }
        } catch {
            throw await invocation.failure(error)
        }
        invocation.inFlight.attach(status: clientHead.status.code, abort: response.abort)
        return Response(status: clientHead.status, headers: clientHead.fields, body: Self.stream(response, invocation.inFlight))
    }

    /// A small request body read whole, refused past `limit`.
    static func collect(_ body: RequestBody, limit: Int) async throws(AgentCoreError) -> [UInt8] {
        var bytes: [UInt8] = []
        do {
            for try await buffer in body {
                bytes += buffer.readableBytesView
                guard bytes.count <= limit else { throw AgentCoreError(.validation, "Request body over \(limit) bytes", reason: .cannotParse) }
            }
        } catch let e as AgentCoreError {
            throw e
        } catch {
            throw AgentCoreError(.validation, "Could not read request body: \(error)", reason: .cannotParse)
        }
        return bytes
    }
}
