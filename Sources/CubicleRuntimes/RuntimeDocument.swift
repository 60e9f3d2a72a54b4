import CubicleAgentCore
import CubicleImages
import CubicleJSON
import CubicleNetwork

/// A runtime version's document: CreateAgentRuntime's and UpdateAgentRuntime's fields, checked against
/// botocore's model and against what Cubicle can honour, and turned into the sandbox configuration sessions
/// of that version get. A field Cubicle cannot honour is refused by name, never dropped.
public enum RuntimeDocument {
    /// What turning documents into configurations needs of the daemon.
    public struct Context: Sendable {
        public var lifecycleMinimumSeconds = 60
        /// Roles whose credentials the metadata endpoint can serve.
        public var mappedRoles: Set<String> = []
        /// Host directories under which `host:` code directories and `oci:`/archive images may be named
        /// (`--code-root`); none by default, so the control plane cannot make a host path readable in a sandbox.
        public var codeRoots: [String] = []
        public init() {}
    }

    /// The fields a version document keeps, as the request names them.
    static let versionFields = ["agentRuntimeArtifact", "roleArn", "networkConfiguration", "description", "authorizerConfiguration",
                                "requestHeaderConfiguration", "protocolConfiguration", "lifecycleConfiguration", "environmentVariables",
                                "filesystemConfigurations", "metadataConfiguration"]
    /// Cubicle's own settings, as `cubicle:` tags on the runtime, read when a version is made.
    public static let settingTags = ["cubicle:command", "cubicle:memory", "cubicle:cpus", "cubicle:pids", "cubicle:openFiles", "cubicle:tmpfs",
                                     "cubicle:warmPool", "cubicle:egress.allow", "cubicle:egress.deny", "cubicle:sessionStorage",
                                     "cubicle:requestSeconds", "cubicle:streamSeconds", "cubicle:webSocketSeconds"]

    /// Checks a Create/UpdateAgentRuntime body (`allowed`: the operation's other members) and returns the
    /// version document: its modelled fields plus `cubicle`, the settings taken from `tags`.
    public static func version(from body: [String: JSON], tags: [String: String], allowed: Set<String>, context: Context) throws(AgentCoreError) -> JSON {
        for key in body.keys where !versionFields.contains(key) && !allowed.contains(key) {
            throw AgentCoreError(.validation, "Unknown field \(key)", reason: .fieldValidationFailed, fields: [(key, "is not a member of this operation")])
        }
        for required in ["agentRuntimeArtifact", "roleArn", "networkConfiguration"] where body[required] == nil {
            throw AgentCoreError.invalidField(required, "Member must not be null")
        }
        var doc: [String: JSON] = [:]
        for key in versionFields { if let v = body[key], v != .null { doc[key] = v } }
        var settings: [String: JSON] = [:]
        for (k, v) in tags where k.hasPrefix("cubicle:") { settings[k] = .string(v) }
        doc["cubicle"] = .object(settings)
        let document = JSON.object(doc)
        _ = try config(document, id: "check-0000000000", version: 1, context: context)
        return document
    }

    /// Tags as CreateAgentRuntime, CreateAgentRuntimeEndpoint and TagResource take them; `cubicle:` keys
    /// must be Cubicle's settings.
    public static func tags(_ value: JSON?, field: String = "tags") throws(AgentCoreError) -> [String: String] {
        guard let value, value != .null else { return [:] }
        guard let map = value.stringMap else { throw AgentCoreError.invalidField(field, "must be a map of strings to strings") }
        guard map.count <= 50 else { throw AgentCoreError.invalidField(field, "Member must have length less than or equal to 50") }
        for (k, v) in map {
            guard (1...128).contains(k.utf8.count) else { throw AgentCoreError.invalidField("\(field).\(k)", "tag keys are 1 to 128 characters") }
            guard v.utf8.count <= 256 else { throw AgentCoreError.invalidField("\(field).\(k)", "tag values are at most 256 characters") }
            guard !k.lowercased().hasPrefix("aws:") else { throw AgentCoreError.invalidField("\(field).\(k)", "the aws: prefix is reserved") }
            if k.hasPrefix("cubicle:") && !settingTags.contains(k) {
                throw AgentCoreError.invalidField("\(field).\(k)", "is not one of Cubicle's settings (\(settingTags.joined(separator: ", ")))")
            }
        }
        return map
    }

