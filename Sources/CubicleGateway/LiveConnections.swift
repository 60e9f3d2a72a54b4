import CubicleAgentCore
import CubicleAgentLink
import CubicleAuth
import CubicleRuntimes
import CubicleSessions
import Dispatch
import HTTPTypes
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypesHTTP1
import NIOWebSocket

/// The data plane's WebSocket upgrades: `/runtimes/{arn}/ws` to the agent's `/ws`, and
/// `/runtimes/{arn}/ws/shells` to a shell in the session. The upgrade request is admitted as any call is
/// (SigV4 headers, a presigned URL, or a bearer token), its session found or started, and the far end
/// opened, all before the 101: a refusal is an AgentCore error response, not a WebSocket close.
struct LiveConnections: Sendable {
    let sessions: SessionManager
    let admission: Admission
    let logger: Logger

    /// What becomes of an upgrade request.
    enum Decision: Sendable {
        /// Not a WebSocket route of ours: the request goes on as HTTP.
        case notOurs
        case refused(AgentCoreError, requestID: String)
        /// Upgraded with these headers; `serve` then runs for the life of the client's socket, and
        /// `abandon` if the 101 never goes out (the client left meanwhile).
        case accepted(HTTPHeaders, serve: @Sendable (NIOAsyncChannel<WebSocketFrame, WebSocketFrame>) async -> Void, abandon: @Sendable () -> Void)
    }

    func decide(_ head: HTTPRequestHead) async -> Decision {
        let parts = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = String(parts[0]), query = parts.count > 1 ? String(parts[1]) : ""
        let route: Route
        do { route = try Route.parse(method: head.method.rawValue, path: path, query: query) } catch { return .notOurs }
        let requestID = RequestID.make()
        do throws(AgentCoreError) {
            switch route {
            case .webSocket(let address): return try await agentSocket(head, address, path: path, query: query, requestID: requestID)
            case .shell: throw AgentCoreError(.resourceNotFound, "shells: not yet")
            default: return .notOurs
            }
        } catch {
            return .refused(error, requestID: requestID)
        }
    }

    /// The caller, checked for `action` on the runtime; the session id from the header or the query.
    private func admit(_ head: HTTPRequestHead, _ address: RuntimeAddress, path: String, query: String,
                       action: String) async throws(AgentCoreError) -> (Caller, HTTPRequest, sessionID: String?) {
        let request: HTTPRequest
        do { request = try HTTPRequest(head, secure: false, splitCookie: false) } catch {
            throw AgentCoreError(.validation, "The upgrade request's head is not valid HTTP: \(error)")
        }
        let credential = try admission.credential(request, path: path, query: query)
        let caller = try await admission.caller(credential, payloadHash: PayloadHash.empty, runtime: address.name, actions: [action]) { () throws(AgentCoreError) in
            do throws(SessionError) { return try sessions.resolve(address.name, qualifier: address.qualifier) } catch { throw AgentCoreError(error) }
        }
        let params = QueryString.parse(query)
        let id = request.headerFields[.agentCoreSessionID] ?? params[AgentCoreHeader.sessionID] ?? params["sessionId"]
        return (caller, request, id)
    }

    // MARK: - To the agent's /ws

    private func agentSocket(_ head: HTTPRequestHead, _ address: RuntimeAddress, path: String, query: String,
                             requestID: String) async throws(AgentCoreError) -> Decision {
        let (caller, request, given) = try await admit(head, address, path: path, query: query,
                                                      action: "bedrock-agentcore:InvokeAgentRuntimeWithWebSocketStream")
        // Without one, as AgentCore does, a new session: its id comes back in the 101.
        let id = try given.map { id throws(AgentCoreError) in try Validate.sessionID(id) } ?? Self.newSessionID()
        let session = try await sessions.session(address, owner: caller.owner, sessionID: id)
        // Custom headers may come as query parameters, a browser's WebSocket having no way to set headers.
        var fields = request.headerFields
        for (name, value) in QueryString.parse(query) where name.lowercased().hasPrefix(AgentCoreHeader.customPrefix) {
            if let n = HTTPField.Name(name), fields[n] == nil { fields[n] = value }
        }
        let invocation = Invocation(target: session, sessionID: id, requestID: requestID, requestHeaders: fields)
        var upgrade = invocation.agentHead(declaredLength: nil, method: .GET, uri: "/ws")
        if let protocols = head.headers.first(name: "sec-websocket-protocol") { upgrade.headers.add(name: "Sec-WebSocket-Protocol", value: protocols) }
        let agentHead = upgrade
        let limits = session.runtime.limits
        let opened: AgentWebSocket
        do {
            opened = try await DataPlane.within(seconds: limits.requestSeconds) { try await session.agent.openWebSocket(agentHead) }
        } catch {
            invocation.inFlight.abort()
            throw await invocation.failure(error)
        }
        guard case .open(let agent, let subprotocol) = opened else {
            invocation.inFlight.abort()
            if case .refused(let status) = opened {
                throw AgentCoreError(.runtimeClient, "The agent refused the WebSocket upgrade with status \(status): it serves no WebSocket on /ws")
            }
            throw AgentCoreError(.runtimeClient, "The agent refused the WebSocket upgrade")
        }
        invocation.inFlight.attach(status: 101) { agent.channel.close(promise: nil) }
        var headers = HTTPHeaders([(AgentCoreHeader.sessionID, id), ("x-amzn-RequestId", requestID)])
        if let subprotocol { headers.add(name: "Sec-WebSocket-Protocol", value: subprotocol) }
        let logger = self.logger
        return .accepted(headers, serve: { client in
            let end = await WebSocketRelay.run(client: client, agent: agent, seconds: limits.webSocketSeconds)
            logger.debug("WebSocket ended", metadata: ["runtime": .string(session.runtime.name), "end": .string("\(end)")])
            invocation.inFlight.complete()
        }, abandon: {
            agent.channel.close(promise: nil)
            invocation.inFlight.abort()
        })
    }

