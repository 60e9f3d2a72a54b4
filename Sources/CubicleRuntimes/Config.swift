import CubicleAgentCore
import CubicleImages
import CubicleJSON
import CubicleNetwork
import CubicleSandbox
import Yams

/// A config the daemon refuses to start with; `field` is the YAML path of what is wrong.
public struct ConfigError: Error, Equatable, CustomStringConvertible, Sendable {
    public var field: String
    public var message: String
    public init(_ field: String, _ message: String) { self.field = field; self.message = message }
    public var description: String { "config: \(field): \(message)" }
}

/// One runtime, with CreateAgentRuntime's field names where AWS has them.
public struct RuntimeConfig: Equatable, Sendable {
    public struct Limits: Equatable, Sendable {
        public var memoryBytes: Int64 = 2 << 30
        /// CPUs the session may use (cgroup quota); AWS gives a session 2 vCPUs.
        public var cpus: Double = 2
        public var pids = 1024
        /// Descriptors each process may hold (RLIMIT_NOFILE). What a whole session may hold is bounded by
        /// its memory (FileBudget), which cubicled makes sure the host's file table can back.
        public var openFiles = 4096
        /// Size of the session's writable /tmp.
        public var tmpfsBytes: Int64 = 512 << 20
        /// AgentCore's request time limits: a synchronous invocation (its whole response) ends after
        /// `requestSeconds` (15 minutes), a streamed one (text/event-stream) after `streamSeconds` (60).
        public var requestSeconds = 900
        public var streamSeconds = 3600
        /// A WebSocket (to the agent's `/ws`, or a shell) is closed after `webSocketSeconds` (60 minutes).
        public var webSocketSeconds = 3600
        public init() {}
    }

    /// The runtime's id: its name for a runtime declared in the YAML file, `NAME-XXXXXXXXXX` for one made
    /// through the control plane. Sessions, metrics and pools are keyed by it.
    public var name: String
    /// Which of the runtime's immutable versions this is (declared runtimes: 1, and the next on a SIGHUP
    /// that changes them).
    public var version = 1
    /// argv of the agent, run inside the sandbox (the code directory is at /app).
    public var command: [String]
    public var codeDirectory: String?
    public var environment: [String: String] = [:]
    public var serverProtocol: AgentProtocol = .http
    public var idleRuntimeSessionTimeout = CubicleAgentCore.Limits.defaultIdleTimeoutSeconds
    public var maxLifetime = CubicleAgentCore.Limits.defaultMaxLifetimeSeconds
    public var limits = Limits()
    /// Lowercased header names passed to the agent besides the contract's own.
    public var requestHeaderAllowlist: Set<String> = []
    public var readOnlyMounts: [SandboxSpec.ReadOnlyMount] = []
    /// Sandboxes kept started and healthy before any session asks; the first invocation of a new session
    /// id claims one (never reused), and the pool refills in the background. Not counted in maxSessions.
    public var warmPool = 0
    /// AgentCore's `networkConfiguration.networkMode`: SANDBOX (loopback only, the default) or PUBLIC.
    public var networkMode = NetworkMode.sandbox
    /// Where a PUBLIC session may connect (`egress: {allow, deny}`).
    public var egress = EgressPolicy()
    /// The role whose credentials a PUBLIC session's metadata endpoint serves (`roleCredentials` maps it).
    public var roleArn: String?
    /// AgentCore's `containerConfiguration.containerUri`: the image whose layers are the session's root
    /// (`REGISTRY/REPO:TAG`, `...@sha256:DIGEST`, or `oci:PATH[:TAG]` for a layout directory). Its
    /// Entrypoint and Cmd are the agent's argv unless `command` is given.
    public var containerUri: String?
    /// AgentCore's `authorizerConfiguration.customJWTAuthorizer`: callers bring a bearer token from this
    /// issuer instead of a SigV4 signature (CubicleAuth checks it), and it reaches the agent.
    public var authorizer: JWTAuthorizerConfiguration?
    /// AgentCore's `filesystemConfigurations: [{sessionStorage: {mountPath}}]`: a file system per session id
    /// at `mountPath`, kept when the session ends and mounted again into its next sandbox.
    public var sessionStorage: SessionStorageConfig?

