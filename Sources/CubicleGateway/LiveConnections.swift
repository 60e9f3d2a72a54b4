import CubicleAgentCore
import CubicleAgentLink
import CubicleAuth
import CubicleRuntimes
import CubicleSessions
import CubicleShells
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
    let shells: ShellRegistry
    let logger: Logger

    func decide(_ head: HTTPRequestHead) async -> UpgradeDecision {
        let parts = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = String(parts[0]), query = parts.count > 1 ? String(parts[1]) : ""
        let route: Route
        do { route = try Route.parse(method: head.method.rawValue, path: path, query: query) } catch { return .notOurs }
        let requestID = RequestID.make()
        do throws(AgentCoreError) {
            switch route {
            case .webSocket(let address): return try await agentSocket(head, address, path: path, query: query, requestID: requestID)
            case .shell(let address): return try await shell(head, address, path: path, query: query, requestID: requestID)
            default: return .notOurs
            }
        } catch {
            return .refused(status: error.status, headers: Invocation.errorHeaders(error, requestID: requestID), body: error.body)
        }
    }

    /// The caller, checked for `action` on the runtime; the session id from the header or the query. A
    /// browser cannot set `Authorization` on its upgrade: the SDK's browser path sends the bearer token as a
    /// subprotocol instead (`base64UrlBearerAuthorization.<base64url token>`, beside the bare sentinel),
    /// which counts as `Authorization: Bearer` and is answered with the sentinel.
    private func admit(_ head: HTTPRequestHead, _ address: RuntimeAddress, path: String, query: String,
                       action: String) async throws(AgentCoreError) -> Admitted {
        var request: HTTPRequest
        do { request = try HTTPRequest(head, secure: false, splitCookie: false) } catch {
            throw AgentCoreError(.validation, "The upgrade request's head is not valid HTTP: \(error)")
        }
        let (token, protocols) = BearerSubprotocol.split(head.headers[canonicalForm: "sec-websocket-protocol"].map(String.init))
        if let token, request.headerFields[.authorization] == nil { request.headerFields[.authorization] = "Bearer " + token }
        let credential = try admission.credential(request, path: path, query: query)
        let caller = try await admission.caller(credential, payloadHash: PayloadHash.empty, runtime: address.name, actions: [action]) { () throws(AgentCoreError) in
            do throws(SessionError) { return try sessions.resolve(address.name, qualifier: address.qualifier) } catch { throw AgentCoreError(error) }
        }
        let params = QueryString.parse(query)
        let id = request.headerFields[.agentCoreSessionID] ?? params[AgentCoreHeader.sessionID] ?? params["sessionId"]
        return Admitted(caller: caller, request: request, sessionID: id, protocols: protocols, tokenByProtocol: token != nil)
    }

    struct Admitted {
        var caller: Caller
        var request: HTTPRequest
        var sessionID: String?
        /// The subprotocols the client offered, the bearer token's taken out.
        var protocols: [String]
        var tokenByProtocol: Bool
    }

    // MARK: - To the agent's /ws

    private func agentSocket(_ head: HTTPRequestHead, _ address: RuntimeAddress, path: String, query: String,
                             requestID: String) async throws(AgentCoreError) -> UpgradeDecision {
        let admitted = try await admit(head, address, path: path, query: query, action: "bedrock-agentcore:InvokeAgentRuntimeWithWebSocketStream")
        let caller = admitted.caller, request = admitted.request, given = admitted.sessionID
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
        if !admitted.protocols.isEmpty { upgrade.headers.add(name: "Sec-WebSocket-Protocol", value: admitted.protocols.joined(separator: ", ")) }
        let agentHead = upgrade
        let limits = session.runtime.limits
        let opened: WebSocketClient.Result
        do {
            opened = try await DataPlane.within(seconds: limits.requestSeconds) { try await session.agent.openWebSocket(agentHead) }
        } catch {
            invocation.inFlight.abort()
            throw await invocation.failure(error)
        }
        guard case .open(let agent, let subprotocol, _) = opened else {
            invocation.inFlight.abort()
            if case .refused(let status, _) = opened {
                throw AgentCoreError(.runtimeClient, "The agent refused the WebSocket upgrade with status \(status): it serves no WebSocket on /ws")
            }
            throw AgentCoreError(.runtimeClient, "The agent refused the WebSocket upgrade")
        }
        invocation.inFlight.attach(status: 101) { agent.channel.close(promise: nil) }
        var headers = HTTPHeaders([(AgentCoreHeader.sessionID, id), ("x-amzn-RequestId", requestID)])
        if let subprotocol {
            headers.add(name: "Sec-WebSocket-Protocol", value: subprotocol)
        } else if admitted.tokenByProtocol {
            headers.add(name: "Sec-WebSocket-Protocol", value: BearerSubprotocol.sentinel)
        }
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

    // MARK: - Shells

    /// InvokeAgentRuntimeCommandShell: a shell in the caller's session (started if new, as AgentCore
    /// does), found again by `shellId` while it lives.
    private func shell(_ head: HTTPRequestHead, _ address: RuntimeAddress, path: String, query: String,
                       requestID: String) async throws(AgentCoreError) -> UpgradeDecision {
        let admitted = try await admit(head, address, path: path, query: query, action: "bedrock-agentcore:InvokeAgentRuntimeCommandShell")
        let caller = admitted.caller, given = admitted.sessionID
        let id = try given.map { id throws(AgentCoreError) in try Validate.sessionID(id) } ?? Self.newSessionID()
        let shellID = QueryString.parse(query)["shellId"] ?? RequestID.make()
        guard ShellProtocol.validShellID(shellID) else {
            throw AgentCoreError.invalidField("shellId", "Member must be 1 to 128 printable characters, none of ?, # or &")
        }
        let session = try await sessions.session(address, owner: caller.owner, sessionID: id)
        let (shell, reconnected): (Shell, Bool)
        do {
            (shell, reconnected) = try await shells.open(in: session, shellID: shellID, command: ShellRegistry.defaultCommand, rows: 24, cols: 80,
                                                         term: "xterm-256color")
        } catch .tooMany {
            throw AgentCoreError(.serviceQuotaExceeded, "The session has \(ShellRegistry.maxPerSession) shells already")
        } catch {
            throw AgentCoreError(.runtimeClient, error.description)
        }
        var headers = HTTPHeaders([(AgentCoreHeader.sessionID, id), (ShellProtocol.shellIDHeader, shellID), ("x-amzn-RequestId", requestID)])
        if admitted.tokenByProtocol { headers.add(name: "Sec-WebSocket-Protocol", value: BearerSubprotocol.sentinel) }
        let seconds = session.runtime.limits.webSocketSeconds
        return .accepted(headers, serve: { client in
            _ = await ShellSocket.serve(client, shell: shell, reconnected: reconnected, seconds: seconds)
        }, abandon: {
            // A new shell nobody reached goes; one being reconnected to waits as it did.
            if !reconnected { shell.hangUp() }
        })
    }

    static func newSessionID() -> String { RequestID.make() + "-" + RequestID.make().prefix(8) }
}