    static func newSessionID() -> String { RequestID.make() + "-" + RequestID.make().prefix(8) }
}

/// Frames both ways between a client's WebSocket and the agent's, under AgentCore's limits. Back-pressure
/// is the channels' own: a side that does not read stops the other side's reads (NIOAsyncChannel's
/// inbound buffer is a few frames, its writer waits while the socket is not writable), so a client that
/// stops reading holds at most a few frames of cubicled's memory however fast the agent sends.
enum WebSocketRelay {
    /// AgentCore's: more frames than this from the client within a second closes the connection.
    static let maxFramesPerSecond = 250

    /// How a connection ended, with the close each side was sent (when cubicled sent one).
    enum End: Equatable, Sendable, CustomStringConvertible {
        /// A close handshake passed through, begun by the client or the agent with this code.
        case closed(by: String, code: UInt16?)
        /// One side's socket ended without a close frame; the other was sent 1001 going away.
        case dropped(by: String)
        case tooManyFrames
        case timeLimit
        var description: String {
            switch self {
            case .closed(let by, let code): "closed by the \(by) (\(code.map(String.init) ?? "no code"))"
            case .dropped(let by): "dropped by the \(by)"
            case .tooManyFrames: "more than \(WebSocketRelay.maxFramesPerSecond) frames in a second"
            case .timeLimit: "connection time limit"
            }
        }
    }

    static func run(client: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, agent: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>,
                    seconds: Int) async -> End {
        let result: End? = try? await client.executeThenClose { clientIn, clientOut in
            try await agent.executeThenClose { agentIn, agentOut in
                await withTaskGroup(of: End?.self) { group -> End in
                    // Client to agent: masked again (a client's frames must be), counted against the rate.
                    group.addTask {
                        var window = RateWindow(limit: maxFramesPerSecond)
                        do {
                            for try await frame in clientIn {
                                guard window.admit(now: DispatchTime.now().uptimeNanoseconds) else {
                                    try? await clientOut.write(close(1008, "more than \(maxFramesPerSecond) frames in one second"))
                                    try? await agentOut.write(close(1008, "the client sent more than \(maxFramesPerSecond) frames in one second", masked: true))
                                    return .tooManyFrames
                                }
                                try await agentOut.write(WebSocketFrame(fin: frame.fin, opcode: frame.opcode, maskKey: .random(), data: frame.unmaskedData))
                                if frame.opcode == .connectionClose { return .closed(by: "client", code: code(of: frame)) }
                            }
                        } catch {}
                        try? await agentOut.write(close(1001, "the client went away", masked: true))
                        return .dropped(by: "client")
                    }
                    // Agent to client.
                    group.addTask {
                        do {
                            for try await frame in agentIn {
                                try await clientOut.write(WebSocketFrame(fin: frame.fin, opcode: frame.opcode, data: frame.unmaskedData))
                                if frame.opcode == .connectionClose { return .closed(by: "agent", code: code(of: frame)) }
                            }
                        } catch {
                            // A frame over the limit (the decoder refused it), or the agent's socket failing.
                            try? await clientOut.write(close(1009, "the agent sent a frame over \(AgentWebSocket.maxFrameBytes) bytes"))
                            return .dropped(by: "agent")
                        }
                        try? await clientOut.write(close(1001, "the session ended or the agent closed its socket"))
                        return .dropped(by: "agent")
                    }
                    group.addTask {
                        try? await Task.sleep(for: .seconds(seconds))
                        if Task.isCancelled { return nil }
                        try? await clientOut.write(close(1008, "connection time limit of \(seconds) seconds reached"))
                        try? await agentOut.write(close(1001, "connection time limit of \(seconds) seconds reached", masked: true))
                        return .timeLimit
                    }
                    var first = End.dropped(by: "client")
                    while let next = await group.next() {
                        if let next { first = next; break }
                    }
                    // A close passed one way: the other side has a moment to answer it before both go.
                    if case .closed = first {
                        group.addTask { try? await Task.sleep(for: .seconds(2)); return nil }
                        _ = await group.next()
                    }
                    group.cancelAll()
                    return first
                }
            }
        }
        return result ?? .dropped(by: "client")
    }

    static func close(_ code: UInt16, _ reason: String, masked: Bool = false) -> WebSocketFrame {
        var data = ByteBuffer()
        data.writeInteger(code)
        data.writeString(String(reason.utf8.prefix(120)) ?? "")
        return WebSocketFrame(fin: true, opcode: .connectionClose, maskKey: masked ? .random() : nil, data: data)
    }

    static func code(of frame: WebSocketFrame) -> UInt16? {
        var data = frame.unmaskedData
        return data.readInteger(as: UInt16.self)
    }
}

/// Events in the last second, for a per-second cap.
struct RateWindow {
    let limit: Int
    private var times: [UInt64] = []
    private var head = 0
    init(limit: Int) { self.limit = limit; times.reserveCapacity(limit) }

    /// Records an event at `now` (nanoseconds); false if it makes more than `limit` within a second.
    mutating func admit(now: UInt64) -> Bool {
        if times.count < limit {
            times.append(now)
            return true
        }
        // times is a ring of the last `limit` events; the oldest is at `head`.
        guard now - times[head] >= 1_000_000_000 else { return false }
        times[head] = now
        head = (head + 1) % limit
        return true
    }
}