    public struct SessionStorageConfig: Equatable, Sendable {
        /// `/mnt/NAME`, one level below /mnt, as AWS validates it (a trailing slash dropped).
        public var mountPath: String
        /// The cap on the session's bytes (`limits.sessionStorage`); its inodes follow (one per 16 KiB).
        public var bytes: Int64 = 1 << 30
        public init(mountPath: String) { self.mountPath = mountPath }

        /// `/mnt/[a-zA-Z0-9._-]+/?`, 6 to 200 characters, and not `.` or `..`; nil otherwise.
        public static func mountPath(_ text: String) -> String? {
            guard (6...200).contains(text.utf8.count), text.hasPrefix("/mnt/") else { return nil }
            var name = text.dropFirst(5)
            if name.hasSuffix("/") { name = name.dropLast() }
            guard !name.isEmpty, name != ".", name != "..",
                  name.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A) || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D }) else { return nil }
            return "/mnt/" + name
        }
    }

    public enum NetworkMode: String, Equatable, Sendable {
        case sandbox = "SANDBOX"
        case `public` = "PUBLIC"
    }

    public init(name: String, command: [String]) {
        self.name = name
        self.command = command
    }
}

extension DaemonConfig {
    /// The sessions the host's file table must be able to back: `maxSessions` live ones and every warm
    /// pool's sandboxes, each as large as the largest runtime allows (FileBudget).
    public var fileBudget: (sessions: Int, limits: [FileBudget.Session]) {
        (maxSessions + runtimes.reduce(0) { $0 + $1.warmPool },
         runtimes.map { FileBudget.Session(memoryBytes: $0.limits.memoryBytes, pids: Int64($0.limits.pids), openFiles: Int64($0.limits.openFiles)) })
    }
}

public struct DaemonConfig: Equatable, Sendable {
    public var runtimes: [RuntimeConfig]
    /// Live sessions across all runtimes; one more is refused with ServiceQuotaExceededException.
    public var maxSessions = 1000
    /// The lower bound of both lifecycle timeouts. AWS's is 60 s; lower it only for tests and demos.
    public var lifecycleMinimumSeconds = 60
    /// How often each agent's /ping is polled.
    public var healthPollSeconds: Double = 2
    /// Consecutive failed polls that end a session as unhealthy.
    public var unhealthyAfterFailures = 3
    /// How long a new agent has to answer /ping with 200. AWS's is 30 s.
    public var initializationTimeoutSeconds: Double = 30
    /// How long ended sessions stay listed for operators.
    public var endedRetentionSeconds = 3600
    /// Where the default seccomp profile is replaced, if at all.
    public var seccompProfile: String?
    /// A client connection with no request in progress — idle between requests, or still trickling its
    /// request head — is closed after this long, so slow or idle clients cannot hold connections forever.
    public var clientIdleTimeoutSeconds: Double = 60
    /// How long a data-plane shell (InvokeAgentRuntimeCommandShell) whose client left waits for it to
    /// reconnect with its shellId before it is hung up (AgentCore's window is about 15 minutes).
    public var shellReconnectSeconds: Double = 900
    /// How long sandboxes outlive a cubicled that was killed, waiting for the next one to take them over.
    /// 0: a sandbox ends as soon as its daemon is gone.
    public var restartGraceSeconds = 60
    /// When sessions' CPU time is scheduled below the host's own processes (cgroup `cpu.idle` on the
    /// parent of every session cgroup): `whileThrottled` (the default), `true` (always) or `false` (never).
    public var sessionsYieldCPUToHost = SessionsCPUYield.whileThrottled
    /// Network namespaces made ahead of time for new sandboxes; 0: each sandbox's clone makes its own.
    public var networkNamespacePool = 4
    /// The region sessions are told they run in (AWS_REGION), as AgentCore's runtime tells them.
    public var region = "us-east-1"
    /// The account in runtime ARNs the control plane makes (LocalStack's default).
    public var accountID = "000000000000"
    /// How to reach registries: plain HTTP only where `insecure`, and credentials.
    public var registries: [RegistryAccess] = []
    /// Where each role's credentials come from, for runtimes that name a `roleArn`.
    public var roleCredentials: [RoleCredentialSource] = []
    /// New sandboxes' inits are cloned from a fork server (cubicle-init started once) instead of each being
    /// exec'd by cubicled; false: exec every time.
    public var initForkServer = true
    /// Session storage unused this long is removed (AgentCore: 14 days).
    public var sessionStorageExpirySeconds = 1_209_600