    /// The sandbox configuration of one version. Throws what a request with this document is refused for.
    public static func config(_ document: JSON, id: String, version: Int, context: Context) throws(AgentCoreError) -> RuntimeConfig {
        var r = RuntimeConfig(name: id, command: [])
        r.version = version
        let settings = document["cubicle"]?.stringMap ?? [:]
        // The artifact: an image, or (Cubicle's extension) a host code directory run by `cubicle:command`.
        guard let artifact = document["agentRuntimeArtifact"]?.objectValue else {
            throw AgentCoreError.invalidField("agentRuntimeArtifact", "must be a structure with containerConfiguration")
        }
        if artifact["codeConfiguration"] != nil {
            throw AgentCoreError.invalidField("agentRuntimeArtifact.codeConfiguration",
                                              "code from S3 on a managed runtime is not supported by Cubicle; give containerConfiguration.containerUri (an image), or host:/DIR with the cubicle:command tag")
        }
        if let unknown = artifact.keys.first(where: { $0 != "containerConfiguration" }) {
            throw AgentCoreError.invalidField("agentRuntimeArtifact.\(unknown)", "is not a member of AgentRuntimeArtifact")
        }
        guard let uri = artifact["containerConfiguration"]?["containerUri"]?.stringValue, (1...1024).contains(uri.utf8.count) else {
            throw AgentCoreError.invalidField("agentRuntimeArtifact.containerConfiguration.containerUri", "is required: 1 to 1024 characters")
        }
        if let command = settings["cubicle:command"] {
            r.command = command.split(separator: " ").map(String.init)
            guard !r.command.isEmpty, r.command[0].hasPrefix("/") else {
                throw AgentCoreError.invalidField("tags.cubicle:command", "must be an absolute program path and its arguments, separated by spaces")
            }
        }
        if uri.hasPrefix("host:") {
            let dir = String(uri.dropFirst(5))
            try requireUnderCodeRoot(dir, field: "agentRuntimeArtifact.containerConfiguration.containerUri", context)
            guard !r.command.isEmpty else {
                throw AgentCoreError.invalidField("tags.cubicle:command", "is required with a host: artifact: the agent's argv, e.g. /app/agent --port 8080")
            }
            r.codeDirectory = dir
        } else if let scheme = ["oci:", "oci-archive:", "docker-archive:"].first(where: { uri.hasPrefix($0) }) {
            var path = String(uri.dropFirst(scheme.count))
            if let colon = path.lastIndex(of: ":"), !path[colon...].contains("/") { path = String(path[..<colon]) }
            try requireUnderCodeRoot(path, field: "agentRuntimeArtifact.containerConfiguration.containerUri", context)
            r.containerUri = uri
        } else {
            do { _ = try ImageReference(uri) } catch {
                throw AgentCoreError.invalidField("agentRuntimeArtifact.containerConfiguration.containerUri", "\(error)")
            }
            r.containerUri = uri
        }
        // Role and network.
        guard let role = document["roleArn"]?.stringValue, DaemonConfig.isRoleArn(role) else {
            throw AgentCoreError.invalidField("roleArn", "Member must satisfy regular expression pattern: arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+")
        }
        guard let network = document["networkConfiguration"]?.objectValue, let mode = network["networkMode"]?.stringValue else {
            throw AgentCoreError.invalidField("networkConfiguration.networkMode", "Member must not be null")
        }
        if let unknown = network.keys.first(where: { $0 != "networkMode" }) {
            throw AgentCoreError.invalidField("networkConfiguration.\(unknown)", unknown == "networkModeConfig"
                ? "VPC configuration is not supported by Cubicle" : "is not a member of NetworkConfiguration")
        }
        switch mode {
        case "PUBLIC": r.networkMode = .public
        case "SANDBOX": r.networkMode = .sandbox
        case "VPC": throw AgentCoreError.invalidField("networkConfiguration.networkMode", "VPC is not supported by Cubicle; use PUBLIC (egress under the runtime's policy) or SANDBOX (no network)")
        default: throw AgentCoreError.invalidField("networkConfiguration.networkMode", "Member must satisfy enum value set: [PUBLIC, VPC] (Cubicle also takes SANDBOX)")
        }
        if r.networkMode == .public {
            guard context.mappedRoles.contains(role) else {
                throw AgentCoreError.invalidField("roleArn", "\(role) has no entry in cubicled's roleCredentials, so a PUBLIC session's metadata endpoint could not serve its credentials")
            }
            r.roleArn = role
        }
        if let d = document["description"] {
            guard let s = d.stringValue, (1...4096).contains(s.utf8.count) else { throw AgentCoreError.invalidField("description", "Member must have length between 1 and 4096") }
        }
        if let a = document["authorizerConfiguration"] { r.authorizer = try JWTAuthorizerConfiguration.parse(a) }
        if let h = document["requestHeaderConfiguration"] {
            guard let list = h["requestHeaderAllowlist"]?.arrayValue, h.objectValue?.count == 1, (1...20).contains(list.count) else {
                throw AgentCoreError.invalidField("requestHeaderConfiguration.requestHeaderAllowlist", "must be a list of 1 to 20 header names")
            }
            for item in list {
                guard let name = item.stringValue, isHeaderName(name) else {
                    throw AgentCoreError.invalidField("requestHeaderConfiguration.requestHeaderAllowlist", "Member must satisfy regular expression pattern: [A-Za-z][A-Za-z0-9_-]{0,255}")
                }
                r.requestHeaderAllowlist.insert(name.lowercased())
            }
        }
        if let p = document["protocolConfiguration"] {
            guard let name = p["serverProtocol"]?.stringValue, p.objectValue?.count == 1 else {
                throw AgentCoreError.invalidField("protocolConfiguration.serverProtocol", "Member must not be null")
            }
            guard let proto = AgentProtocol(rawValue: name) else {
                throw AgentCoreError.invalidField("protocolConfiguration.serverProtocol", name == "AGUI"
                    ? "AGUI is not supported by Cubicle yet; use HTTP, MCP or A2A" : "Member must satisfy enum value set: [MCP, HTTP, A2A, AGUI]")
            }
            r.serverProtocol = proto
        }
        if let l = document["lifecycleConfiguration"] {
            guard let o = l.objectValue else { throw AgentCoreError.invalidField("lifecycleConfiguration", "must be a structure") }
            let range = context.lifecycleMinimumSeconds...CubicleAgentCore.Limits.lifecycleSeconds.upperBound
            for (key, value) in o {
                guard let n = value.intValue, range.contains(Int(n)) else {
                    throw AgentCoreError.invalidField("lifecycleConfiguration.\(key)", "Member must be between \(range.lowerBound) and \(range.upperBound)")
                }
                switch key {
                case "idleRuntimeSessionTimeout": r.idleRuntimeSessionTimeout = Int(n)
                case "maxLifetime": r.maxLifetime = Int(n)
                default: throw AgentCoreError.invalidField("lifecycleConfiguration.\(key)", "is not a member of LifecycleConfiguration")
                }
            }
            guard r.idleRuntimeSessionTimeout <= r.maxLifetime else {
                throw AgentCoreError.invalidField("lifecycleConfiguration.idleRuntimeSessionTimeout", "must not exceed maxLifetime (\(r.maxLifetime))")
            }
        }
        if let e = document["environmentVariables"] {
            guard let map = e.stringMap, map.count <= 50 else { throw AgentCoreError.invalidField("environmentVariables", "must be a map of at most 50 strings") }
            for (k, v) in map {
                guard (1...100).contains(k.utf8.count), !k.contains("="), !k.utf8.contains(0), v.utf8.count <= 5000, !v.utf8.contains(0) else {
                    throw AgentCoreError.invalidField("environmentVariables.\(k)", "names are 1 to 100 characters without = or NUL, values at most 5000")
                }
            }
            r.environment = map
        }
        if let f = document["filesystemConfigurations"] { r.sessionStorage = try sessionStorage(f) }
        if let m = document["metadataConfiguration"] {
            // Cubicle's metadata endpoint speaks IMDSv2 only, which meets requireMMDSV2 either way.
            guard m["requireMMDSV2"]?.boolValue != nil, m.objectValue?.count == 1 else {
                throw AgentCoreError.invalidField("metadataConfiguration.requireMMDSV2", "Member must not be null")
            }
        }
        try apply(settings, to: &r)
        return r
    }

