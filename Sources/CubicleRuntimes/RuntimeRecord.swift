import CubicleJSON

/// AgentRuntimeStatus and AgentRuntimeEndpointStatus (the same six values).
public enum RuntimeStatus: String, Sendable, Equatable {
    case creating = "CREATING"
    case createFailed = "CREATE_FAILED"
    case updating = "UPDATING"
    case updateFailed = "UPDATE_FAILED"
    case ready = "READY"
    case deleting = "DELETING"

    /// Work is under way: another change waits for it (ConflictException).
    public var isBusy: Bool { self == .creating || self == .updating || self == .deleting }
}

/// One immutable version of a runtime: the fields CreateAgentRuntime or UpdateAgentRuntime sent (validated,
/// as AWS's names), and the `cubicle:` tags in force when it was made.
public struct RuntimeVersionRecord: Equatable, Sendable {
    public var version: Int
    public var createdAt: Double
    public var status: RuntimeStatus
    public var failureReason: String?
    public var document: JSON

    public init(version: Int, createdAt: Double, status: RuntimeStatus, failureReason: String? = nil, document: JSON) {
        self.version = version
        self.createdAt = createdAt
        self.status = status
        self.failureReason = failureReason
        self.document = document
    }
}

/// A runtime endpoint: `DEFAULT` follows the latest version; a named one stays on the version it names.
public struct RuntimeEndpointRecord: Equatable, Sendable {
    public static let defaultName = "DEFAULT"
    public var name: String
    public var id: String
    /// The version invocations through this endpoint get; nil until its first version is ready.
    public var liveVersion: Int?
    /// The version it is moving to (equal to `liveVersion` once there).
    public var targetVersion: Int?
    public var description: String?
    public var status: RuntimeStatus
    public var failureReason: String?
    public var createdAt: Double
    public var lastUpdatedAt: Double
    public var tags: [String: String] = [:]

    public init(name: String, id: String, liveVersion: Int?, targetVersion: Int?, description: String? = nil,
                status: RuntimeStatus, createdAt: Double) {
        self.name = name
        self.id = id
        self.liveVersion = liveVersion
        self.targetVersion = targetVersion
        self.description = description
        self.status = status
        self.createdAt = createdAt
        self.lastUpdatedAt = createdAt
    }
}

/// A runtime as the control plane keeps it: what GetAgentRuntime and the List calls answer from, and what
/// the store writes as one unit (compare-and-swap on `revision`).
public struct RuntimeRecord: Equatable, Sendable {
    public var id: String
    public var name: String
    public var createdAt: Double
    public var lastUpdatedAt: Double
    /// The runtime's: CREATING/UPDATING while its latest version's work runs, then READY or *_FAILED.
    public var status: RuntimeStatus
    public var failureReason: String?
    public var tags: [String: String]
    /// Bumped by every write; a write that expected another revision lost a race and changes nothing.
    public var revision: Int
    /// Ascending by version.
    public var versions: [RuntimeVersionRecord]
    public var endpoints: [RuntimeEndpointRecord]
    /// Declared in the YAML file, not made through the control plane: changed only by editing the file.
    public var declared = false

    public init(id: String, name: String, createdAt: Double, status: RuntimeStatus, tags: [String: String] = [:],
                versions: [RuntimeVersionRecord] = [], endpoints: [RuntimeEndpointRecord] = []) {
        self.id = id
        self.name = name
        self.createdAt = createdAt
        self.lastUpdatedAt = createdAt
        self.status = status
        self.tags = tags
        self.revision = 0
        self.versions = versions
        self.endpoints = endpoints
    }

    public var latestVersion: Int { versions.last?.version ?? 0 }
    public func version(_ n: Int) -> RuntimeVersionRecord? { versions.first { $0.version == n } }
    public func endpoint(_ name: String) -> RuntimeEndpointRecord? { endpoints.first { $0.name == name } }
    public mutating func updateEndpoint(_ name: String, _ change: (inout RuntimeEndpointRecord) -> Void) {
        if let i = endpoints.firstIndex(where: { $0.name == name }) { change(&endpoints[i]) }
    }
}

/// What a `clientToken` was first used for: the same token with the same request gets the first answer
/// again; with another request, ConflictException.
public struct ClientTokenRecord: Equatable, Sendable {
    public var token: String
    /// The operation and a digest of its request.
    public var fingerprint: String
    public var runtimeID: String
    /// The version or endpoint the first call made, if any.
    public var result: String?
    public var createdAt: Double