    public init(runtimes: [RuntimeConfig]) { self.runtimes = runtimes }

    public func runtime(named name: String) -> RuntimeConfig? { runtimes.first { $0.name == name } }

    /// The embedded default: one runtime, `demo`, running cubicle-demo-agent from `codeDirectory`.
    public static func embedded(demoCodeDirectory: String) -> DaemonConfig {
        var demo = RuntimeConfig(name: "demo", command: ["/app/cubicle-demo-agent"])
        demo.codeDirectory = demoCodeDirectory
        demo.limits.memoryBytes = 512 << 20
        return DaemonConfig(runtimes: [demo])
    }

    // MARK: - YAML

    public static func parse(yaml text: String) throws(ConfigError) -> DaemonConfig {
        let root: Node
        do {
            guard let node = try Yams.compose(yaml: text) else { throw ConfigError("(file)", "is empty") }
            root = node
        } catch let e as ConfigError {
            throw e
        } catch {
            throw ConfigError("(file)", "is not valid YAML: \(error)")
        }
        let top = try Fields(root, path: "")
        var config = DaemonConfig(runtimes: [])
        if let v = try top.int("maxSessions", 1...1_000_000) { config.maxSessions = v }
        if let v = try top.int("lifecycleMinimumSeconds", 1...CubicleAgentCore.Limits.lifecycleSeconds.upperBound) { config.lifecycleMinimumSeconds = v }
        if let v = try top.double("healthPollSeconds", 0.05...60) { config.healthPollSeconds = v }
        if let v = try top.int("unhealthyAfterFailures", 1...100) { config.unhealthyAfterFailures = v }
        if let v = try top.int("endedRetentionSeconds", 0...604_800) { config.endedRetentionSeconds = v }
        if let v = try top.double("initializationTimeoutSeconds", 0.1...3600) { config.initializationTimeoutSeconds = v }
        if let v = try top.double("clientIdleTimeoutSeconds", 0.1...3600) { config.clientIdleTimeoutSeconds = v }
        if let v = try top.double("shellReconnectSeconds", 0...86_400) { config.shellReconnectSeconds = v }
        if let v = try top.int("restartGraceSeconds", 0...86_400) { config.restartGraceSeconds = v }
        if let v = try top.cpuYield("sessionsYieldCPUToHost") { config.sessionsYieldCPUToHost = v }
        if let v = try top.int("networkNamespacePool", 0...256) { config.networkNamespacePool = v }
        if let v = try top.bool("initForkServer") { config.initForkServer = v }
        if let v = try top.int("sessionStorageExpirySeconds", 1...31_536_000) { config.sessionStorageExpirySeconds = v }
        config.seccompProfile = try top.string("seccompProfile")
        if let region = try top.string("region") {
            guard !region.isEmpty, region.utf8.count <= 32, region.allSatisfy({ $0.isLowercase || $0.isNumber || $0 == "-" }), region.unicodeScalars.allSatisfy(\.isASCII) else {
                throw ConfigError("region", "must be a region name such as us-east-1")
            }
            config.region = region
        }
        if let account = try top.string("accountId") {
            guard account.utf8.count == 12, account.allSatisfy(\.isNumber) else { throw ConfigError("accountId", "must be 12 digits") }
            config.accountID = account
        }
        if let list = top.node("roleCredentials") {
            guard case .sequence(let items) = list else { throw ConfigError("roleCredentials", "must be a list") }
            for (i, item) in items.enumerated() {
                let path = "roleCredentials[\(i)]"
                let f = try Fields(item, path: path)
                guard let arn = try f.string("roleArn"), Self.isRoleArn(arn) else { throw ConfigError("\(path).roleArn", "must be an IAM role ARN, arn:aws:iam::ACCOUNT:role/NAME") }
                guard let file = try f.string("sharedCredentialsFile"), file.hasPrefix("/") else {
                    throw ConfigError("\(path).sharedCredentialsFile", "is required: an absolute path to an AWS shared-credentials file only root can read")
                }
                let profile = try f.string("profile") ?? "default"
                try f.rejectUnknown()
                guard !config.roleCredentials.contains(where: { $0.roleArn == arn }) else { throw ConfigError("\(path).roleArn", "\(arn) is mapped twice") }
                config.roleCredentials.append(RoleCredentialSource(roleArn: arn, profile: profile, sharedCredentialsFile: file))
            }
        }
        if let list = top.node("registries") {
            guard case .sequence(let items) = list else { throw ConfigError("registries", "must be a list") }
            for (i, item) in items.enumerated() {
                let f = try Fields(item, path: "registries[\(i)]")
                guard let host = try f.string("host"), !host.isEmpty, !host.contains("/") else { throw ConfigError("registries[\(i)].host", "is required: HOST[:PORT]") }
                var access = RegistryAccess(host: host)
                access.insecure = try f.bool("insecure") ?? false
                access.username = try f.string("username")
                access.password = try f.string("password")
                guard (access.username == nil) == (access.password == nil) else { throw ConfigError("registries[\(i)]", "username and password go together") }
                try f.rejectUnknown()
                config.registries.append(access)
            }
        }
        guard let list = top.node("runtimes") else { throw ConfigError("runtimes", "is required (a list of runtimes)") }
        guard case .sequence(let items) = list, !items.isEmpty else { throw ConfigError("runtimes", "must be a non-empty list") }
        for (i, item) in items.enumerated() {
            let runtime = try parseRuntime(item, path: "runtimes[\(i)]", minimum: config.lifecycleMinimumSeconds)
            guard config.runtime(named: runtime.name) == nil else { throw ConfigError("runtimes[\(i)].name", "duplicate runtime name \(runtime.name)") }
            if let arn = runtime.roleArn, !config.roleCredentials.contains(where: { $0.roleArn == arn }) {
                throw ConfigError("runtimes[\(i)].roleArn", "\(arn) has no entry in roleCredentials: say where its credentials come from")
            }
            config.runtimes.append(runtime)
        }
        try top.rejectUnknown()
        return config
    }

