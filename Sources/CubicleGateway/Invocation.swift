import CubicleAgentCore
import CubicleAgentLink
import CubicleRuntimes
import CubicleSessions
import Dispatch
import HTTPTypes
import NIOHTTP1
import Synchronization

/// What an invocation needs of its session. `Session` is the one in production; the forwarder's unit tests
/// bring their own, so the warm road is tested without a sandbox.
protocol InvocationTarget: AnyObject, Sendable {
    var runtime: RuntimeConfig { get }
    var agent: AgentTransport { get }
    func requestStarted()
    func requestEnded()
    /// Why the session ended under a request, if it did (see `Session.endedCause`).
    func endedCause(waitingUpTo seconds: Double) async -> String?
}

extension Session: InvocationTarget {}

/// The invocation core: one InvokeAgentRuntime as both roads of the data plane carry it, the task road
/// (`DataPlane.invoke`, over `AgentTransport.send`) and the warm road (`ForwardedInvoke`, part by part on
/// the event loop). It alone decides what the agent is sent, what the client gets back, how an agent's
/// failure is answered, and keeps the session busy while the exchange lasts.
struct Invocation: Sendable {
    let target: any InvocationTarget
    let sessionID: String
    let requestID: String
    let requestHeaders: HTTPFields
    let started: UInt64
    let inFlight: InFlight

    init(target: any InvocationTarget, sessionID: String, requestID: String, requestHeaders: HTTPFields,
         started: UInt64 = DispatchTime.now().uptimeNanoseconds) {
        self.target = target
        self.sessionID = sessionID
        self.requestID = requestID
        self.requestHeaders = requestHeaders
        self.started = started
        self.inFlight = InFlight(target)
    }

    /// What the agent is sent: the client's headers the contract lets through, and the session and request ids.
    /// `uri`: the protocol's invocation path unless given (a WebSocket's `/ws`).
    func agentHead(declaredLength: Int?, method: HTTPMethod = .POST, uri: String? = nil) -> HTTPRequestHead {
        var fields = HTTPHeaders()
        fields.reserveCapacity(requestHeaders.count + 4)
        fields.add(name: "Host", value: "localhost")
        let allowlist = target.runtime.requestHeaderAllowlist, authorizer = target.runtime.authorizer != nil
        for field in requestHeaders where AgentCoreHeader.forwardsToAgent(lowercased: field.name.canonicalName, value: field.value, allowlist: allowlist,
                                                                          authorizer: authorizer) {
            guard field.name != .agentCoreSessionID, field.name != .agentCoreRequestID, field.name != .contentLength else { continue }
            fields.add(name: field.name.rawName, value: field.value)
        }
        fields.add(name: AgentCoreHeader.sessionID, value: sessionID)
        fields.add(name: AgentCoreHeader.requestID, value: requestID)
        if let declaredLength { fields.add(name: "Content-Length", value: String(declaredLength)) }
        return HTTPRequestHead(version: .http1_1, method: method, uri: uri ?? target.runtime.serverProtocol.invocationPath, headers: fields)
    }

    /// The client's response head from the agent's: its status, its Content-Type (JSON when it gave none),
    /// the MCP and trace headers it returned, the request's trace headers it did not, and the session and
    /// request ids. Content-Length is left to the road. Throws for a status HTTP does not have.
    func clientHead(_ agent: HTTPResponseHead) throws -> (status: HTTPResponse.Status, fields: HTTPFields) {
        guard (200...999).contains(agent.status.code) else { throw AgentLinkError("agent sent status \(agent.status.code)") }
        let status = HTTPResponse.Status(code: Int(agent.status.code), reasonPhrase: agent.status.reasonPhrase)
        var headers = HTTPFields()
        headers[.contentType] = agent.headers.first(name: "content-type") ?? "application/json"
        for (name, value) in agent.headers where AgentCoreHeader.returnsToClient(lowercased: name.lowercased()) {
            if let n = HTTPField.Name(name) { headers.append(HTTPField(name: n, value: value)) }
        }
        for n in Self.traceHeaders where headers[n] == nil {
            if let v = requestHeaders[n] { headers[n] = v }
        }
        headers[.agentCoreSessionID] = sessionID
        headers[.xAmznRequestID] = requestID
        return (status, headers)
    }

    static let traceHeaders = AgentCoreHeader.trace.compactMap { HTTPField.Name($0) }

    /// A request the agent failed, named by why the session ended under it when it did (OOM, agent exit).
    func failure(_ error: any Error) async -> AgentCoreError {
        if let e = error as? AgentCoreError { return e }
        return AgentCoreError(.runtimeClient, "The agent did not answer: \(await target.endedCause(waitingUpTo: 0.5) ?? "\(error)")")
    }

    /// An InvokeAgentRuntime refused before the agent answered still counts, under its error status.
    static func countRefusal(runtime: String, status: Int, started: UInt64) {
        Telemetry.invocation(runtime: runtime, status: status, nanoseconds: DispatchTime.now().uptimeNanoseconds - started, bytesIn: 0, bytesOut: 0)
    }

    /// The headers that make boto3 raise the modelled exception, on both roads.
    static func errorHeaders(_ error: AgentCoreError, requestID: String) -> HTTPFields {
        [.xAmznErrorType: error.kind.rawValue, .contentType: "application/json", .xAmznRequestID: requestID]
    }
}

/// Marks a session busy for as long as one exchange lasts, however it ends: completed, aborted, or
/// dropped because the response was never written.
final class InFlight: Sendable {
    private let target: any InvocationTarget
    private let state = Mutex<(status: Int?, abort: (@Sendable () -> Void)?, finished: Bool)>((nil, nil, false))
    private let started = DispatchTime.now().uptimeNanoseconds
    private let bytes = Mutex<(in: Int, out: Int)>((0, 0))

    init(_ target: any InvocationTarget) {
        self.target = target
        target.requestStarted()
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
        target.requestEnded()
        // Only exchanges the agent answered; refused requests are counted where they are refused.
        if let status {
            let (bytesIn, bytesOut) = bytes.withLock { ($0.in, $0.out) }
            Telemetry.invocation(runtime: target.runtime.name, status: status,
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
    static let agentCoreUserID = HTTPField.Name(AgentCoreHeader.userID)!
    static let xAmznErrorType = HTTPField.Name(AgentCoreError.errorTypeHeader)!
    static let xAmznRequestID = HTTPField.Name("x-amzn-RequestId")!
}