    static func apply(_ settings: [String: String], to r: inout RuntimeConfig) throws(AgentCoreError) {
        func size(_ key: String, _ range: ClosedRange<Int64>) throws(AgentCoreError) -> Int64? {
            guard let text = settings[key] else { return nil }
            guard let v = Fields.parseSize(text), range.contains(v) else { throw AgentCoreError.invalidField("tags.\(key)", "must be a size between \(range.lowerBound) and \(range.upperBound) bytes, like 512MiB") }
            return v
        }
        func int(_ key: String, _ range: ClosedRange<Int>) throws(AgentCoreError) -> Int? {
            guard let text = settings[key] else { return nil }
            guard let v = Int(text), range.contains(v) else { throw AgentCoreError.invalidField("tags.\(key)", "must be an integer between \(range.lowerBound) and \(range.upperBound)") }
            return v
        }
        if let v = try size("cubicle:memory", (16 << 20)...(1 << 40)) { r.limits.memoryBytes = v }
        if let v = try size("cubicle:tmpfs", (1 << 20)...(1 << 40)) { r.limits.tmpfsBytes = v }
        if let text = settings["cubicle:cpus"] {
            guard let v = Double(text), (0.01...1024).contains(v) else { throw AgentCoreError.invalidField("tags.cubicle:cpus", "must be a number between 0.01 and 1024") }
            r.limits.cpus = v
        }
        if let v = try int("cubicle:pids", 8...1_000_000) { r.limits.pids = v }
        if let v = try int("cubicle:openFiles", 64...1_048_576) { r.limits.openFiles = v }
        if let v = try int("cubicle:warmPool", 0...100) { r.warmPool = v }
        if let v = try int("cubicle:requestSeconds", 1...86_400) { r.limits.requestSeconds = v }
        if let v = try int("cubicle:streamSeconds", 1...86_400) { r.limits.streamSeconds = v }
        if let v = try int("cubicle:webSocketSeconds", 1...86_400) { r.limits.webSocketSeconds = v }
        if let v = try size("cubicle:sessionStorage", (16 << 20)...(1 << 40)) {
            guard r.sessionStorage != nil else { throw AgentCoreError.invalidField("tags.cubicle:sessionStorage", "caps session storage, which needs filesystemConfigurations with sessionStorage") }
            r.sessionStorage?.bytes = v
        }

        for (key, path) in [("cubicle:egress.allow", \EgressPolicy.allow), ("cubicle:egress.deny", \EgressPolicy.deny)] {
            guard let text = settings[key] else { continue }
            guard r.networkMode == .public else { throw AgentCoreError.invalidField("tags.\(key)", "applies to PUBLIC runtimes only") }
            for item in text.split(separator: " ") {
                guard let entry = EgressPolicy.Entry(String(item)) else {
                    throw AgentCoreError.invalidField("tags.\(key)", "\(item) is neither a CIDR nor a DNS name (api.example.com, *.example.com)")
                }
                r.egress[keyPath: path].append(entry)
            }
        }
    }