    /// A YAML subtree as JSON, for the structures the file shares with the API: scalars are strings.
    static func json(_ node: Node) -> JSON {
        switch node {
        case .scalar(let s): return .string(s.string)
        case .sequence(let items): return .array(items.map(json))
        case .mapping(let m): return .object(Dictionary(m.map { ($0.key.string ?? "", json($0.value)) }, uniquingKeysWith: { a, _ in a }))
        case .alias: return .null
        }
    }

    /// arn:aws:iam::123456789012:role/NAME (a path allowed), as CreateAgentRuntime's roleArn pattern has it.
    static func isRoleArn(_ s: String) -> Bool {
        let parts = s.split(separator: ":", maxSplits: 5, omittingEmptySubsequences: false)
        guard parts.count == 6, parts[0] == "arn", parts[1].hasPrefix("aws"), parts[2] == "iam", parts[3].isEmpty,
              parts[4].count == 12, parts[4].allSatisfy(\.isNumber), parts[5].hasPrefix("role/"), s.utf8.count <= 2048 else { return false }
        let name = parts[5].dropFirst(5)
        return !name.isEmpty && name.allSatisfy { $0.isLetter || $0.isNumber || "+=,.@-_/".contains($0) } && name.unicodeScalars.allSatisfy(\.isASCII)
    }

