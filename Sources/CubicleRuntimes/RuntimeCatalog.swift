import Synchronization

/// The runtimes this daemon serves, as the data plane reads them on every call: each runtime's record and
/// the sandbox configuration of each of its ready versions. Read without a hop to any actor; written by
/// the control plane (and at start and on SIGHUP) only.
public final class RuntimeCatalog: Sendable {
    struct Entry {
        var record: RuntimeRecord
        var configs: [Int: RuntimeConfig]
    }

    private let entries = Mutex<[String: Entry]>([:])

    public init() {}

    /// The runtimes of a YAML config alone, each as version 1 behind its DEFAULT endpoint.
    public convenience init(declared config: DaemonConfig, now: Double = 0) {
        self.init()
        for runtime in config.runtimes { set(RuntimeDocument.declaredRecord(runtime, now: now), configs: [1: runtime]) }
    }

    public func set(_ record: RuntimeRecord, configs: [Int: RuntimeConfig]) {
        entries.withLock { $0[record.id] = Entry(record: record, configs: configs) }
    }

    public func remove(_ id: String) { _ = entries.withLock { $0.removeValue(forKey: id) } }

    public func record(_ id: String) -> RuntimeRecord? { entries.withLock { $0[id]?.record } }
    public func contains(_ id: String) -> Bool { entries.withLock { $0[id] != nil } }
    public var records: [RuntimeRecord] { entries.withLock { $0.values.map(\.record) }.sorted { $0.id < $1.id } }

    public enum Refusal: Error, Equatable, Sendable, CustomStringConvertible {
        case noRuntime(String)
        case noEndpoint(runtime: String, qualifier: String)
        case notReady(runtime: String, qualifier: String, status: String)

        public var description: String {
            switch self {
            case .noRuntime(let id): "Runtime \(id) not found"
            case .noEndpoint(let id, let q): "Endpoint or version \(q) of runtime \(id) not found"
            case .notReady(let id, let q, let status): "Runtime \(id) has no READY version behind \(q) (\(status))"
            }
        }
    }

    /// The configuration a new session of `id` gets through `qualifier`: an endpoint's name (DEFAULT when
    /// nil) or a version number.
    public func resolve(_ id: String, qualifier: String?) throws(Refusal) -> RuntimeConfig {
        let q = qualifier ?? RuntimeEndpointRecord.defaultName
        let found: Result<RuntimeConfig, Refusal> = entries.withLock { all in
            guard let entry = all[id], entry.record.status != .deleting else { return .failure(.noRuntime(id)) }
            if let n = Int(q), q.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) {
                guard let v = entry.record.version(n) else { return .failure(.noEndpoint(runtime: id, qualifier: q)) }
                guard let c = entry.configs[n] else { return .failure(.notReady(runtime: id, qualifier: q, status: v.status.rawValue)) }
                return .success(c)
            }
            guard let endpoint = entry.record.endpoint(q), endpoint.status != .deleting else { return .failure(.noEndpoint(runtime: id, qualifier: q)) }
            guard let live = endpoint.liveVersion, let c = entry.configs[live] else {
                return .failure(.notReady(runtime: id, qualifier: q, status: endpoint.status.rawValue))
            }
            return .success(c)
        }
        return try found.get()
    }

    /// A version's configuration, ready or not served any more by an endpoint (adoption after a restart).
    public func config(_ id: String, version: Int) -> RuntimeConfig? { entries.withLock { $0[id]?.configs[version] } }

    /// The configuration a session left by a previous cubicled is served again with: its version's; for a
    /// declared runtime, whose versions restart at 1 with each daemon, what the file says now.
    public func adoptable(_ id: String, version: Int) -> RuntimeConfig? {
        entries.withLock { all in
            guard let e = all[id], e.record.status != .deleting else { return nil }
            return e.configs[version] ?? (e.record.declared ? e.configs[e.record.latestVersion] : nil)
        }
    }

    /// Every image any version names, ready or still being prepared: what the image store must keep.
    public var imagesInUse: Set<String> {
        entries.withLock { all in
            var uris = Set(all.values.flatMap { $0.configs.values.compactMap(\.containerUri) })
            for e in all.values {
                for v in e.record.versions {
                    if let uri = v.document["agentRuntimeArtifact"]?["containerConfiguration"]?["containerUri"]?.stringValue { uris.insert(uri) }
                }
            }
            return uris
        }
    }

    /// What each runtime's DEFAULT endpoint serves now: what warm pools hold.
    public var defaultConfigs: [RuntimeConfig] {
        entries.withLock { all in
            all.values.compactMap { e in e.record.endpoint(RuntimeEndpointRecord.defaultName)?.liveVersion.flatMap { e.configs[$0] } }
        }.sorted { $0.name < $1.name }
    }

    /// Every configuration of every version, for the images they keep.
    public var allConfigs: [RuntimeConfig] { entries.withLock { $0.values.flatMap { $0.configs.values } } }
}
