#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleImages
import CubicleNetwork
import CubicleRuntimes
import CubicleSandbox
import CubicleStorage
import Logging
import NIOCore

/// The session registry: finds or creates the one session for a (runtime, session id), enforces the quota,
/// ends sessions when asked and keeps ended ones listed for a while. It is the one record of which sessions
/// live (`LiveIndex`); what happens inside a session is its `SessionSupervisor`'s, warm sandboxes are
/// `WarmPools`', and taking over after a restart is `Adoption`'s.
public actor SessionManager {
    public nonisolated let config: DaemonConfig
    /// The runtimes, their versions and endpoints: what a new session gets is resolved here.
    public nonisolated let catalog: RuntimeCatalog
    public nonisolated let launcher: SandboxLauncher
    /// Operators' live event feed.
    public nonisolated let events: SessionEvents
    nonisolated let supervisor: SessionSupervisor
    private nonisolated let index = LiveIndex()
    private let pools: WarmPools
    /// First calls for a key while its session starts (or claims a warm sandbox): later calls wait on the same task.
    private var starting: [SessionKey: Task<Session, any Error>] = [:]
    private var ended: [SessionSummary] = []
    static let endedKept = 10_000
    private var shuttingDown = false

    public init(config: DaemonConfig, launcher: SandboxLauncher, seccompProgram: [UInt8], group: any EventLoopGroup,
                logger: Logger, clock: @escaping MonotonicClock = systemClock, network: SessionNetworking? = nil,
                images: PreparedImages? = nil, catalog: RuntimeCatalog? = nil, storage: SessionStorage? = nil) {
        let events = SessionEvents()
        let catalog = catalog ?? RuntimeCatalog(declared: config)
        let supervisor = SessionSupervisor(config: config, launcher: launcher, seccompProgram: seccompProgram, group: group,
                                           clock: clock, logger: logger, events: events, catalog: catalog, networkSlot: NetworkSlot(), images: images,
                                           storage: storage)
        self.config = config
        self.catalog = catalog
        self.launcher = launcher
        self.events = events
        self.supervisor = supervisor
        self.pools = WarmPools(supervisor: supervisor)
        supervisor.endings.set { [weak self] session, summary, wasWarm in
            await self?.ended(session, summary, wasWarm: wasWarm)
        }
        if let network { attach(network) }
    }

    /// Sessions' storage volumes, for operators and the control plane (removal with a runtime or endpoint).
    public nonisolated var storage: SessionStorage? { supervisor.storage }

    /// PUBLIC networking, once it runs (at start, or with the first PUBLIC runtime the control plane makes).
    public nonisolated var network: SessionNetworking? { supervisor.network }

    public nonisolated func attach(_ network: SessionNetworking) {
        guard supervisor.networkSlot.set(network) else { return }
        // A refused connection is an event of the session that made it (a warm sandbox's has no one to tell).
        let index = self.index, events = self.events
        network.onDenied { denial in
            Telemetry.egressDenied(runtime: denial.runtime)
            // By runtime and id: the link's name carries no owner, and this event is for operators alone.
            guard let id = denial.sessionID, let session = index.all.first(where: { $0.runtime.name == denial.runtime && $0.id == id }) else { return }
            events.publish("egress_denied", session: session, ["destination": .string(denial.destination.description),
                                                                "port": .int(Int64(denial.port)), "transport": .string(denial.transport)])
        }
    }

    /// Every live session, from any thread (operators, /metrics, the CPU throttle watch): the index is the record.
    public nonisolated var liveSessions: [Session] { index.all }
    public var warmSessions: [Session] { get async { await pools.sessions } }
    public var endedSessions: [SessionSummary] { Array(ended.dropFirst(max(expiredCount(), ended.count - Self.endedKept))) }

    /// How many of the oldest ended sessions are past their retention.
    private func expiredCount() -> Int {
        let cutoff = Int(time(nil)) - config.endedRetentionSeconds
        return ended.prefix { ($0.endedUnixTime ?? 0) < cutoff }.count
    }
    public var liveCount: Int { index.count + starting.count }

    /// The session for an invocation: a live one straight from the index, without a hop to the actor;
    /// otherwise a warm sandbox or a new one, on the actor, so racing first calls make one sandbox. A live
    /// session stays on the version it started with; a new one gets what `qualifier` serves now.
    public nonisolated func acquire(runtime name: String, qualifier: String? = nil, owner: String = SessionKey.anonymousOwner,
                                    sessionID: String) async throws(SessionError) -> Session {
        let runtime = try resolve(name, qualifier: qualifier)
        if let s = index.session(SessionKey(runtime: name, owner: owner, id: sessionID)), s.isLive { return s }
        return try await acquireOrStart(runtime, owner: owner, sessionID: sessionID, endpoint: qualifier)
    }

    /// The configuration a new session of `name` gets through `qualifier` (DEFAULT when nil).
    public nonisolated func resolve(_ name: String, qualifier: String?) throws(SessionError) -> RuntimeConfig {
        do { return try catalog.resolve(name, qualifier: qualifier) } catch {
            if case .noRuntime = error { throw .runtimeNotFound(name) }
            throw .endpointNotFound(error.description)
        }
    }

    /// A live session from the index alone, never starting one: for callers that cannot wait. Nil also when
    /// `qualifier` names no ready endpoint, so the caller takes the road that says why.
    /// - Parameter serving: what the endpoint serves now must pass it too (the warm road leaves runtimes
    ///   with a JWT authorizer to the task road), checked on the same catalog lookup.
    public nonisolated func liveSession(runtime name: String, qualifier: String? = nil, owner: String = SessionKey.anonymousOwner,
                                        sessionID: String, serving: (RuntimeConfig) -> Bool = { _ in true }) -> Session? {
        guard let s = index.session(SessionKey(runtime: name, owner: owner, id: sessionID)), s.isLive,
              let config = try? catalog.resolve(name, qualifier: qualifier), serving(config) else { return nil }
        return s
    }

    private func acquireOrStart(_ runtime: RuntimeConfig, owner: String, sessionID: String, endpoint: String?) async throws(SessionError) -> Session {
        let name = runtime.name
        let key = SessionKey(runtime: name, owner: owner, id: sessionID)
        if let s = index.session(key), s.isLive { return s }
        let task: Task<Session, any Error>
        if let t = starting[key] {
            task = t
        } else {
            guard !shuttingDown else { throw .shuttingDown }
            guard index.count + starting.count < config.maxSessions else { throw .quotaReached(config.maxSessions) }
            let pools = self.pools, supervisor = self.supervisor
            task = Task {
                if let warm = await pools.claim(runtime, as: sessionID, owner: owner) {
                    guard runtime.sessionStorage != nil else { return warm }
                    do {
                        try await supervisor.attachStorage(toClaimed: warm, owner: owner, sessionID: sessionID, endpoint: endpoint)
                        return warm
                    } catch {
                        // The claimed sandbox is given up; a sandbox of its own tries the storage again.
                        _ = await supervisor.end(warm, .startFailed("its session storage: \(error)"))
                    }
                }
                return try await supervisor.start(runtime, sessionID: sessionID, owner: owner, endpoint: endpoint)
            }
            starting[key] = task
        }
        do {
            let session = try await task.value
            if starting[key] == task {
                starting[key] = nil
                index.insert(session, for: key)
            }
            return session
        } catch let e as SessionError {
            if starting[key] == task { starting[key] = nil }
            throw e
        } catch {
            if starting[key] == task { starting[key] = nil }
            throw .unexpected("\(error)")
        }
    }

    /// StopRuntimeSession: ends a live session at once and waits until nothing of it remains.
    public func stop(runtime name: String, qualifier: String? = nil, owner: String = SessionKey.anonymousOwner, sessionID: String) async throws(SessionError) {
        _ = try resolve(name, qualifier: qualifier)
        let key = SessionKey(runtime: name, owner: owner, id: sessionID)
        if index.session(key) == nil, let t = starting[key] { _ = try? await t.value }
        guard let s = index.session(key), s.isLive else { throw .sessionNotFound(sessionID) }
        await end(s, .stopped)
    }

    /// Ends a session for `reason` (the first reason given wins) and returns what is kept of it.
    @discardableResult
    public nonisolated func end(_ session: Session, _ reason: EndReason) async -> SessionSummary {
        await supervisor.end(session, reason)
    }

    /// A runtime is gone (DeleteAgentRuntime, or removed from the YAML file): its live sessions end with
    /// `runtime_deleted`, its warm sandboxes too, and no new one starts (the catalog no longer has it).
    public func endRuntime(_ name: String) async {
        for t in starting.filter({ $0.key.runtime == name }).values { _ = try? await t.value }
        let pooled = await pools.drain(name)
        await endAll(index.all.filter { $0.runtime.name == name } + pooled, .runtimeDeleted)
        // Its sessions' storage goes with it (every runtime deletion comes here: the API, the store, SIGHUP).
        await supervisor.storage?.remove(runtime: name)
    }

    /// Ends `sessions` at once and waits until every one is torn down.
    private func endAll(_ sessions: [Session], _ reason: EndReason) async {
        let supervisor = self.supervisor
        await withTaskGroup(of: Void.self) { group in
            for s in sessions { group.addTask { _ = await supervisor.end(s, reason) } }
        }
    }

    /// A runtime's DEFAULT endpoint moved to another version: its warm sandboxes of the old one end and the
    /// pool refills with the new. Live sessions stay on the version they started with.
    /// `prewarmed`: sandboxes of the version DEFAULT serves now, started while it was being prepared.
    public func runtimeChanged(_ name: String, prewarmed: [Session] = []) async {
        let current = catalog.defaultConfigs.first { $0.name == name }
        await endAll(await pools.drain(name, keeping: current?.version), .stopped)
        guard let current else { return await endAll(prewarmed, .runtimeDeleted) }
        let fitting = prewarmed.filter { $0.runtime.version == current.version }
        await endAll(prewarmed.filter { $0.runtime.version != current.version } + (await pools.add(fitting, as: current)), .stopped)
        await pools.refill(current)
    }

    /// A version's warm pool, started before the version is READY (the control plane's work), so the first
    /// sessions after it find it warm; an agent that cannot start fails the version instead of a session.
    public func prewarm(_ runtime: RuntimeConfig) async throws(SessionError) -> [Session] {
        var made: [Session] = []
        for _ in 0..<runtime.warmPool {
            guard !shuttingDown else { break }
            do { made.append(try await supervisor.start(runtime, sessionID: nil)) } catch {
                await endAll(made, .stopped)
                throw (error as? SessionError) ?? .couldNotStart("\(error)")
            }
        }
        return made
    }

    /// Ends sandboxes nobody will pool (a version's work was cancelled or failed after its prewarm).
    public func discard(_ sessions: [Session]) async { await endAll(sessions, .stopped) }

    /// Ends every session and warm sandbox (daemon shutdown) and waits for their teardown.
    public func shutdown() async {
        shuttingDown = true
        for t in starting.values { _ = try? await t.value }
        let pooled = await pools.shutdown()
        await endAll(index.all + pooled, .daemonShutdown)
        events.finishAll()
    }

    /// A session's end, reported by its supervisor: a warm sandbox leaves its pool, anyone's session the
    /// index, and is listed as ended for a while.
    private func ended(_ session: Session, _ summary: SessionSummary, wasWarm: Bool) async {
        if wasWarm {
            await pools.ended(session)
            return
        }
        index.remove(session, for: session.key)
        ended.append(summary)
        // Appended as they end, so the expired ones are a prefix, trimmed in batches: a scan or a move of the
        // whole list per ending was a few per cent of the host's CPU at a hundred endings a second (perf).
        // `endedSessions` leaves out what is due but not yet trimmed.
        let over = max(expiredCount(), ended.count - Self.endedKept)
        if over >= max(256, ended.count / 8) { ended.removeFirst(over) }
    }

    /// Finds a live or ended session by id or unique id prefix, for operators. Live sessions win over ended ones.
    public func find(_ prefix: String) -> Result<FoundSession, LookupError> {
        let all = index.all
        // A sandbox id names one session even where two callers use the same session id.
        if let bySandbox = all.first(where: { $0.sandbox.id == prefix }) { return .success(.live(bySandbox)) }
        let live = all.filter { $0.id.hasPrefix(prefix) }
        let exact = live.filter { $0.id == prefix }
        if exact.count == 1 { return .success(.live(exact[0])) }
        if live.count == 1 { return .success(.live(live[0])) }
        if exact.count > 1 { return .failure(.ambiguous(exact.map { "\($0.sandbox.id) (owner \($0.owner))" }.sorted())) }
        if live.count > 1 { return .failure(.ambiguous(live.map(\.id).sorted())) }
        let ended = endedSessions.filter { $0.id.hasPrefix(prefix) }
        if let last = ended.last(where: { $0.id == prefix }) ?? (Set(ended.map(\.id)).count == 1 ? ended.last : nil) {
            return .success(.ended(last))
        }
        if ended.count > 1 { return .failure(.ambiguous(Array(Set(ended.map(\.id))).sorted())) }
        return .failure(.notFound)
    }

    public enum FoundSession: Sendable {
        case live(Session)
        case ended(SessionSummary)
    }

    public enum LookupError: Error, Sendable {
        case notFound
        case ambiguous([String])
    }

    /// Starts filling every runtime's warm pool; called once the daemon serves.
    public func startWarmPools() async { await pools.fill() }

    /// Sandboxes a previous cubicled left running, adopted or removed (`Adoption`). Runs before the
    /// listeners start, so no request can race it.
    public func adoptLeftovers() async -> (adopted: [String], removed: Int) {
        let index = self.index
        let (sessions, removed) = await Adoption(supervisor: supervisor).takeOver { index.session($0) != nil }
        for s in sessions { index.insert(s, for: s.key) }
        // Volumes whose sandboxes died while no cubicled watched: flushed and unmounted.
        await supervisor.storage?.unmountUnheld()
        return (sessions.map(\.id), removed)
    }
}