    static func parseRuntime(_ node: Node, path: String, minimum: Int) throws(ConfigError) -> RuntimeConfig {
        let f = try Fields(node, path: path)
        guard let name = try f.string("name") else { throw ConfigError("\(path).name", "is required") }
        guard RuntimeAddress.isValidName(name) else { throw ConfigError("\(path).name", "must match [a-zA-Z][a-zA-Z0-9_-]{0,99}") }
        var containerUri = try f.string("containerUri")
        if containerUri == nil, let c = f.node("containerConfiguration") {
            let cf = try Fields(c, path: "\(path).containerConfiguration")
            containerUri = try cf.string("containerUri")
            try cf.rejectUnknown()
        }
        if let uri = containerUri {
            if let scheme = ["oci:", "oci-archive:", "docker-archive:"].first(where: { uri.hasPrefix($0) }) {
                guard uri.dropFirst(scheme.count).hasPrefix("/") else {
                    throw ConfigError("\(path).containerUri", "\(scheme) takes an absolute path, \(scheme)/PATH[:TAG]")
                }
            } else {
                do { _ = try ImageReference(uri) } catch { throw ConfigError("\(path).containerUri", "\(error)") }
            }
        }
        let command = try f.stringList("command") ?? []
        guard containerUri != nil || (!command.isEmpty && !command[0].isEmpty) else {
            throw ConfigError("\(path).command", "is required without a containerUri: the agent's argv, e.g. [\"/app/agent\"]")
        }
        guard command.isEmpty || !command[0].isEmpty else { throw ConfigError("\(path).command", "must not start with an empty string") }
        var r = RuntimeConfig(name: name, command: command)
        r.containerUri = containerUri
        if let dir = try f.string("codeDirectory") {
            guard dir.hasPrefix("/") else { throw ConfigError("\(path).codeDirectory", "must be an absolute path") }
            r.codeDirectory = dir
        }
        if let env = f.node("environmentVariables") ?? f.node("environment") {
            let envPath = f.node("environmentVariables") != nil ? "\(path).environmentVariables" : "\(path).environment"
            let e = try Fields(env, path: envPath)
            for key in e.keys {
                guard !key.isEmpty, !key.contains("="), !key.utf8.contains(0) else { throw ConfigError("\(envPath).\(key)", "is not a valid variable name") }
                guard let v = try e.string(key) else { continue }
                r.environment[key] = v
            }
        }
        var protocolName = try f.string("protocol")
        if protocolName == nil { protocolName = try f.string("serverProtocol") }
        if let p = protocolName {
            guard let proto = AgentProtocol(rawValue: p.uppercased()) else { throw ConfigError("\(path).protocol", "must be HTTP, MCP or A2A (was \(p))") }
            r.serverProtocol = proto
        }
        let lifecycleRange = minimum...CubicleAgentCore.Limits.lifecycleSeconds.upperBound
        if let l = f.node("lifecycle") ?? f.node("lifecycleConfiguration") {
            let lf = try Fields(l, path: "\(path).lifecycle")
            if let v = try lf.int("idleRuntimeSessionTimeout", lifecycleRange) { r.idleRuntimeSessionTimeout = v }
            if let v = try lf.int("maxLifetime", lifecycleRange) { r.maxLifetime = v }
            try lf.rejectUnknown()
        }
        guard r.idleRuntimeSessionTimeout <= r.maxLifetime else {
            throw ConfigError("\(path).lifecycle.idleRuntimeSessionTimeout", "must not exceed maxLifetime (\(r.maxLifetime))")
        }
        var storageBytes: Int64?
        if let l = f.node("limits") {
            let lf = try Fields(l, path: "\(path).limits")
            if let v = try lf.bytes("memory", (16 << 20)...(1 << 40)) { r.limits.memoryBytes = v }
            if let v = try lf.double("cpus", 0.01...1024) { r.limits.cpus = v }
            if let v = try lf.int("pids", 8...1_000_000) { r.limits.pids = v }
            if let v = try lf.int("openFiles", 64...1_048_576) { r.limits.openFiles = v }
            if let v = try lf.bytes("tmpfs", (1 << 20)...(1 << 40)) { r.limits.tmpfsBytes = v }
            if let v = try lf.int("requestSeconds", 1...86_400) { r.limits.requestSeconds = v }
            if let v = try lf.int("streamSeconds", 1...86_400) { r.limits.streamSeconds = v }
            if let v = try lf.int("webSocketSeconds", 1...86_400) { r.limits.webSocketSeconds = v }
            if let v = try lf.bytes("sessionStorage", (16 << 20)...(1 << 40)) { storageBytes = v }
            try lf.rejectUnknown()
        }
        if let n = try f.int("warmPool", 0...1000) { r.warmPool = n }
        if let list = f.node("filesystemConfigurations") {
            let json = Self.json(list)
            do { r.sessionStorage = try RuntimeDocument.sessionStorage(json, field: "\(path).filesystemConfigurations") } catch {
                throw ConfigError(error.fields.first?.name ?? "\(path).filesystemConfigurations", error.fields.first?.message ?? error.message)
            }
        }
        if let a = f.node("authorizerConfiguration") {
            do { r.authorizer = try JWTAuthorizerConfiguration.parse(Self.json(a), field: "\(path).authorizerConfiguration") } catch {
                throw ConfigError(error.fields.first?.name ?? "\(path).authorizerConfiguration", error.fields.first?.message ?? error.message)
            }
        }
        if let nc = f.node("networkConfiguration") {
            let nf = try Fields(nc, path: "\(path).networkConfiguration")
            if let mode = try nf.string("networkMode") {
                guard let m = RuntimeConfig.NetworkMode(rawValue: mode) else {
                    throw ConfigError("\(path).networkConfiguration.networkMode", "must be SANDBOX or PUBLIC (was \(mode))")
                }
                r.networkMode = m
            }
            try nf.rejectUnknown()
        }
        if let e = f.node("egress") {
            let ef = try Fields(e, path: "\(path).egress")
            for (key, keyPath) in [("allow", \EgressPolicy.allow), ("deny", \EgressPolicy.deny)] {
                guard let list = try ef.stringList(key) else { continue }
                for (j, text) in list.enumerated() {
                    guard let entry = EgressPolicy.Entry(text) else {
                        throw ConfigError("\(path).egress.\(key)[\(j)]", "\(text) is neither a CIDR (10.0.0.0/8, 2001:db8::/32) nor a DNS name (api.example.com, *.example.com)")
                    }
                    r.egress[keyPath: keyPath].append(entry)
                }
            }
            try ef.rejectUnknown()
            guard r.networkMode == .public else { throw ConfigError("\(path).egress", "applies to PUBLIC runtimes only: set networkConfiguration.networkMode: PUBLIC") }
        }
        if let arn = try f.string("roleArn") {
            guard isRoleArn(arn) else { throw ConfigError("\(path).roleArn", "must be an IAM role ARN, arn:aws:iam::ACCOUNT:role/NAME") }
            guard r.networkMode == .public else { throw ConfigError("\(path).roleArn", "is served by the metadata endpoint of PUBLIC sessions: set networkConfiguration.networkMode: PUBLIC") }
            r.roleArn = arn
        }
        if let list = try f.stringList("requestHeaderAllowlist") {
            r.requestHeaderAllowlist = Set(list.map { $0.lowercased() })
        }
        if let mounts = f.node("readOnlyMounts") {
            guard case .sequence(let items) = mounts else { throw ConfigError("\(path).readOnlyMounts", "must be a list") }
            for (i, m) in items.enumerated() {
                let mf = try Fields(m, path: "\(path).readOnlyMounts[\(i)]")
                guard let source = try mf.string("source"), source.hasPrefix("/") else { throw ConfigError("\(path).readOnlyMounts[\(i)].source", "must be an absolute host path") }
                let target = try mf.string("target") ?? source
                guard target.hasPrefix("/"), !target.split(separator: "/").contains("..") else {
                    throw ConfigError("\(path).readOnlyMounts[\(i)].target", "must be an absolute path without ..")
                }
                try mf.rejectUnknown()
                r.readOnlyMounts.append(.init(source: source, target: target))
            }
        }
        try f.rejectUnknown()
        if let storageBytes {
            guard r.sessionStorage != nil else { throw ConfigError("\(path).limits.sessionStorage", "caps session storage, which needs filesystemConfigurations: [{sessionStorage: {mountPath: /mnt/NAME}}]") }
            r.sessionStorage?.bytes = storageBytes
        }
        return r
    }
}