    public init(token: String, fingerprint: String, runtimeID: String, result: String?, createdAt: Double) {
        self.token = token
        self.fingerprint = fingerprint
        self.runtimeID = runtimeID
        self.result = result
        self.createdAt = createdAt
    }
}

// MARK: - Documents as the store writes them

extension RuntimeVersionRecord {
    public var json: JSON {
        var o: [String: JSON] = ["version": .int(Int64(version)), "createdAt": .double(createdAt), "status": .string(status.rawValue),
                                 "document": document]
        if let failureReason { o["failureReason"] = .string(failureReason) }
        return .object(o)
    }

    public init?(json: JSON) {
        guard let v = json["version"]?.intValue, let c = json["createdAt"]?.doubleValue,
              let s = json["status"]?.stringValue.flatMap(RuntimeStatus.init(rawValue:)), let d = json["document"] else { return nil }
        self.init(version: Int(v), createdAt: c, status: s, failureReason: json["failureReason"]?.stringValue, document: d)
    }
}

extension RuntimeEndpointRecord {
    public var json: JSON {
        var o: [String: JSON] = ["name": .string(name), "id": .string(id), "status": .string(status.rawValue),
                                 "createdAt": .double(createdAt), "lastUpdatedAt": .double(lastUpdatedAt), "tags": .strings(tags)]
        if let liveVersion { o["liveVersion"] = .int(Int64(liveVersion)) }
        if let targetVersion { o["targetVersion"] = .int(Int64(targetVersion)) }
        if let description { o["description"] = .string(description) }
        if let failureReason { o["failureReason"] = .string(failureReason) }
        return .object(o)
    }

    public init?(json: JSON) {
        guard let n = json["name"]?.stringValue, let id = json["id"]?.stringValue,
              let s = json["status"]?.stringValue.flatMap(RuntimeStatus.init(rawValue:)),
              let c = json["createdAt"]?.doubleValue, let u = json["lastUpdatedAt"]?.doubleValue else { return nil }
        self.init(name: n, id: id, liveVersion: json["liveVersion"]?.intValue.map(Int.init), targetVersion: json["targetVersion"]?.intValue.map(Int.init),
                  description: json["description"]?.stringValue, status: s, createdAt: c)
        lastUpdatedAt = u
        failureReason = json["failureReason"]?.stringValue
        tags = json["tags"]?.stringMap ?? [:]
    }
}

extension RuntimeRecord {
    /// The runtime's own fields (versions and endpoints are rows of their own).
    public var headerJSON: JSON {
        var o: [String: JSON] = ["createdAt": .double(createdAt), "lastUpdatedAt": .double(lastUpdatedAt),
                                 "status": .string(status.rawValue), "tags": .strings(tags)]
        if let failureReason { o["failureReason"] = .string(failureReason) }
        return .object(o)
    }

    public init?(id: String, name: String, revision: Int, header: JSON, versions: [JSON], endpoints: [JSON]) {
        guard let c = header["createdAt"]?.doubleValue, let u = header["lastUpdatedAt"]?.doubleValue,
              let s = header["status"]?.stringValue.flatMap(RuntimeStatus.init(rawValue:)) else { return nil }
        let v = versions.compactMap(RuntimeVersionRecord.init(json:)).sorted { $0.version < $1.version }
        let e = endpoints.compactMap(RuntimeEndpointRecord.init(json:)).sorted { $0.createdAt < $1.createdAt || ($0.createdAt == $1.createdAt && $0.name < $1.name) }
        guard v.count == versions.count, e.count == endpoints.count else { return nil }
        self.init(id: id, name: name, createdAt: c, status: s, tags: header["tags"]?.stringMap ?? [:], versions: v, endpoints: e)
        self.lastUpdatedAt = u
        self.failureReason = header["failureReason"]?.stringValue
        self.revision = revision
    }
}

extension JSON {
    public static func strings(_ map: [String: String]) -> JSON { .object(map.mapValues { .string($0) }) }
    /// An object whose values are all strings, as a map; nil otherwise.
    public var stringMap: [String: String]? {
        guard let o = objectValue else { return nil }
        var out: [String: String] = [:]
        for (k, v) in o {
            guard let s = v.stringValue else { return nil }
            out[k] = s
        }
        return out
    }
}
