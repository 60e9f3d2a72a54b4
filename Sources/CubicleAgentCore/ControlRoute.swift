/// Which `bedrock-agentcore-control` operation a request is (API 2023-06-05), from its method and raw path.
/// Its routes share `/runtimes/` with the data plane's but never collide: the data plane's are POSTs to
/// `/runtimes/{arn}/invocations|stopruntimesession|commands`, the control plane's end in `/`, `versions/` or
/// `runtime-endpoints/...`, and tags live under `/tags/`.
public enum ControlRoute: Equatable, Sendable {
    case createRuntime
    case listRuntimes
    case getRuntime(id: String)
    case updateRuntime(id: String)
    case deleteRuntime(id: String)
    case listVersions(id: String)
    case createEndpoint(id: String)
    case listEndpoints(id: String)
    case getEndpoint(id: String, name: String)
    case updateEndpoint(id: String, name: String)
    case deleteEndpoint(id: String, name: String)
    case tagResource(arn: String)
    case untagResource(arn: String)
    case listTags(arn: String)

    /// The operation's name, as IAM and logs say it.
    public var operation: String {
        switch self {
        case .createRuntime: "CreateAgentRuntime"
        case .listRuntimes: "ListAgentRuntimes"
        case .getRuntime: "GetAgentRuntime"
        case .updateRuntime: "UpdateAgentRuntime"
        case .deleteRuntime: "DeleteAgentRuntime"
        case .listVersions: "ListAgentRuntimeVersions"
        case .createEndpoint: "CreateAgentRuntimeEndpoint"
        case .listEndpoints: "ListAgentRuntimeEndpoints"
        case .getEndpoint: "GetAgentRuntimeEndpoint"
        case .updateEndpoint: "UpdateAgentRuntimeEndpoint"
        case .deleteEndpoint: "DeleteAgentRuntimeEndpoint"
        case .tagResource: "TagResource"
        case .untagResource: "UntagResource"
        case .listTags: "ListTagsForResource"
        }
    }

    /// nil when the request is no control-plane operation (the data plane answers it).
    public static func parse(method: String, path: String) throws(AgentCoreError) -> ControlRoute? {
        var segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
        guard let first = segments.first else { return nil }
        if first == "tags" {
            guard segments.count == 2, !segments[1].isEmpty else { return nil }
            guard let arn = PercentEncoding.decode(segments[1]) else { throw AgentCoreError.invalidField("resourceArn", "not valid percent-encoded UTF-8") }
            try checkLength(arn, "resourceArn", 20...1011)
            switch method {
            case "POST": return .tagResource(arn: arn)
            case "DELETE": return .untagResource(arn: arn)
            case "GET": return .listTags(arn: arn)
            default: return nil
            }
        }
        // Every control-plane path under /runtimes/ ends in a slash (botocore writes them so); tolerate its absence.
        guard first == "runtimes" else { return nil }
        if segments.last == "" { segments.removeLast() }
        let rest = Array(segments.dropFirst())
        func id(_ s: String) throws(AgentCoreError) -> String {
            guard let d = PercentEncoding.decode(s) else { throw AgentCoreError.invalidField("agentRuntimeId", "not valid percent-encoded UTF-8") }
            guard RuntimeAddress.isValidName(d) else { throw AgentCoreError.invalidField("agentRuntimeId", "Member must satisfy regular expression pattern: [a-zA-Z][a-zA-Z0-9_]{0,99}-[a-zA-Z0-9]{10}") }
            return d
        }
        func endpoint(_ s: String) throws(AgentCoreError) -> String {
            guard let d = PercentEncoding.decode(s), isEndpointName(d) else {
                throw AgentCoreError.invalidField("endpointName", "Member must satisfy regular expression pattern: [a-zA-Z][a-zA-Z0-9_]{0,47}")
            }
            return d
        }
        switch (method, rest.count) {
        case ("PUT", 0): return .createRuntime
        case ("POST", 0): return .listRuntimes
        case ("GET", 1): return .getRuntime(id: try id(rest[0]))
        case ("PUT", 1): return .updateRuntime(id: try id(rest[0]))
        case ("DELETE", 1): return .deleteRuntime(id: try id(rest[0]))
        case ("POST", 2) where rest[1] == "versions": return .listVersions(id: try id(rest[0]))
        case ("PUT", 2) where rest[1] == "runtime-endpoints": return .createEndpoint(id: try id(rest[0]))
        case ("POST", 2) where rest[1] == "runtime-endpoints": return .listEndpoints(id: try id(rest[0]))
        case ("GET", 3) where rest[1] == "runtime-endpoints": return .getEndpoint(id: try id(rest[0]), name: try endpoint(rest[2]))
        case ("PUT", 3) where rest[1] == "runtime-endpoints": return .updateEndpoint(id: try id(rest[0]), name: try endpoint(rest[2]))
        case ("DELETE", 3) where rest[1] == "runtime-endpoints": return .deleteEndpoint(id: try id(rest[0]), name: try endpoint(rest[2]))
        default: return nil
        }
    }

    /// CreateAgentRuntime's name pattern, [a-zA-Z][a-zA-Z0-9_]{0,47}; endpoints' names share it.
    public static func isRuntimeName(_ s: String) -> Bool { isEndpointName(s) }

    public static func isEndpointName(_ s: String) -> Bool {
        let u = Array(s.utf8)
        guard (1...48).contains(u.count), (u[0] | 0x20) >= 0x61, (u[0] | 0x20) <= 0x7A else { return false }
        return u.allSatisfy { (($0 | 0x20) >= 0x61 && ($0 | 0x20) <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F }
    }

    static func checkLength(_ s: String, _ field: String, _ range: ClosedRange<Int>) throws(AgentCoreError) {
        guard range.contains(s.utf8.count) else {
            throw AgentCoreError.invalidField(field, "Member must have length between \(range.lowerBound) and \(range.upperBound)")
        }
    }
}

extension QueryString {
    /// Every value of each name, in order: `tagKeys=a&tagKeys=b`.
    public static func parseAll(_ query: String) -> [String: [String]] {
        var out: [String: [String]] = [:]
        for pair in query.split(separator: "&") {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard let k = PercentEncoding.decode(String(kv[0]).replacing("+", with: " ")),
                  let v = kv.count > 1 ? PercentEncoding.decode(String(kv[1]).replacing("+", with: " ")) : "" else { continue }
            out[k, default: []].append(v)
        }
        return out
    }
}
