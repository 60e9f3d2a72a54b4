/// Header names of the contract, and which client headers reach the agent (AGENTCORE.md §2).
public enum AgentCoreHeader {
    public static let sessionID = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id"
    public static let requestID = "X-Amzn-Bedrock-AgentCore-Runtime-Request-Id"
    public static let userID = "X-Amzn-Bedrock-AgentCore-Runtime-User-Id"
    public static let customPrefix = "x-amzn-bedrock-agentcore-runtime-custom-"
    public static let trace = ["X-Amzn-Trace-Id", "traceparent", "tracestate", "baggage"]
    public static let mcp = ["Mcp-Session-Id", "Mcp-Protocol-Version"]
    /// Longest value of a forwarded Custom-* or allowlisted header.
    public static let maxForwardedValueBytes = 4096

    /// Names that always pass, and the agent response headers that go back, lowercased once.
    static let alwaysForwarded: Set<String> = Set(["content-type", "accept", userID.lowercased()] + (trace + mcp).map { $0.lowercased() })
    static let returned: Set<String> = Set((trace + mcp).map { $0.lowercased() })

    /// Whether a client header is passed to the agent. Content-Type and Accept travel with the body;
    /// the session and request ids are set by cubicled; everything else needs a rule.
    /// - Parameter allowlist: the runtime's request header allowlist, lowercased.
    public static func forwardsToAgent(_ name: String, value: String, allowlist: Set<String>, authorizer: Bool = false) -> Bool {
        forwardsToAgent(lowercased: name.lowercased(), value: value, allowlist: allowlist, authorizer: authorizer)
    }

    /// - Parameter lower: the header's name, already lowercased (HTTP types keep a canonical one).
    /// - Parameter authorizer: the runtime has a JWT authorizer, whose bearer token the agent gets (as AWS
    ///   passes it); a SigV4 Authorization never reaches an agent.
    public static func forwardsToAgent(lowercased lower: String, value: String, allowlist: Set<String>, authorizer: Bool = false) -> Bool {
        if alwaysForwarded.contains(lower) { return true }
        if lower == "authorization" { return authorizer && value.hasPrefix("Bearer ") && value.utf8.count <= 16384 }
        guard value.utf8.count <= maxForwardedValueBytes else { return false }
        if lower.hasPrefix(customPrefix) && lower.utf8.count > customPrefix.utf8.count { return true }
        // No allowlist entry can make x-amz* headers (signatures, security tokens) reach the agent.
        if lower.hasPrefix("x-amz") { return false }
        return allowlist.contains(lower)
    }

    /// Agent response headers passed back to the client beside Content-Type and the session id.
    public static func returnsToClient(lowercased name: String) -> Bool { returned.contains(name) }
}

public enum Limits {
    public static let maxPayloadBytes = 100_000_000
    public static let sessionIDLength = 33...256
    public static let commandLength = 1...65536
    public static let commandTimeoutSeconds = 1...3600
    public static let defaultCommandTimeoutSeconds = 300
    /// AWS's range for both lifecycle timeouts.
    public static let lifecycleSeconds = 60...28_800
    public static let defaultIdleTimeoutSeconds = 900
    public static let defaultMaxLifetimeSeconds = 28_800
    /// How long an agent has to answer /ping with 200 after it starts.
    public static let initializationSeconds = 30
}

public enum Validate {
    /// 33..256 characters, printable ASCII without spaces: the id travels in HTTP headers and logs.
    public static func sessionID(_ id: String?) throws(AgentCoreError) -> String {
        guard let id, !id.isEmpty else {
            throw AgentCoreError(.validation, "runtimeSessionId is required", reason: .fieldValidationFailed,
                                 fields: [("runtimeSessionId", "required")])
        }
        guard Limits.sessionIDLength.contains(id.utf8.count) else {
            throw AgentCoreError.invalidField("runtimeSessionId", "Member must have length between 33 and 256 (was \(id.utf8.count))")
        }
        guard id.utf8.allSatisfy({ $0 >= 0x21 && $0 <= 0x7E }) else {
            throw AgentCoreError.invalidField("runtimeSessionId", "Member must be printable ASCII without spaces")
        }
        return id
    }

    public static func payloadLength(_ length: Int?) throws(AgentCoreError) {
        if let length, length > Limits.maxPayloadBytes {
            throw AgentCoreError.invalidField("payload", "Member must have length less than or equal to \(Limits.maxPayloadBytes)")
        }
    }
}

/// The parsed body of InvokeAgentRuntimeCommand.
public struct CommandRequest: Equatable, Sendable {
    public var command: String
    public var timeoutSeconds: Int

    public init(command: String, timeoutSeconds: Int = Limits.defaultCommandTimeoutSeconds) {
        self.command = command
        self.timeoutSeconds = timeoutSeconds
    }

    public init(body: [UInt8]) throws(AgentCoreError) {
        let json: JSON
        do { json = try JSON.parse(body) } catch {
            throw AgentCoreError(.validation, "Could not parse request body: \(error)", reason: .cannotParse)
        }
        guard case .object = json else { throw AgentCoreError(.validation, "Request body must be a JSON object", reason: .cannotParse) }
        guard let command = json["command"]?.stringValue else {
            throw AgentCoreError(.validation, "command is required and must be a string", reason: .fieldValidationFailed, fields: [("command", "required")])
        }
        guard Limits.commandLength.contains(command.utf8.count) else {
            throw AgentCoreError.invalidField("command", "Member must have length between 1 and 65536")
        }
        guard !command.utf8.contains(0) else { throw AgentCoreError.invalidField("command", "Member must not contain NUL") }
        var timeout = Limits.defaultCommandTimeoutSeconds
        if let t = json["timeout"], t != .null {
            guard let v = t.intValue, Limits.commandTimeoutSeconds.contains(Int(v)) else {
                throw AgentCoreError.invalidField("timeout", "Member must be an integer between 1 and 3600")
            }
            timeout = Int(v)
        }
        self.init(command: command, timeoutSeconds: timeout)
    }
}

import CubicleJSON

/// Where a runtime's agent listens, by protocol (AGENTCORE.md §2).
public enum AgentProtocol: String, Sendable, CaseIterable {
    case http = "HTTP"
    case mcp = "MCP"
    case a2a = "A2A"

    public var port: UInt16 {
        switch self {
        case .http: 8080
        case .mcp: 8000
        case .a2a: 9000
        }
    }

    public var invocationPath: String {
        switch self {
        case .http: "/invocations"
        case .mcp: "/mcp"
        case .a2a: "/"
        }
    }

    /// Health endpoint polled for readiness and busy state; MCP and A2A servers have none in the
    /// contract, so for them a TCP connect is the health check.
    public var pingPath: String? { self == .http ? "/ping" : nil }
}