/// The bedrock-agentcore SDK's way for a browser to send a bearer token on a WebSocket upgrade.
enum BearerSubprotocol {
    static let sentinel = "base64UrlBearerAuthorization"

    /// The token from the offered subprotocols (each header may list several), and the others.
    static func split(_ headers: [String]) -> (token: String?, others: [String]) {
        var token: String?, others: [String] = []
        for item in headers.flatMap({ $0.split(separator: ",") }) {
            let blank: (Character) -> Bool = { $0 == " " || $0 == "\t" }
            var p = item.drop(while: blank)
            while let last = p.last, blank(last) { p = p.dropLast() }
            if p.hasPrefix(sentinel + ".") {
                token = token ?? decode(p.dropFirst(sentinel.count + 1))
            } else if p != sentinel, !p.isEmpty {
                others.append(String(p))
            }
        }
        return (token, others)
    }

    /// base64url without padding, as the SDK writes it; nil if it is not that or not UTF-8.
    static func decode(_ text: Substring) -> String? {
        guard text.utf8.count <= 8192, let bytes = Base64URL.decode(text) else { return nil }
        return String(validating: bytes, as: UTF8.self)
    }
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
                                    try? await clientOut.write(WebSocketClose.frame(1008, "more than \(maxFramesPerSecond) frames in one second"))
                                    try? await agentOut.write(WebSocketClose.frame(1008, "the client sent more than \(maxFramesPerSecond) frames in one second", masked: true))
                                    return .tooManyFrames
                                }
                                try await agentOut.write(WebSocketFrame(fin: frame.fin, opcode: frame.opcode, maskKey: .random(), data: frame.unmaskedData))
                                if frame.opcode == .connectionClose { return .closed(by: "client", code: WebSocketClose.code(of: frame)) }
                            }
                        } catch {}
                        try? await agentOut.write(WebSocketClose.frame(1001, "the client went away", masked: true))
                        return .dropped(by: "client")
                    }
                    // Agent to client.
                    group.addTask {
                        do {
                            for try await frame in agentIn {
                                try await clientOut.write(WebSocketFrame(fin: frame.fin, opcode: frame.opcode, data: frame.unmaskedData))
                                if frame.opcode == .connectionClose { return .closed(by: "agent", code: WebSocketClose.code(of: frame)) }
                            }
                        } catch {
                            // A frame over the limit (the decoder refused it), or the agent's socket failing.
                            try? await clientOut.write(WebSocketClose.frame(1009, "the agent sent a frame over \(WebSocketClient.maxFrameBytes) bytes"))
                            return .dropped(by: "agent")
                        }
                        try? await clientOut.write(WebSocketClose.frame(1001, "the session ended or the agent closed its socket"))
                        return .dropped(by: "agent")
                    }
                    group.addTask {
                        try? await Task.sleep(for: .seconds(seconds))
                        if Task.isCancelled { return nil }
                        try? await clientOut.write(WebSocketClose.frame(1008, "connection time limit of \(seconds) seconds reached"))
                        try? await agentOut.write(WebSocketClose.frame(1001, "connection time limit of \(seconds) seconds reached", masked: true))
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
}