    /// `filesystemConfigurations`: at most one `sessionStorage` with a `/mnt/NAME` mount path; EFS and S3
    /// Files access points are AWS's own and refused by name.
    public static func sessionStorage(_ f: JSON, field: String = "filesystemConfigurations") throws(AgentCoreError) -> RuntimeConfig.SessionStorageConfig? {
        guard let list = f.arrayValue, list.count <= 5 else { throw AgentCoreError.invalidField(field, "must be a list of at most 5 file system configurations") }
        var found: RuntimeConfig.SessionStorageConfig?
        for (i, item) in list.enumerated() {
            guard let o = item.objectValue, o.count == 1 else { throw AgentCoreError.invalidField("\(field)[\(i)]", "must name exactly one of sessionStorage, efsAccessPoint, s3FilesAccessPoint") }
            guard let storage = o["sessionStorage"] else {
                throw AgentCoreError.invalidField("\(field)[\(i)]", "EFS and S3 Files access points are not supported by Cubicle; sessionStorage is")
            }
            guard found == nil else { throw AgentCoreError.invalidField("\(field)[\(i)]", "only one sessionStorage per runtime") }
            guard let text = storage["mountPath"]?.stringValue, storage.objectValue?.count == 1 else {
                throw AgentCoreError.invalidField("\(field)[\(i)].sessionStorage.mountPath", "Member must not be null")
            }
            guard let path = RuntimeConfig.SessionStorageConfig.mountPath(text) else {
                throw AgentCoreError.invalidField("\(field)[\(i)].sessionStorage.mountPath", "Member must satisfy regular expression pattern: /mnt/[a-zA-Z0-9._-]+/?")
            }
            found = RuntimeConfig.SessionStorageConfig(mountPath: path)
        }
        return found
    }

