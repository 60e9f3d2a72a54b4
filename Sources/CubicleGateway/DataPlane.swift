import AsyncAlgorithms
import CubicleAgentCore
import CubicleSessions
import Dispatch
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import Prometheus
import Synchronization

/// The AgentCore data plane: routes each request, validates it, finds or makes its session and streams
/// between the client and the agent. Errors leave here only as AgentCore error shapes.
public struct DataPlane: HTTPResponder {
    public typealias Context = BasicRequestContext

    let sessions: SessionManager
    let group: any EventLoopGroup
    let logger: Logger
    /// The registry behind the swift-metrics backend cubicled bootstraps.
    let prometheus: PrometheusCollectorRegistry

    public init(sessions: SessionManager, group: any EventLoopGroup, logger: Logger, prometheus: PrometheusCollectorRegistry) {
        self.sessions = sessions
        self.group = group
        self.logger = logger
        self.prometheus = prometheus
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        let started = DispatchTime.now().uptimeNanoseconds
        let requestID = RequestID.make()
        do {
            let target = request.head.path ?? "/"
            let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            let route = try Route.parse(method: request.method.rawValue, path: String(parts[0]), query: parts.count > 1 ? String(parts[1]) : nil)
            var response: Response
            switch route {
            case .ping:
                response = Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: #"{"status":"Healthy"}"#)))
            case .metrics:
                response = await metrics()
            case .invoke(let address):
                do {
                    response = try await invoke(request, runtime: address.name, requestID: requestID)
                } catch {
                    // A name from the client labels a metric only if it is configured, so made-up names cannot
                    // grow the registry without bound.
                    let runtime = sessions.config.runtime(named: address.name) == nil ? "unknown" : address.name
                    Self.countRefusal(runtime: runtime, status: error.status, started: started)
                    throw error
                }
            case .stopSession(let address):
                response = try await stop(request, runtime: address.name)
            case .command(let address):
                response = try await command(request, runtime: address.name)
            case .agentCard(let address):
                response = try await agentCard(request, runtime: address.name, requestID: requestID)
            }
            response.headers[.xAmznRequestID] = requestID
            return response
        } catch let error as AgentCoreError {
            return Self.errorResponse(error, requestID: requestID)
        }
    }

