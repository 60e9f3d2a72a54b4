/// Which operation a data-plane request is, decided from the method and the raw (still percent-encoded)
/// path, so an ARN's encoded `/` and `:` never split it.
public enum Route: Equatable, Sendable {
    case invoke(RuntimeAddress)
    case stopSession(RuntimeAddress)
    case command(RuntimeAddress)
    case agentCard(RuntimeAddress)
    /// A WebSocket to the agent's `/ws` (an upgrade; anything else there is refused).
    case webSocket(RuntimeAddress)
    /// An interactive shell in a session (a WebSocket upgrade too).
    case shell(RuntimeAddress)
    case ping
    case metrics

    /// - Parameters:
    ///   - path: the request target's path, percent-encoded as it arrived.
    ///   - query: the raw query string, if any.
    public static func parse(method: String, path: String, query: String?) throws(AgentCoreError) -> Route {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
        if method == "GET" && segments == ["ping"] { return .ping }
        if method == "GET" && segments == ["metrics"] { return .metrics }
        guard segments.count >= 3, segments[0] == "runtimes" else {
            throw AgentCoreError(.resourceNotFound, "No operation matches \(method) \(String(path.prefix(200)))")
        }
        let rest = Array(segments[2...])
        let make: (RuntimeAddress) -> Route
        switch (method, rest) {
        case ("POST", ["invocations"]): make = Route.invoke
        case ("POST", ["stopruntimesession"]): make = Route.stopSession
        case ("POST", ["commands"]): make = Route.command
        case ("GET", ["invocations", ".well-known", "agent-card.json"]): make = Route.agentCard
        case ("GET", ["ws"]): make = Route.webSocket
        case ("GET", ["ws", "shells"]): make = Route.shell
        default: throw AgentCoreError(.resourceNotFound, "No operation matches \(method) \(String(path.prefix(200)))")
        }
        guard let identifier = PercentEncoding.decode(segments[1]) else {
            throw AgentCoreError.invalidField("agentRuntimeArn", "not valid percent-encoded UTF-8")
        }
        let params = QueryString.parse(query ?? "")
        return make(try RuntimeAddress.parse(identifier, accountId: params["accountId"], qualifier: params["qualifier"]))
    }
}

/// Which runtime a request names: the `runtime/NAME` part of an ARN, or a bare name with `accountId`.
public struct RuntimeAddress: Equatable, Sendable {
    public var name: String
    public var qualifier: String?

    public init(name: String, qualifier: String? = nil) {
        self.name = name
        self.qualifier = qualifier
    }

    public static func parse(_ identifier: String, accountId: String?, qualifier: String?) throws(AgentCoreError) -> RuntimeAddress {
        if let accountId, !(accountId.utf8.count == 12 && accountId.utf8.allSatisfy { $0 >= 0x30 && $0 <= 0x39 }) {
            throw AgentCoreError.invalidField("accountId", "Member must satisfy regular expression pattern: [0-9]{12}")
        }
        let name: String
        if identifier.hasPrefix("arn:") {
            // arn:PARTITION:bedrock-agentcore:REGION:ACCOUNT:runtime/NAME
            let parts = identifier.split(separator: ":", maxSplits: 5, omittingEmptySubsequences: false)
            guard parts.count == 6, parts[2] == "bedrock-agentcore", parts[5].hasPrefix("runtime/") else {
                throw AgentCoreError.invalidField("agentRuntimeArn", "must be arn:aws:bedrock-agentcore:REGION:ACCOUNT:runtime/NAME")
            }
            name = String(parts[5].dropFirst("runtime/".count))
        } else {
            guard accountId != nil else {
                throw AgentCoreError(.validation, "accountId is required when agentRuntimeArn is a runtime name rather than an ARN",
                                     reason: .fieldValidationFailed, fields: [("accountId", "required with a bare runtime name")])
            }
            name = identifier
        }
        guard isValidName(name) else {
            throw AgentCoreError.invalidField("agentRuntimeArn", "runtime name must match [a-zA-Z][a-zA-Z0-9_-]{0,99}")
        }
        return RuntimeAddress(name: name, qualifier: qualifier)
    }

    /// CreateAgentRuntime's name pattern, widened to allow `-` so runtime ids (NAME-xxxxxxxxxx) work too.
    public static func isValidName(_ name: String) -> Bool {
        let u = Array(name.utf8)
        guard (1...100).contains(u.count), isLetter(u[0]) else { return false }
        return u.allSatisfy { isLetter($0) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F || $0 == 0x2D }
    }

    private static func isLetter(_ c: UInt8) -> Bool { (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) }
}

public enum PercentEncoding {
    /// Strict: a `%` must start two hex digits, and the result must be UTF-8.
    public static func decode(_ text: String) -> String? {
        var out: [UInt8] = []
        let u = Array(text.utf8)
        out.reserveCapacity(u.count)
        var i = 0
        while i < u.count {
            if u[i] == 0x25 {
                guard i + 2 < u.count, let h = hex(u[i + 1]), let l = hex(u[i + 2]) else { return nil }
                out.append(h << 4 | l)
                i += 3
            } else {
                out.append(u[i])
                i += 1
            }
        }
        return String(validating: out, as: UTF8.self)
    }

    /// Encodes everything but RFC 3986 unreserved characters, as botocore does for a URI label (SigV4's
    /// canonical URI uses the same encoding).
    public static func encode(_ text: String) -> String {
        var out: [UInt8] = []
        SigV4.encode(Array(text.utf8)[...], into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    private static func hex(_ c: UInt8) -> UInt8? { SigV4.Hex.value(c) }
}

public enum QueryString {
    /// Last value wins; pairs that do not decode are dropped.
    public static func parse(_ query: String) -> [String: String] {
        var out: [String: String] = [:]
        for pair in query.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let k = PercentEncoding.decode(String(kv[0]).replacing("+", with: " ")) else { continue }
            let v = kv.count > 1 ? PercentEncoding.decode(String(kv[1]).replacing("+", with: " ")) : ""
            if let v { out[k] = v }
        }
        return out
    }
}