/// A YAML mapping read field by field, so every error names its field and unknown keys are refused.
final class Fields {
    let path: String
    private var entries: [(String, Node)] = []
    private var used: Set<String> = []

    init(_ node: Node, path: String) throws(ConfigError) {
        self.path = path
        guard case .mapping(let mapping) = node else { throw ConfigError(path.isEmpty ? "(file)" : path, "must be a mapping") }
        for (k, v) in mapping {
            guard let key = k.string else { throw ConfigError(path, "has a key that is not a string") }
            entries.append((key, v))
        }
    }

    var keys: [String] { entries.map(\.0) }

    private func name(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func node(_ key: String) -> Node? {
        guard let e = entries.first(where: { $0.0 == key }) else { return nil }
        used.insert(key)
        if case .scalar(let s) = e.1, s.style == .plain, ["", "~", "null", "Null", "NULL"].contains(s.string) { return nil }
        return e.1
    }

    func string(_ key: String) throws(ConfigError) -> String? {
        guard let n = node(key) else { return nil }
        guard case .scalar(let s) = n else { throw ConfigError(name(key), "must be a string") }
        return s.string
    }

    func int(_ key: String, _ range: ClosedRange<Int>) throws(ConfigError) -> Int? {
        guard let n = node(key) else { return nil }
        guard let v = n.int else { throw ConfigError(name(key), "must be an integer") }
        guard range.contains(v) else { throw ConfigError(name(key), "must be between \(range.lowerBound) and \(range.upperBound) (was \(v))") }
        return v
    }

    func bool(_ key: String) throws(ConfigError) -> Bool? {
        guard let n = node(key) else { return nil }
        guard let v = n.bool else { throw ConfigError(name(key), "must be true or false") }
        return v
    }

    func cpuYield(_ key: String) throws(ConfigError) -> SessionsCPUYield? {
        guard let n = node(key) else { return nil }
        if let v = n.bool { return v ? .always : .never }
        if case .scalar(let s) = n, s.string == "whileThrottled" { return .whileThrottled }
        throw ConfigError(name(key), "must be true, false or whileThrottled")
    }

    func double(_ key: String, _ range: ClosedRange<Double>) throws(ConfigError) -> Double? {
        guard let n = node(key) else { return nil }
        guard let v = n.float ?? n.int.map(Double.init) else { throw ConfigError(name(key), "must be a number") }
        guard range.contains(v) else { throw ConfigError(name(key), "must be between \(range.lowerBound) and \(range.upperBound) (was \(v))") }
        return v
    }

    /// An integer of bytes, or a size such as 512MiB, 2GiB, 1G, 64M.
    func bytes(_ key: String, _ range: ClosedRange<Int64>) throws(ConfigError) -> Int64? {
        guard let n = node(key) else { return nil }
        let v: Int64?
        if let i = n.int { v = Int64(i) } else if let s = n.string { v = Self.parseSize(s) } else { v = nil }
        guard let v else { throw ConfigError(name(key), "must be a size in bytes or like 512MiB, 2GiB") }
        guard range.contains(v) else { throw ConfigError(name(key), "must be between \(range.lowerBound) and \(range.upperBound) bytes (was \(v))") }
        return v
    }

    static func parseSize(_ text: String) -> Int64? {
        let t = text.trimmingCharacters(in: .whitespaces)
        let units: [(String, Int64)] = [("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30), ("TiB", 1 << 40),
                                        ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40), ("B", 1)]
        for (suffix, scale) in units where t.hasSuffix(suffix) {
            guard let n = Double(t.dropLast(suffix.count).trimmingCharacters(in: .whitespaces)), n >= 0 else { return nil }
            return Int64(n * Double(scale))
        }
        return Int64(t)
    }

    func stringList(_ key: String) throws(ConfigError) -> [String]? {
        guard let n = node(key) else { return nil }
        guard case .sequence(let items) = n else { throw ConfigError(name(key), "must be a list of strings") }
        var out: [String] = []
        for (i, item) in items.enumerated() {
            guard case .scalar(let s) = item else { throw ConfigError("\(name(key))[\(i)]", "must be a string") }
            guard !s.string.utf8.contains(0) else { throw ConfigError("\(name(key))[\(i)]", "must not contain NUL") }
            out.append(s.string)
        }
        return out
    }

    func rejectUnknown() throws(ConfigError) {
        if let unknown = entries.first(where: { !used.contains($0.0) }) {
            throw ConfigError(name(unknown.0), "is not a known field")
        }
    }
}