    static func requireUnderCodeRoot(_ path: String, field: String, _ context: Context) throws(AgentCoreError) {
        guard path.hasPrefix("/"), !path.split(separator: "/").contains(".."), !path.utf8.contains(0) else {
            throw AgentCoreError.invalidField(field, "must name an absolute path without ..")
        }
        guard context.codeRoots.contains(where: { root in path == root || path.hasPrefix(root.hasSuffix("/") ? root : root + "/") }) else {
            throw AgentCoreError.invalidField(field, context.codeRoots.isEmpty
                ? "host paths are off: cubicled was started without --code-root, so the control plane cannot make a host directory readable in sandboxes"
                : "\(path) is not under a --code-root (\(context.codeRoots.joined(separator: ", ")))")
        }
    }

    static func isHeaderName(_ s: String) -> Bool {
        let u = Array(s.utf8)
        guard (1...256).contains(u.count), (u[0] | 0x20) >= 0x61 && (u[0] | 0x20) <= 0x7A else { return false }
        return u.allSatisfy { ($0 | 0x20) >= 0x61 && ($0 | 0x20) <= 0x7A || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F || $0 == 0x2D }
    }

    // MARK: - Declared runtimes

    /// A YAML runtime as the control plane shows it: version 1 behind DEFAULT, READY, marked declared.
    public static func declaredRecord(_ runtime: RuntimeConfig, now: Double) -> RuntimeRecord {
        var doc: [String: JSON] = [
            "agentRuntimeArtifact": ["containerConfiguration": ["containerUri": .string(runtime.containerUri ?? "host:" + (runtime.codeDirectory ?? "/"))]],
            "networkConfiguration": ["networkMode": .string(runtime.networkMode.rawValue)],
            "protocolConfiguration": ["serverProtocol": .string(runtime.serverProtocol.rawValue)],
            "lifecycleConfiguration": ["idleRuntimeSessionTimeout": .int(Int64(runtime.idleRuntimeSessionTimeout)), "maxLifetime": .int(Int64(runtime.maxLifetime))],
            "environmentVariables": .strings(runtime.environment),
        ]
        if let role = runtime.roleArn { doc["roleArn"] = .string(role) }
        if !runtime.requestHeaderAllowlist.isEmpty {
            doc["requestHeaderConfiguration"] = ["requestHeaderAllowlist": .array(runtime.requestHeaderAllowlist.sorted().map { .string($0) })]
        }
        var record = RuntimeRecord(id: runtime.name, name: runtime.name, createdAt: now, status: .ready,
                                   versions: [RuntimeVersionRecord(version: 1, createdAt: now, status: .ready, document: .object(doc))],
                                   endpoints: [RuntimeEndpointRecord(name: RuntimeEndpointRecord.defaultName, id: runtime.name + "-DEFAULT",
                                                                     liveVersion: 1, targetVersion: 1, status: .ready, createdAt: now)])
        record.declared = true
        return record
    }
}
