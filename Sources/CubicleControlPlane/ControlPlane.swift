#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleImages
import CubicleJSON
import CubicleLinux
import CubicleRuntimes
import CubicleSandbox
import CubicleSessions
import Crypto
import HTTPTypes
import Hummingbird
import Logging

/// The AgentCore control plane: runtimes, their immutable versions and endpoints, made, changed and
/// deleted through `bedrock-agentcore-control`'s operations and kept in a `RuntimeStore`. Each change is
/// written first, then its work (an image pulled, a code directory checked, PUBLIC networking started, a
/// warm pool refilled) runs in a task this actor owns while the status says CREATING or UPDATING, and the
/// catalog the data plane reads changes only when a version is READY. One actor: a daemon's changes are
/// serialized; a fleet's meet at the store's compare-and-swap.
public actor ControlPlane {
    public struct Settings: Sendable {
        public var region: String
        public var accountID: String
        public var document: RuntimeDocument.Context
        public var maxRuntimes = 1000
        public var maxEndpointsPerRuntime = 50
        public init(region: String, accountID: String, document: RuntimeDocument.Context) {
            self.region = region
            self.accountID = accountID
            self.document = document
        }
    }

    let store: any RuntimeStore
    let catalog: RuntimeCatalog
    let sessions: SessionManager
    let images: PreparedImages?
    let settings: Settings
    let logger: Logger
    /// Starts PUBLIC networking if it does not run yet (the first PUBLIC runtime's work).
    let ensureNetwork: @Sendable () async throws -> Void
    /// The runtimes declared in the YAML file, by id.
    private var declared: [String: RuntimeConfig] = [:]
    /// Each runtime's work in progress; a new change of it waits for (or, on delete, cancels) the last.
    private var work: [String: Task<Void, Never>] = [:]
    private var watcher: Task<Void, Never>?
    let clock: @Sendable () -> Double

    public init(store: any RuntimeStore, catalog: RuntimeCatalog, sessions: SessionManager, images: PreparedImages?, settings: Settings,
                logger: Logger, clock: @escaping @Sendable () -> Double = { Double(time(nil)) },
                ensureNetwork: @escaping @Sendable () async throws -> Void) {
        self.store = store
        self.catalog = catalog
        self.sessions = sessions
        self.images = images
        self.settings = settings
        self.logger = logger
        self.clock = clock
        self.ensureNetwork = ensureNetwork
    }

    // MARK: - Start, reload, watch

    /// Loads the store into the catalog beside the declared runtimes, finishes work a previous daemon left
    /// (a CREATING version is prepared again, a DELETING runtime deleted), and follows other writers.
    public func start(declared runtimes: [RuntimeConfig]) async throws(StoreError) {
        for r in runtimes { declared[r.name] = r }
        for record in try await store.all() {
            guard declared[record.id] == nil else {
                logger.warning("a stored runtime has the id of a declared one; the declared one is served", metadata: ["runtime": "\(record.id)"])
                continue
            }
            publish(record)
            resumeWork(record)
        }
        let changes = store.changes()
        watcher = Task { [weak self] in
            for await change in changes {
                switch change {
                case .runtime(let id): await self?.reloadFromStore(id)
                case .everything: await self?.resync()
                }
            }
        }
    }

    /// The YAML file again (SIGHUP): new runtimes appear, removed ones end their sessions, changed ones get
    /// the next version (live sessions stay on theirs), unchanged ones are left alone.
    public func reload(declared runtimes: [RuntimeConfig]) async -> (added: Int, changed: Int, removed: Int) {
        var counts = (added: 0, changed: 0, removed: 0)
        let now = clock()
        for var r in runtimes {
            // What a session of it needs is ready before it is served, as at start.
            if let uri = r.containerUri, let images, images.prepared(uri) == nil { await images.prepare([uri]) }
            if r.networkMode == .public {
                do { try await ensureNetwork() } catch {
                    logger.error("SIGHUP: a PUBLIC runtime's networking could not start; it is not served", metadata: ["runtime": "\(r.name)", "error": "\(error)"])
                    continue
                }
            }
            if let old = declared[r.name], let record = catalog.record(r.name) {
                var previous = old
                previous.version = r.version
                if previous == r { continue }
                r.version = record.latestVersion + 1
                var next = record
                next.versions.append(RuntimeVersionRecord(version: r.version, createdAt: now, status: .ready,
                                                          document: RuntimeDocument.declaredRecord(r, now: now).versions[0].document))
                next.updateEndpoint(RuntimeEndpointRecord.defaultName) { $0.liveVersion = r.version; $0.targetVersion = r.version; $0.lastUpdatedAt = now }
                next.lastUpdatedAt = now
                var configs: [Int: RuntimeConfig] = [:]
                for v in next.versions { configs[v.version] = catalog.config(r.name, version: v.version) }
                configs[r.version] = r
                declared[r.name] = r
                catalog.set(next, configs: configs)
                await sessions.runtimeChanged(r.name)
                counts.changed += 1
            } else {
                declared[r.name] = r
                catalog.set(RuntimeDocument.declaredRecord(r, now: now), configs: [1: r])
                await sessions.runtimeChanged(r.name)
                counts.added += 1
            }
        }
        for name in declared.keys where !runtimes.contains(where: { $0.name == name }) {
            declared[name] = nil
            catalog.remove(name)
            await sessions.endRuntime(name)
            counts.removed += 1
        }
        return counts
    }

    public func shutdown() async {
        watcher?.cancel()
        for t in work.values { t.cancel() }
        for t in work.values { await t.value }
        work = [:]
        await store.close()
    }

    /// What other daemons wrote while this one was not listening: every stored runtime whose revision differs
    /// from the catalog's is reloaded, and one the catalog serves but the store no longer has is gone.
    private func resync() async {
        let stored: [RuntimeRecord]
        do { stored = try await store.all() } catch {
            logger.warning("could not compare the catalog with the store", metadata: ["error": "\(error)"])
            return
        }
        for record in stored where declared[record.id] == nil && catalog.record(record.id)?.revision != record.revision {
            await reloadFromStore(record.id)
        }
        let ids = Set(stored.map(\.id))
        for record in catalog.records where !record.declared && !ids.contains(record.id) {
            await reloadFromStore(record.id)
        }
    }

    /// Another daemon changed runtime `id`: the catalog follows the store. Work is the writer's.
    private func reloadFromStore(_ id: String) async {
        guard declared[id] == nil else { return }
        do {
            guard let record = try await store.runtime(id: id) else {
                if catalog.contains(id) {
                    catalog.remove(id)
                    await sessions.endRuntime(id)
                }
                return
            }
            // What its ready versions need on this daemon (an image, PUBLIC networking) is made ready before
            // they are served here.
            let configs = readyConfigs(record)
            if let images {
                let uris = Set(configs.values.compactMap(\.containerUri).filter { images.prepared($0) == nil })
                if !uris.isEmpty { await images.prepare(uris) }
            }
            if configs.values.contains(where: { $0.networkMode == .public }) { try? await ensureNetwork() }
            let before = catalog.record(id)?.endpoint(RuntimeEndpointRecord.defaultName)?.liveVersion
            catalog.set(record, configs: configs)
            if record.status == .deleting {
                await sessions.endRuntime(id)
            } else if before != record.endpoint(RuntimeEndpointRecord.defaultName)?.liveVersion {
                await sessions.runtimeChanged(id)
            }
        } catch {
            logger.warning("could not follow a runtime's change in the store", metadata: ["runtime": "\(id)", "error": "\(error)"])
        }
    }

    /// The catalog's view of `record`: configurations for its READY versions.
    private func publish(_ record: RuntimeRecord) { catalog.set(record, configs: readyConfigs(record)) }

    private func readyConfigs(_ record: RuntimeRecord) -> [Int: RuntimeConfig] {
        var configs: [Int: RuntimeConfig] = [:]
        for v in record.versions where v.status == .ready {
            if let c = try? RuntimeDocument.config(v.document, id: record.id, version: v.version, context: settings.document) { configs[v.version] = c }
        }
        return configs
    }

    private func resumeWork(_ record: RuntimeRecord) {
        if record.status == .deleting {
            startWork(record.id) { plane in await plane.finishDelete(record.id) }
            return
        }
        for v in record.versions where v.status == .creating || v.status == .updating {
            startWork(record.id) { plane in await plane.prepare(record.id, version: v.version) }
        }
        for e in record.endpoints where e.status == .creating || e.status == .updating {
            startWork(record.id) { plane in await plane.settleEndpoint(record.id, name: e.name) }
        }
    }

    // MARK: - Requests

    public struct Response: Sendable {
        public var status: Int
        public var body: JSON?
    }

    /// One control-plane call: its route, its query string and its body.
    public func handle(_ route: ControlRoute, query: String, body: [UInt8]) async throws(AgentCoreError) -> Response {
        let q = QueryString.parseAll(query)
        switch route {
        case .createRuntime: return try await createRuntime(try Self.object(body))
        case .getRuntime(let id): return Response(status: 200, body: try getRuntime(id, version: q["version"]?.last))
        case .updateRuntime(let id): return try await updateRuntime(id, try Self.object(body))
        case .deleteRuntime(let id): return try await deleteRuntime(id, clientToken: q["clientToken"]?.last)
        case .listRuntimes: return Response(status: 200, body: try listRuntimes(q))
        case .listVersions(let id): return Response(status: 200, body: try listVersions(id, q))
        case .createEndpoint(let id): return try await createEndpoint(id, try Self.object(body))
        case .getEndpoint(let id, let name):
            let record = try existing(id)
            guard let e = record.endpoint(name) else { throw AgentCoreError(.resourceNotFound, "Endpoint \(name) of runtime \(id) not found") }
            return Response(status: 200, body: endpointView(record, e, full: true))
        case .updateEndpoint(let id, let name): return try await updateEndpoint(id, name, try Self.object(body))
        case .deleteEndpoint(let id, let name): return try await deleteEndpoint(id, name, clientToken: q["clientToken"]?.last)
        case .listEndpoints(let id): return Response(status: 200, body: try listEndpoints(id, q))
        case .tagResource(let arn): return try await tag(arn, try Self.object(body))
        case .untagResource(let arn): return try await untag(arn, keys: q["tagKeys"] ?? [])
        case .listTags(let arn):
            let (record, endpoint) = try resource(arn)
            return Response(status: 200, body: ["tags": .strings(endpoint.map { record.endpoint($0)?.tags ?? [:] } ?? record.tags)])
        }
    }

    // MARK: Runtimes

    /// The largest request body a control-plane call may have (50 variables of 5,000 bytes and the rest).
    public static let maxBodyBytes = 1 << 20

    static let createMembers: Set<String> = ["agentRuntimeName", "clientToken", "tags"]
    static let updateMembers: Set<String> = ["clientToken"]

    private func createRuntime(_ body: [String: JSON]) async throws(AgentCoreError) -> Response {
        guard let name = body["agentRuntimeName"]?.stringValue else { throw AgentCoreError.invalidField("agentRuntimeName", "Member must not be null") }
        guard ControlRoute.isRuntimeName(name) else { throw AgentCoreError.invalidField("agentRuntimeName", "Member must satisfy regular expression pattern: [a-zA-Z][a-zA-Z0-9_]{0,47}") }
        let token = try Self.clientToken(body["clientToken"])
        if let token, let replay = try await replay(token, fingerprint: Self.fingerprint("CreateAgentRuntime", body)) {
            let record = try existing(replay.runtimeID)
            return Response(status: 202, body: runtimeChangeView(record, version: 1))
        }
        let tags = try RuntimeDocument.tags(body["tags"])
        let document = try RuntimeDocument.version(from: body, tags: tags, allowed: Self.createMembers, context: settings.document)
        guard !catalog.records.contains(where: { $0.name == name }) else {
            throw AgentCoreError(.controlConflict, "An agent runtime named \(name) already exists")
        }
        guard catalog.records.count < settings.maxRuntimes else {
            throw AgentCoreError(.serviceQuotaExceeded, "This cubicled serves at most \(settings.maxRuntimes) runtimes")
        }
        let now = clock()
        let id = "\(name)-\(Self.randomSuffix())"
        var record = RuntimeRecord(id: id, name: name, createdAt: now, status: .creating, tags: tags,
                                   versions: [RuntimeVersionRecord(version: 1, createdAt: now, status: .creating, document: document)])
        record.endpoints = [RuntimeEndpointRecord(name: RuntimeEndpointRecord.defaultName, id: "DEFAULT-\(Self.randomSuffix())",
                                                  liveVersion: nil, targetVersion: 1, status: .creating, createdAt: now)]
        let written: RuntimeRecord
        do { written = try await store.put(record, expecting: nil) } catch { throw Self.wire(error) }
        if let token { try await remember(token, Self.fingerprint("CreateAgentRuntime", body), id, result: "1") }
        publish(written)
        logger.notice("runtime created", metadata: ["runtime": "\(id)", "version": "1"])
        startWork(id) { plane in await plane.prepare(id, version: 1) }
        return Response(status: 202, body: runtimeChangeView(written, version: 1))
    }

    private func updateRuntime(_ id: String, _ body: [String: JSON]) async throws(AgentCoreError) -> Response {
        let record = try changeable(id)
        let token = try Self.clientToken(body["clientToken"])
        let fingerprint = Self.fingerprint("UpdateAgentRuntime:\(id)", body)
        if let token, let replay = try await replay(token, fingerprint: fingerprint) {
            return Response(status: 202, body: runtimeChangeView(try existing(id), version: Int(replay.result ?? "") ?? record.latestVersion))
        }
        guard !record.status.isBusy else {
            throw AgentCoreError(.controlConflict, "Runtime \(id) is \(record.status.rawValue); wait until it is READY (or failed) to change it")
        }
        let document = try RuntimeDocument.version(from: body, tags: record.tags, allowed: Self.updateMembers, context: settings.document)
        let now = clock()
        var next = record
        let version = record.latestVersion + 1
        guard version <= 99_999 else { throw AgentCoreError(.serviceQuotaExceeded, "Runtime \(id) has reached 99999 versions") }
        next.versions.append(RuntimeVersionRecord(version: version, createdAt: now, status: .updating, document: document))
        next.status = .updating
        next.failureReason = nil
        next.lastUpdatedAt = now
        next.updateEndpoint(RuntimeEndpointRecord.defaultName) { $0.targetVersion = version; $0.status = .updating; $0.lastUpdatedAt = now }
        let written = try await write(next, expecting: record.revision)
        if let token { try await remember(token, fingerprint, id, result: String(version)) }
        logger.notice("runtime updated", metadata: ["runtime": "\(id)", "version": "\(version)"])
        startWork(id) { plane in await plane.prepare(id, version: version) }
        return Response(status: 202, body: runtimeChangeView(written, version: version))
    }

    private func deleteRuntime(_ id: String, clientToken: String?) async throws(AgentCoreError) -> Response {
        _ = try Self.clientToken(clientToken.map(JSON.string))
        let record = try changeable(id)
        if record.status != .deleting {
            var next = record
            next.status = .deleting
            next.lastUpdatedAt = clock()
            let written = try await write(next, expecting: record.revision)
            publish(written)
            logger.notice("runtime deleting", metadata: ["runtime": "\(id)"])
            // Whatever was preparing it stops; its sessions end and it leaves the store.
            work[id]?.cancel()
            startWork(id) { plane in await plane.finishDelete(id) }
        }
        return Response(status: 202, body: ["status": "DELETING", "agentRuntimeId": .string(id)])
    }

    private func finishDelete(_ id: String) async {
        await sessions.endRuntime(id)
        for attempt in 0..<5 {
            do {
                guard let current = try await store.runtime(id: id) else { break }
                try await store.delete(id: id, expecting: current.revision)
                break
            } catch {
                logger.warning("runtime could not be removed from the store", metadata: ["runtime": "\(id)", "attempt": "\(attempt)", "error": "\(error)"])
                try? await Task.sleep(nanoseconds: 200_000_000)
            }
        }
        catalog.remove(id)
        logger.notice("runtime deleted", metadata: ["runtime": "\(id)"])
        work[id] = nil
    }

    private func getRuntime(_ id: String, version: String?) throws(AgentCoreError) -> JSON {
        let record = try existing(id)
        let n: Int
        if let version {
            guard let v = Int(version), (1...99_999).contains(v) else { throw AgentCoreError.invalidField("version", "Member must satisfy regular expression pattern: ([1-9][0-9]{0,4})") }
            n = v
        } else {
            n = record.latestVersion
        }
        guard let v = record.version(n) else { throw AgentCoreError(.resourceNotFound, "Version \(n) of runtime \(id) not found") }
        var o = v.document.objectValue ?? [:]
        o["cubicle"] = nil
        o["agentRuntimeArn"] = .string(arn(id))
        o["agentRuntimeName"] = .string(record.name)
        o["agentRuntimeId"] = .string(id)
        o["agentRuntimeVersion"] = .string(String(n))
        o["createdAt"] = .double(record.createdAt)
        o["lastUpdatedAt"] = .double(version == nil ? record.lastUpdatedAt : v.createdAt)
        // The runtime's status for its latest version; a named older version's own.
        o["status"] = .string((version == nil ? record.status : v.status).rawValue)
        if let reason = version == nil ? record.failureReason : v.failureReason { o["failureReason"] = .string(reason) }
        if o["lifecycleConfiguration"] == nil {
            o["lifecycleConfiguration"] = ["idleRuntimeSessionTimeout": .int(Int64(CubicleAgentCore.Limits.defaultIdleTimeoutSeconds)),
                                           "maxLifetime": .int(Int64(CubicleAgentCore.Limits.defaultMaxLifetimeSeconds))]
        }
        if record.declared { o["description"] = .string("Declared in cubicled's config file: change it there") }
        return .object(o)
    }

    private func listRuntimes(_ q: [String: [String]]) throws(AgentCoreError) -> JSON {
        let (after, max) = try Self.page(q)
        let all = catalog.records.filter { after == nil || $0.id > after! }
        let page = Array(all.prefix(max))
        var o: [String: JSON] = ["agentRuntimes": .array(page.map { summary($0, $0.version($0.latestVersion)) })]
        if all.count > max, let last = page.last { o["nextToken"] = .string(Self.token(last.id)) }
        return .object(o)
    }

    private func listVersions(_ id: String, _ q: [String: [String]]) throws(AgentCoreError) -> JSON {
        let record = try existing(id)
        let (after, max) = try Self.page(q)
        let all = record.versions.reversed().filter { after == nil || $0.version < Int(after!) ?? 0 }
        let page = Array(all.prefix(max))
        var o: [String: JSON] = ["agentRuntimes": .array(page.map { summary(record, $0) })]
        if all.count > max, let last = page.last { o["nextToken"] = .string(Self.token(String(last.version))) }
        return .object(o)
    }

    // MARK: Endpoints

    private func createEndpoint(_ id: String, _ body: [String: JSON]) async throws(AgentCoreError) -> Response {
        try Self.allowOnly(body, ["name", "agentRuntimeVersion", "description", "clientToken", "tags"])
        let record = try changeable(id)
        guard let name = body["name"]?.stringValue else { throw AgentCoreError.invalidField("name", "Member must not be null") }
        guard ControlRoute.isEndpointName(name) else { throw AgentCoreError.invalidField("name", "Member must satisfy regular expression pattern: [a-zA-Z][a-zA-Z0-9_]{0,47}") }
        let token = try Self.clientToken(body["clientToken"])
        let fingerprint = Self.fingerprint("CreateAgentRuntimeEndpoint:\(id)", body)
        if let token, try await replay(token, fingerprint: fingerprint) != nil, let e = try existing(id).endpoint(name) {
            return Response(status: 202, body: endpointChangeView(try existing(id), e))
        }
        guard record.endpoint(name) == nil else { throw AgentCoreError(.controlConflict, "Endpoint \(name) of runtime \(id) already exists") }
        guard record.endpoints.count < settings.maxEndpointsPerRuntime else {
            throw AgentCoreError(.serviceQuotaExceeded, "A runtime has at most \(settings.maxEndpointsPerRuntime) endpoints")
        }
        let version = try targetVersion(body["agentRuntimeVersion"], of: record)
        let description = try Self.endpointDescription(body["description"])
        let tags = try RuntimeDocument.tags(body["tags"])
        let now = clock()
        var endpoint = RuntimeEndpointRecord(name: name, id: "\(name)-\(Self.randomSuffix())", liveVersion: nil, targetVersion: version,
                                             description: description, status: .creating, createdAt: now)
        endpoint.tags = tags
        var next = record
        next.endpoints.append(endpoint)
        let written = try await write(next, expecting: record.revision)
        if let token { try await remember(token, fingerprint, id, result: name) }
        startWork(id) { plane in await plane.settleEndpoint(id, name: name) }
        return Response(status: 202, body: endpointChangeView(written, endpoint))
    }

    private func updateEndpoint(_ id: String, _ name: String, _ body: [String: JSON]) async throws(AgentCoreError) -> Response {
        try Self.allowOnly(body, ["agentRuntimeVersion", "description", "clientToken"])
        let record = try changeable(id)
        guard let endpoint = record.endpoint(name) else { throw AgentCoreError(.resourceNotFound, "Endpoint \(name) of runtime \(id) not found") }
        guard name != RuntimeEndpointRecord.defaultName else {
            throw AgentCoreError(.validation, "The DEFAULT endpoint follows the runtime's latest version and cannot be pointed elsewhere")
        }
        let token = try Self.clientToken(body["clientToken"])
        let fingerprint = Self.fingerprint("UpdateAgentRuntimeEndpoint:\(id):\(name)", body)
        if let token, try await replay(token, fingerprint: fingerprint) != nil {
            return Response(status: 202, body: endpointView(try existing(id), endpoint, full: false))
        }
        guard !endpoint.status.isBusy else { throw AgentCoreError(.controlConflict, "Endpoint \(name) is \(endpoint.status.rawValue); wait until it is READY") }
        let version = body["agentRuntimeVersion"] == nil ? endpoint.targetVersion ?? record.latestVersion : try targetVersion(body["agentRuntimeVersion"], of: record)
        let description = try Self.endpointDescription(body["description"]) ?? endpoint.description
        var next = record
        let now = clock()
        next.updateEndpoint(name) { $0.targetVersion = version; $0.description = description; $0.status = .updating; $0.lastUpdatedAt = now; $0.failureReason = nil }
        let written = try await write(next, expecting: record.revision)
        if let token { try await remember(token, fingerprint, id, result: name) }
        startWork(id) { plane in await plane.settleEndpoint(id, name: name) }
        return Response(status: 202, body: endpointView(written, written.endpoint(name)!, full: false))
    }

    private func deleteEndpoint(_ id: String, _ name: String, clientToken: String?) async throws(AgentCoreError) -> Response {
        _ = try Self.clientToken(clientToken.map(JSON.string))
        let record = try changeable(id)
        guard record.endpoint(name) != nil else { throw AgentCoreError(.resourceNotFound, "Endpoint \(name) of runtime \(id) not found") }
        guard name != RuntimeEndpointRecord.defaultName else {
            throw AgentCoreError(.controlConflict, "The DEFAULT endpoint is deleted with its runtime (DeleteAgentRuntime)")
        }
        var next = record
        next.endpoints.removeAll { $0.name == name }
        _ = try await write(next, expecting: record.revision)
        // The storage of sessions made through it goes with it, as AgentCore removes it.
        await sessions.storage?.remove(runtime: id, endpoint: name)
        return Response(status: 202, body: ["status": "DELETING", "agentRuntimeId": .string(id), "endpointName": .string(name)])
    }

    private func listEndpoints(_ id: String, _ q: [String: [String]]) throws(AgentCoreError) -> JSON {
        let record = try existing(id)
        let (after, max) = try Self.page(q)
        let all = record.endpoints.sorted { $0.name < $1.name }.filter { after == nil || $0.name > after! }
        let page = Array(all.prefix(max))
        var o: [String: JSON] = ["runtimeEndpoints": .array(page.map { endpointView(record, $0, full: true) })]
        if all.count > max, let last = page.last { o["nextToken"] = .string(Self.token(last.name)) }
        return .object(o)
    }

    private func targetVersion(_ value: JSON?, of record: RuntimeRecord) throws(AgentCoreError) -> Int {
        guard let value else { return record.latestVersion }
        guard let s = value.stringValue, let v = Int(s), (1...99_999).contains(v), String(v) == s else {
            throw AgentCoreError.invalidField("agentRuntimeVersion", "Member must satisfy regular expression pattern: ([1-9][0-9]{0,4})")
        }
        guard let found = record.version(v) else { throw AgentCoreError(.resourceNotFound, "Version \(v) of runtime \(record.id) not found") }
        guard found.status == .ready || found.status.isBusy else {
            throw AgentCoreError(.validation, "Version \(v) of runtime \(record.id) is \(found.status.rawValue) and cannot serve an endpoint")
        }
        return v
    }

    // MARK: Tags

    private func tag(_ arn: String, _ body: [String: JSON]) async throws(AgentCoreError) -> Response {
        try Self.allowOnly(body, ["tags"])
        guard body["tags"] != nil else { throw AgentCoreError.invalidField("tags", "Member must not be null") }
        let added = try RuntimeDocument.tags(body["tags"])
        let (record, endpoint) = try resource(arn)
        guard !record.declared else { throw AgentCoreError(.controlConflict, "Runtime \(record.id) is declared in cubicled's config file: tag it there") }
        var next = record
        if let endpoint { next.updateEndpoint(endpoint) { $0.tags.merge(added) { $1 } } } else { next.tags.merge(added) { $1 } }
        guard (endpoint.map { next.endpoint($0)?.tags.count ?? 0 } ?? next.tags.count) <= 50 else {
            throw AgentCoreError(.serviceQuotaExceeded, "A resource has at most 50 tags")
        }
        // The cubicle: settings must still make a valid runtime; they apply from the next version on.
        if endpoint == nil, let latest = next.version(next.latestVersion) {
            var doc = latest.document.objectValue ?? [:]
            doc["cubicle"] = .strings(next.tags.filter { $0.key.hasPrefix("cubicle:") })
            _ = try RuntimeDocument.config(.object(doc), id: record.id, version: 1, context: settings.document)
        }
        _ = try await write(next, expecting: record.revision)
        return Response(status: 204, body: nil)
    }

    private func untag(_ arn: String, keys: [String]) async throws(AgentCoreError) -> Response {
        guard keys.count <= 200 else { throw AgentCoreError.invalidField("tagKeys", "Member must have length less than or equal to 200") }
        let (record, endpoint) = try resource(arn)
        guard !record.declared else { throw AgentCoreError(.controlConflict, "Runtime \(record.id) is declared in cubicled's config file: tag it there") }
        var next = record
        for k in keys {
            if let endpoint { next.updateEndpoint(endpoint) { $0.tags[k] = nil } } else { next.tags[k] = nil }
        }
        _ = try await write(next, expecting: record.revision)
        return Response(status: 204, body: nil)
    }

    /// A runtime ARN, or an endpoint's (`.../runtime/ID/runtime-endpoint/NAME`).
    private func resource(_ arn: String) throws(AgentCoreError) -> (RuntimeRecord, String?) {
        let parts = arn.split(separator: ":", maxSplits: 5, omittingEmptySubsequences: false)
        guard parts.count == 6, parts[0] == "arn", parts[2] == "bedrock-agentcore" else {
            throw AgentCoreError.invalidField("resourceArn", "must be an arn:aws:bedrock-agentcore ARN")
        }
        let path = parts[5].split(separator: "/").map(String.init)
        guard parts[3] == settings.region, parts[4] == settings.accountID, path.count == 2 || path.count == 4, path[0] == "runtime",
              path.count == 2 || path[2] == "runtime-endpoint", let record = catalog.record(path[1]), record.status != .deleting else {
            throw AgentCoreError(.resourceNotFound, "Resource \(arn) not found")
        }
        if path.count == 4 {
            guard record.endpoint(path[3]) != nil else { throw AgentCoreError(.resourceNotFound, "Resource \(arn) not found") }
            return (record, path[3])
        }
        return (record, nil)
    }

    // MARK: - Work

    private func startWork(_ id: String, _ job: @escaping @Sendable (ControlPlane) async -> Void) {
        let previous = work[id]
        work[id] = Task { [weak self] in
            await previous?.value
            guard let self else { return }
            await job(self)
        }
    }

    /// The work of a CREATING/UPDATING version: everything a session of it needs, done now, so no first
    /// call waits for it. Then the version is READY and DEFAULT serves it, or it failed with the reason
    /// and DEFAULT stays where it was.
    private func prepare(_ id: String, version: Int) async {
        guard let record = catalog.record(id), let v = record.version(version) else { return }
        var failure: String?
        var prewarmed: [Session] = []
        do {
            let config = try RuntimeDocument.config(v.document, id: id, version: version, context: settings.document)
            if config.networkMode == .public { try await ensureNetwork() }
            if let uri = config.containerUri {
                guard let images else { throw Failure("cubicled has no image store") }
                if images.prepared(uri).map({ if case .success = $0 { false } else { true } }) ?? true { await images.prepare([uri]) }
                if case .failure(let e)? = images.prepared(uri) { throw Failure("image \(uri): \(e)") }
            }
            if let dir = config.codeDirectory {
                var st = stat()
                guard stat(dir, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else { throw Failure("code directory \(dir) is not a directory on this host") }
            }
            // As at start: the host's file table must back every session before a session could fill it.
            try ensureFileBudget(with: config)
            // The warm pool of what DEFAULT will serve, started now; an agent that cannot start fails here.
            if version == record.latestVersion, config.warmPool > 0 {
                do { prewarmed = try await sessions.prewarm(config) } catch { throw Failure("its warm pool could not start: \(error)") }
            }
        } catch {
            failure = "\(error)"
        }
        if Task.isCancelled {
            await sessions.discard(prewarmed)
            return
        }
        let now = clock()
        let settled = await change(id) { r in
            let failedStatus: RuntimeStatus = version == 1 ? .createFailed : .updateFailed
            guard let i = r.versions.firstIndex(where: { $0.version == version }), r.status != .deleting else { return false }
            r.versions[i].status = failure == nil ? .ready : failedStatus
            r.versions[i].failureReason = failure
            if version == r.latestVersion {
                r.status = failure == nil ? .ready : failedStatus
                r.failureReason = failure
                r.lastUpdatedAt = now
            }
            for j in r.endpoints.indices where r.endpoints[j].targetVersion == version && r.endpoints[j].status.isBusy {
                if failure == nil {
                    r.endpoints[j].liveVersion = version
                    r.endpoints[j].status = .ready
                    r.endpoints[j].failureReason = nil
                } else {
                    r.endpoints[j].status = r.endpoints[j].liveVersion == nil ? .createFailed : .updateFailed
                    r.endpoints[j].failureReason = failure
                }
                r.endpoints[j].lastUpdatedAt = now
            }
            return true
        }
        if settled {
            logger.notice(failure == nil ? "runtime version ready" : "runtime version failed",
                          metadata: ["runtime": "\(id)", "version": "\(version)", "reason": "\(failure ?? "-")"])
            await sessions.runtimeChanged(id, prewarmed: prewarmed)
        } else {
            await sessions.discard(prewarmed)
        }
    }

    /// fs.file-max raised, if need be, so that `maxSessions` sessions of the largest runtime (this new version
    /// among them) and every warm pool run out of their own limits before the host's file table.
    private func ensureFileBudget(with config: RuntimeConfig) throws {
        let all = catalog.allConfigs + [config]
        let limits = all.map { FileBudget.Session(memoryBytes: $0.limits.memoryBytes, pids: Int64($0.limits.pids), openFiles: Int64($0.limits.openFiles)) }
        let sessionsCount = sessions.config.maxSessions + catalog.defaultConfigs.reduce(0) { $0 + $1.warmPool } + config.warmPool
        do {
            if let raised = try FileBudget.ensure(maxSessions: sessionsCount, sessions: limits) {
                logger.notice("raised fs.file-max for a new runtime version", metadata: ["runtime": "\(config.name)", "from": "\(raised.from)", "to": "\(raised.to)"])
            }
        } catch {
            throw Failure("fs.file-max is too low for sessions of this version and cannot be raised (\(error)); lower cubicle:memory or maxSessions")
        }
    }

    /// An endpoint moves to its target version once that version is READY (now, or when its work ends).
    private func settleEndpoint(_ id: String, name: String) async {
        let now = clock()
        _ = await change(id) { r in
            guard let e = r.endpoint(name), e.status.isBusy, let target = e.targetVersion, let v = r.version(target), !v.status.isBusy else { return false }
            r.updateEndpoint(name) { e in
                if v.status == .ready {
                    e.liveVersion = target
                    e.status = .ready
                    e.failureReason = nil
                } else {
                    e.status = e.liveVersion == nil ? .createFailed : .updateFailed
                    e.failureReason = "version \(target) is \(v.status.rawValue)"
                }
                e.lastUpdatedAt = now
            }
            return true
        }
    }

    /// Applies `mutate` to the stored runtime and writes it, again on a lost race; publishes the result.
    private func change(_ id: String, _ mutate: (inout RuntimeRecord) -> Bool) async -> Bool {
        for _ in 0..<8 {
            do {
                guard var record = try await store.runtime(id: id) else { return false }
                let expected = record.revision
                guard mutate(&record) else { return false }
                let written = try await store.put(record, expecting: expected)
                publish(written)
                return true
            } catch .conflict {
                continue
            } catch {
                logger.error("runtime store write failed", metadata: ["runtime": "\(id)", "error": "\(error)"])
                try? await Task.sleep(nanoseconds: 500_000_000)
            }
        }
        return false
    }

    private func write(_ record: RuntimeRecord, expecting revision: Int) async throws(AgentCoreError) -> RuntimeRecord {
        do {
            let written = try await store.put(record, expecting: revision)
            publish(written)
            return written
        } catch {
            throw Self.wire(error)
        }
    }

    // MARK: - Helpers

    private func existing(_ id: String) throws(AgentCoreError) -> RuntimeRecord {
        guard let record = catalog.record(id) else { throw AgentCoreError(.resourceNotFound, "Runtime \(id) not found") }
        return record
    }

    /// A runtime the control plane may change: not one the YAML file declares.
    private func changeable(_ id: String) throws(AgentCoreError) -> RuntimeRecord {
        let record = try existing(id)
        guard !record.declared else {
            throw AgentCoreError(.controlConflict, "Runtime \(id) is declared in cubicled's config file; change it there and reload (SIGHUP)")
        }
        return record
    }

    private func replay(_ token: String, fingerprint: String) async throws(AgentCoreError) -> ClientTokenRecord? {
        let found: ClientTokenRecord?
        do { found = try await store.clientToken(token) } catch { throw Self.wire(error) }
        guard let found else { return nil }
        guard found.fingerprint == fingerprint else {
            throw AgentCoreError(.controlConflict, "Client token \(token) was used for a different request")
        }
        return found
    }

    private func remember(_ token: String, _ fingerprint: String, _ id: String, result: String?) async throws(AgentCoreError) {
        do { try await store.saveClientToken(ClientTokenRecord(token: token, fingerprint: fingerprint, runtimeID: id, result: result, createdAt: clock())) }
        catch { throw Self.wire(error) }
    }

    func arn(_ id: String) -> String { "arn:aws:bedrock-agentcore:\(settings.region):\(settings.accountID):runtime/\(id)" }

    func runtimeChangeView(_ r: RuntimeRecord, version: Int) -> JSON {
        ["agentRuntimeArn": .string(arn(r.id)), "agentRuntimeId": .string(r.id), "agentRuntimeVersion": .string(String(version)),
         "createdAt": .double(r.createdAt), "lastUpdatedAt": .double(r.lastUpdatedAt), "status": .string(r.status.rawValue)]
    }

    func summary(_ r: RuntimeRecord, _ v: RuntimeVersionRecord?) -> JSON {
        let latest = v?.version == r.latestVersion
        return ["agentRuntimeArn": .string(arn(r.id)), "agentRuntimeId": .string(r.id), "agentRuntimeVersion": .string(String(v?.version ?? 0)),
                "agentRuntimeName": .string(r.name),
                "description": .string(r.declared ? "Declared in cubicled's config file" : v?.document["description"]?.stringValue ?? ""),
                "lastUpdatedAt": .double(latest ? r.lastUpdatedAt : v?.createdAt ?? r.lastUpdatedAt),
                "status": .string((latest ? r.status : v?.status ?? r.status).rawValue)]
    }

    func endpointArn(_ r: RuntimeRecord, _ e: RuntimeEndpointRecord) -> String { arn(r.id) + "/runtime-endpoint/\(e.name)" }

    func endpointView(_ r: RuntimeRecord, _ e: RuntimeEndpointRecord, full: Bool) -> JSON {
        var o: [String: JSON] = ["agentRuntimeEndpointArn": .string(endpointArn(r, e)), "agentRuntimeArn": .string(arn(r.id)),
                                 "status": .string(e.status.rawValue), "createdAt": .double(e.createdAt), "lastUpdatedAt": .double(e.lastUpdatedAt)]
        if let v = e.liveVersion { o["liveVersion"] = .string(String(v)) }
        if let v = e.targetVersion { o["targetVersion"] = .string(String(v)) }
        if full {
            o["name"] = .string(e.name)
            o["id"] = .string(e.id)
            if let d = e.description { o["description"] = .string(d) }
            if let f = e.failureReason { o["failureReason"] = .string(f) }
        }
        return .object(o)
    }

    func endpointChangeView(_ r: RuntimeRecord, _ e: RuntimeEndpointRecord) -> JSON {
        ["targetVersion": .string(String(e.targetVersion ?? r.latestVersion)), "agentRuntimeEndpointArn": .string(endpointArn(r, e)),
         "agentRuntimeArn": .string(arn(r.id)), "agentRuntimeId": .string(r.id), "endpointName": .string(e.name),
         "status": .string(e.status.rawValue), "createdAt": .double(e.createdAt)]
    }

    static func object(_ body: [UInt8]) throws(AgentCoreError) -> [String: JSON] {
        if body.isEmpty { return [:] }
        let parsed: JSON
        do { parsed = try JSON.parse(body) } catch { throw AgentCoreError(.validation, "Request body is not valid JSON: \(error)", reason: .cannotParse) }
        guard let o = parsed.objectValue else { throw AgentCoreError(.validation, "Request body must be a JSON object", reason: .cannotParse) }
        return o
    }

    static func allowOnly(_ body: [String: JSON], _ members: Set<String>) throws(AgentCoreError) {
        if let unknown = body.keys.first(where: { !members.contains($0) }) {
            throw AgentCoreError(.validation, "Unknown field \(unknown)", reason: .fieldValidationFailed, fields: [(unknown, "is not a member of this operation")])
        }
    }

    static func clientToken(_ value: JSON?) throws(AgentCoreError) -> String? {
        guard let value, value != .null else { return nil }
        guard let s = value.stringValue, (33...256).contains(s.utf8.count),
              s.utf8.allSatisfy({ ($0 | 0x20) >= 0x61 && ($0 | 0x20) <= 0x7A || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D }) else {
            throw AgentCoreError.invalidField("clientToken", "Member must have length between 33 and 256 and satisfy [a-zA-Z0-9](-*[a-zA-Z0-9]){0,256}")
        }
        return s
    }

    static func endpointDescription(_ value: JSON?) throws(AgentCoreError) -> String? {
        guard let value, value != .null else { return nil }
        guard let s = value.stringValue, (1...256).contains(s.utf8.count) else { throw AgentCoreError.invalidField("description", "Member must have length between 1 and 256") }
        return s
    }

    /// The operation and its request, minus the token itself, as a digest.
    static func fingerprint(_ operation: String, _ body: [String: JSON]) -> String {
        var b = body
        b["clientToken"] = nil
        let digest = SHA256.hash(data: Array(operation.utf8) + [0] + JSON.object(b).serialized())
        return Hex.encode(Array(digest))
    }

    static func page(_ q: [String: [String]]) throws(AgentCoreError) -> (after: String?, max: Int) {
        var max = 100
        if let m = q["maxResults"]?.last {
            guard let v = Int(m), (1...100).contains(v) else { throw AgentCoreError.invalidField("maxResults", "Member must be between 1 and 100") }
            max = v
        }
        guard let token = q["nextToken"]?.last else { return (nil, max) }
        guard token.hasPrefix("c1."), let bytes = Hex.decode(String(token.dropFirst(3))), let after = String(validating: bytes, as: UTF8.self), !after.isEmpty else {
            throw AgentCoreError.invalidField("nextToken", "is not a token this service issued")
        }
        return (after, max)
    }

    static func token(_ after: String) -> String { "c1." + Hex.encode(Array(after.utf8)) }

    static func randomSuffix() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".utf8)
        var rng = SystemRandomNumberGenerator()
        return String(decoding: (0..<10).map { _ in alphabet[Int(rng.next(upperBound: UInt32(alphabet.count)))] }, as: UTF8.self)
    }

    static func wire(_ error: StoreError) -> AgentCoreError {
        switch error {
        case .conflict(let m): AgentCoreError(.controlConflict, m)
        case .unavailable(let m): AgentCoreError(.internalServer, "The runtime store is unavailable: \(m)")
        }
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ d: String) { description = d }
    }
}