    /// Prometheus text: everything Telemetry records, with live sessions by state counted now.
    private func metrics() async -> Response {
        var counts: [String: Int] = [:]
        for s in await sessions.liveSessions { counts[s.lifecycle.state.name, default: 0] += 1 }
        Telemetry.liveSessions(counts)
        var bytes: [UInt8] = []
        prometheus.emit(into: &bytes)
        return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// An InvokeAgentRuntime refused before the agent answered still counts, under its error status.
    static func countRefusal(runtime: String, status: Int, started: UInt64) {
        Telemetry.invocation(runtime: runtime, status: status, nanoseconds: DispatchTime.now().uptimeNanoseconds - started, bytesIn: 0, bytesOut: 0)
    }

    static func errorResponse(_ error: AgentCoreError, requestID: String) -> Response {
        Response(status: .init(code: error.status), headers: errorHeaders(error, requestID: requestID),
                 body: .init(byteBuffer: ByteBuffer(bytes: error.body)))
    }

    /// The headers that make boto3 raise the modelled exception, on both the task and the warm path.
    static func errorHeaders(_ error: AgentCoreError, requestID: String) -> HTTPFields {
        [.xAmznErrorType: error.kind.rawValue, .contentType: "application/json", .xAmznRequestID: requestID]
    }

    private func sessionID(_ request: Request) throws(AgentCoreError) -> String {
        try Validate.sessionID(request.headers[.agentCoreSessionID])
    }

    // MARK: - InvokeAgentRuntime

    private func invoke(_ request: Request, runtime: String, requestID: String) async throws(AgentCoreError) -> Response {
        let id = try sessionID(request)
        let declaredLength = request.headers[.contentLength].flatMap { Int($0) }
        try Validate.payloadLength(declaredLength)
        let session = try await sessions.session(runtime: runtime, sessionID: id)
        let inFlight = InFlight(session)

        let head = Self.agentRequestHead(request.headers, session: session, sessionID: id, requestID: requestID, declaredLength: declaredLength)
        let body = request.body
        let agentRequest = AgentRequest(head: head, bodyLength: declaredLength) { outbound in
            var total = 0
            for try await buffer in body {
                total += buffer.readableBytes
                inFlight.received(buffer.readableBytes)
                guard total <= Limits.maxPayloadBytes else { throw AgentCoreError.invalidField("payload", "Member must have length less than or equal to \(Limits.maxPayloadBytes)") }
                try await outbound.write(buffer)
            }
        }
        let agentResponse: AgentResponse
        do {
            agentResponse = try await session.pool.send(agentRequest)
        } catch let e as AgentCoreError {
            throw e
        } catch {
            throw await Self.agentDidNotAnswer(session, error)
        }
        inFlight.attach(status: agentResponse.head.status.code, abort: agentResponse.abort)
        let headers = Self.responseHeaders(agentResponse.head, request: request, sessionID: id)
        if let length = agentResponse.head.headerFields[.contentLength].flatMap({ Int($0) }), length <= Self.wholeResponseLimit {
            // Small and of known length: read whole, so head and body reach the client in one write.
            var whole = ByteBuffer()
            do {
                for try await var buffer in agentResponse.body {
                    inFlight.sent(buffer.readableBytes)
                    whole.writeBuffer(&buffer)
                }
            } catch {
                inFlight.abort()
                throw await Self.agentDidNotAnswer(session, error)
            }
            inFlight.complete()
            return Response(status: agentResponse.head.status, headers: headers, body: .init(byteBuffer: whole))
        }
        return Response(status: agentResponse.head.status, headers: headers, body: Self.stream(agentResponse, inFlight))
    }

    /// What the agent is sent for an invocation: the client's headers the contract lets through, and the
    /// session and request ids.
    static func agentRequestHead(_ headers: HTTPFields, session: Session, sessionID: String, requestID: String, declaredLength: Int?) -> HTTPRequest {
        var fields = HTTPFields()
        forEachAgentRequestHeader(headers, session: session, sessionID: sessionID, requestID: requestID, declaredLength: declaredLength) { name, value in
            if let name = HTTPField.Name(name) { fields.append(HTTPField(name: name, value: value)) }
        }
        return HTTPRequest(method: .post, scheme: nil, authority: "localhost", path: session.runtime.serverProtocol.invocationPath, headerFields: fields)
    }

    /// The same head in NIO's HTTP/1 types, for an agent link, which has no HTTP-types codec to pay for.
    static func agentRequestHeadHTTP1(_ headers: HTTPFields, session: Session, sessionID: String, requestID: String, declaredLength: Int?) -> HTTPRequestHead {
        var fields = HTTPHeaders()
        fields.reserveCapacity(headers.count + 4)
        fields.add(name: "Host", value: "localhost")
        forEachAgentRequestHeader(headers, session: session, sessionID: sessionID, requestID: requestID, declaredLength: declaredLength) { name, value in
            fields.add(name: name, value: value)
        }
        return HTTPRequestHead(version: .http1_1, method: .POST, uri: session.runtime.serverProtocol.invocationPath, headers: fields)
    }

    private static func forEachAgentRequestHeader(_ headers: HTTPFields, session: Session, sessionID: String, requestID: String,
                                                  declaredLength: Int?, _ add: (String, String) -> Void) {
        let allowlist = session.runtime.requestHeaderAllowlist
        for field in headers where AgentCoreHeader.forwardsToAgent(lowercased: field.name.canonicalName, value: field.value, allowlist: allowlist) {
            guard field.name != .agentCoreSessionID, field.name != .agentCoreRequestID, field.name != .contentLength else { continue }
            add(field.name.rawName, field.value)
        }
        add(AgentCoreHeader.sessionID, sessionID)
        add(AgentCoreHeader.requestID, requestID)
        if let declaredLength { add("Content-Length", String(declaredLength)) }
    }

    /// A request the agent failed, named by why the session ended under it when it did (OOM, agent exit).
    static func agentDidNotAnswer(_ session: Session, _ error: any Error) async -> AgentCoreError {
        AgentCoreError(.runtimeClient, "The agent did not answer: \(await session.endedCause() ?? "\(error)")")
    }

    static let traceHeaders = AgentCoreHeader.trace.compactMap { HTTPField.Name($0) }

    /// Agent responses up to this size with a Content-Length are sent to the client in one piece.
    static let wholeResponseLimit = 64 << 10

    static func responseHeaders(_ agent: HTTPResponse, request: Request, sessionID: String) -> HTTPFields {
        responseHeaders(contentType: agent.headerFields[.contentType],
                        returned: agent.headerFields.lazy.map { ($0.name.canonicalName, $0.name.rawName, $0.value) },
                        requestHeaders: request.headers, sessionID: sessionID)
    }

    /// The client's response headers from the agent's: its Content-Type (JSON when it gave none), the MCP and
    /// trace headers it returned, the request's trace headers it did not, and the session id.
    /// - Parameter returned: the agent's headers as (lowercased name, name, value).
    static func responseHeaders(contentType: String?, returned: some Sequence<(String, String, String)>, requestHeaders: HTTPFields,
                                sessionID: String) -> HTTPFields {
        var headers = HTTPFields()
        headers[.contentType] = contentType ?? "application/json"
        for (lower, name, value) in returned where AgentCoreHeader.returnsToClient(lowercased: lower) {
            if let n = HTTPField.Name(name) { headers.append(HTTPField(name: n, value: value)) }
        }
        for n in Self.traceHeaders where headers[n] == nil {
            if let v = requestHeaders[n] { headers[n] = v }
        }
        headers[.agentCoreSessionID] = sessionID
        return headers
    }

    /// The agent's body as it comes; if the client goes away the exchange is aborted, which closes
    /// the agent's connection.
    static func stream(_ response: AgentResponse, _ inFlight: InFlight) -> ResponseBody {
        let contentLength = response.head.headerFields[.contentLength].flatMap { Int($0) }
        return ResponseBody(contentLength: contentLength) { writer in
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

    private func stop(_ request: Request, runtime: String) async throws(AgentCoreError) -> Response {
        let id = try sessionID(request)
        _ = try await Self.collect(request.body, limit: 64 << 10)
        do { try await sessions.stop(runtime: runtime, sessionID: id) } catch { throw AgentCoreError(error) }
        return Response(status: .ok, headers: [.contentType: "application/json", .agentCoreSessionID: id],
                        body: .init(byteBuffer: ByteBuffer(string: "{}")))
    }

    // MARK: - InvokeAgentRuntimeCommand

    private func command(_ request: Request, runtime: String) async throws(AgentCoreError) -> Response {
        let id = try sessionID(request)
        let body = try await Self.collect(request.body, limit: 256 << 10)
        let command = try CommandRequest(body: body)
        let session = try await sessions.session(runtime: runtime, sessionID: id)
        let events: AsyncThrowingChannel<CommandEvent, any Error>
        do { events = try await session.runCommand(command, group: group) } catch { throw AgentCoreError(error) }
        var headers: HTTPFields = [.contentType: EventStream.contentType, .agentCoreSessionID: id]
        for name in AgentCoreHeader.trace { if let n = HTTPField.Name(name), let v = request.headers[n] { headers[n] = v } }
        return Response(status: .ok, headers: headers, body: ResponseBody { writer in
            for try await event in events {
                try await writer.write(ByteBuffer(bytes: event.message.encoded()))
            }
            try await writer.finish(nil)
        })
    }

    // MARK: - GetAgentCard

    private func agentCard(_ request: Request, runtime: String, requestID: String) async throws(AgentCoreError) -> Response {
        let id = try sessionID(request)
        let session = try await sessions.session(runtime: runtime, sessionID: id)
        guard session.runtime.serverProtocol == .a2a else {
            throw AgentCoreError(.validation, "GetAgentCard is only for A2A runtimes; \(runtime) serves \(session.runtime.serverProtocol.rawValue)")
        }
        let inFlight = InFlight(session)
        let head = HTTPRequest(method: .get, scheme: nil, authority: "localhost", path: "/.well-known/agent-card.json",
                               headerFields: [.agentCoreSessionID: id, .agentCoreRequestID: requestID])
        let response: AgentResponse
        do { response = try await session.pool.send(AgentRequest(head: head)) } catch {
            throw await Self.agentDidNotAnswer(session, error)
        }
        inFlight.attach(status: response.head.status.code, abort: response.abort)
        return Response(status: response.head.status, headers: Self.responseHeaders(response.head, request: request, sessionID: id),
                        body: Self.stream(response, inFlight))
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

/// Marks a session busy for as long as one exchange lasts, however it ends: completed, aborted, or
/// dropped because the response was never written.
final class InFlight: Sendable {
    private let session: Session
    private let state = Mutex<(status: Int?, abort: (@Sendable () -> Void)?, finished: Bool)>((nil, nil, false))
    private let started = DispatchTime.now().uptimeNanoseconds
    private let bytes = Mutex<(in: Int, out: Int)>((0, 0))

    init(_ session: Session) {
        self.session = session
        session.requestStarted()
    }

    /// The agent answered with `status`; `abort` drops the exchange if it does not complete.
    func attach(status: Int, abort: @escaping @Sendable () -> Void) { state.withLock { $0.status = status; $0.abort = abort } }
    func received(_ n: Int) { bytes.withLock { $0.in += n } }
    func sent(_ n: Int) { bytes.withLock { $0.out += n } }

    func complete() { finish(abort: false) }
    func abort() { finish(abort: true) }

    private func finish(abort: Bool) {
        let (status, abortExchange, first) = state.withLock { s -> (Int?, (@Sendable () -> Void)?, Bool) in
            defer { s.finished = true }
            return (s.status, s.abort, !s.finished)
        }
        guard first else { return }
        if abort { abortExchange?() }
        session.requestEnded()
        // Only exchanges the agent answered; refused requests are counted where they are refused.
        if let status {
            let (bytesIn, bytesOut) = bytes.withLock { ($0.in, $0.out) }
            Telemetry.invocation(runtime: session.runtime.name, status: status,
                                 nanoseconds: DispatchTime.now().uptimeNanoseconds - started, bytesIn: bytesIn, bytesOut: bytesOut)
        }
    }

    deinit { abort() }
}

enum RequestID {
    /// A random UUID v4, as AWS request ids are: one getrandom(2) per id, not one per byte.
    static func make() -> String {
        var g = SystemRandomNumberGenerator()
        return format(g.next() as UInt64, g.next() as UInt64)
    }

    static func format(_ high: UInt64, _ low: UInt64) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var bytes = withUnsafeBytes(of: high.bigEndian) { Array($0) } + withUnsafeBytes(of: low.bigEndian) { Array($0) }
        bytes[6] = (bytes[6] & 0x0F) | 0x40
        bytes[8] = (bytes[8] & 0x3F) | 0x80
        var out: [UInt8] = []
        out.reserveCapacity(36)
        for (i, b) in bytes.enumerated() {
            if i == 4 || i == 6 || i == 8 || i == 10 { out.append(UInt8(ascii: "-")) }
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}

extension HTTPField.Name {
    static let agentCoreSessionID = HTTPField.Name(AgentCoreHeader.sessionID)!
    static let agentCoreRequestID = HTTPField.Name(AgentCoreHeader.requestID)!
    static let xAmznErrorType = HTTPField.Name(AgentCoreError.errorTypeHeader)!
    static let xAmznRequestID = HTTPField.Name("x-amzn-RequestId")!
}