extension ControlPlane {
    /// An answer as HTTP carries it: the status, the error type (for `x-amzn-ErrorType`) and the JSON body.
    public struct HTTPAnswer: Sendable {
        public var status: Int
        public var errorType: String?
        public var body: [UInt8]?
    }

    /// One control-plane request, from any listener that serves it (the loopback data-plane listener, the
    /// admin socket): nil when no control-plane operation matches. Errors come back in AgentCore's shape.
    public func serve(method: String, path: String, query: String, body: [UInt8]) async -> HTTPAnswer? {
        do {
            guard let route = try ControlRoute.parse(method: method, path: path) else { return nil }
            let answer = try await handle(route, query: query, body: body)
            logger.info("control plane", metadata: ["operation": "\(route.operation)", "status": "\(answer.status)"])
            return HTTPAnswer(status: answer.status, errorType: nil, body: answer.body?.serialized())
        } catch {
            return HTTPAnswer(status: error.status, errorType: error.kind.rawValue, body: error.body)
        }
    }
}

extension ControlPlane.HTTPAnswer {
    /// As Hummingbird sends it, with `x-amzn-ErrorType` on errors so boto3 raises the modelled exception.
    public var response: Response {
        var headers: HTTPFields = [:]
        if body != nil { headers[.contentType] = "application/json" }
        if let errorType, let name = HTTPField.Name(AgentCoreError.errorTypeHeader) { headers[name] = errorType }
        return Response(status: .init(code: status), headers: headers, body: body.map { .init(byteBuffer: ByteBuffer(bytes: $0)) } ?? .init())
    }
}
