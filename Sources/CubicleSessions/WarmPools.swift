import CubicleRuntimes

/// Per runtime with `warmPool: N`: healthy sandboxes started ahead, nobody's yet, each claimed by the next
/// new session of that runtime and replaced a moment later. Every task it starts (the starts, the delayed
/// refills) is its own and ends by `shutdown`.
actor WarmPools {
    private let supervisor: SessionSupervisor
    private var idle: [String: [Session]] = [:]
    /// Sandboxes being started for a pool, per runtime, until each is pooled or ended.
    private var starting: [String: Int] = [:]
    /// Starts, and delayed refills (`cancellable`: a start is left to finish, and ends its sandbox itself).
    private var tasks: [Int: (task: Task<Void, Never>, cancellable: Bool)] = [:]
    private var nextTask = 0
    private var shuttingDown = false

    /// A claimed sandbox is replaced this much later: a new agent's start-up (hundreds of ms of CPU for a
    /// Python agent) would otherwise compete with the first request of the session that just claimed one.
    static let refillDelayNanoseconds: UInt64 = 100_000_000
    /// A runtime whose sandboxes cannot start would otherwise be retried in a tight loop.
    static let retryDelayNanoseconds: UInt64 = 5_000_000_000

    init(supervisor: SessionSupervisor) { self.supervisor = supervisor }

    var sessions: [Session] { idle.keys.sorted().flatMap { idle[$0] ?? [] } }

    /// Starts filling every runtime's pool; called once the daemon serves.
    func fill() {
        for runtime in supervisor.catalog.defaultConfigs where runtime.warmPool > 0 { refill(runtime) }
    }

    /// Takes every pooled sandbox of `runtime` out, for the caller to end (its version changed, or it is gone).
    func drain(_ runtime: String, keeping version: Int? = nil) -> [Session] {
        let all = idle.removeValue(forKey: runtime) ?? []
        guard let version else { return all }
        let kept = all.filter { $0.runtime.version == version }
        if !kept.isEmpty { idle[runtime] = kept }
        return all.filter { $0.runtime.version != version }
    }

    /// Sandboxes started for `runtime` elsewhere (a version's prewarm) join its pool, up to its size;
    /// returns what did not fit (or came during shutdown) for the caller to end.
    func add(_ sessions: [Session], as runtime: RuntimeConfig) -> [Session] {
        guard !shuttingDown else { return sessions }
        let room = max(0, runtime.warmPool - (idle[runtime.name]?.count ?? 0) - (starting[runtime.name] ?? 0))
        idle[runtime.name, default: []] += sessions.prefix(room)
        return Array(sessions.dropFirst(room))
    }

    /// A pooled sandbox made session `id`'s, or nil when the runtime has none ready of this version.
    func claim(_ runtime: RuntimeConfig, as id: String, owner: String) -> Session? {
        guard runtime.warmPool > 0 else { return nil }
        defer { run(after: Self.refillDelayNanoseconds) { await $0.refill(runtime) } }
        while var pool = idle[runtime.name], !pool.isEmpty {
            let candidate = pool.removeFirst()
            idle[runtime.name] = pool
            // One of another version (a named endpoint's, or one started just before an update) stays pooled.
            guard candidate.runtime.version == runtime.version else {
                idle[runtime.name, default: []].append(candidate)
                return nil
            }
            guard candidate.claim(as: id, owner: owner) else { continue }
            if let link = candidate.link { supervisor.network?.name(link.address, sessionID: id) }
            Telemetry.sessionStarted(runtime: runtime.name)
            supervisor.events.publish("created", session: candidate, ["initPID": .int(Int64(candidate.sandbox.initPID)),
                                                                     "agentPID": .int(Int64(candidate.agentPID)), "warm": true])
            supervisor.events.publish("ready", session: candidate)
            supervisor.logger.info("session claimed a warm sandbox", metadata: ["session": "\(id)", "runtime": "\(runtime.name)",
                                                                                 "sandbox": "\(candidate.sandbox.id)"])
            return candidate
        }
        return nil
    }

    /// A pooled sandbox that ended before anyone claimed it (its agent died, it failed its health checks).
    func ended(_ session: Session) {
        idle[session.runtime.name]?.removeAll { $0 === session }
        // Refilled with what the runtime's DEFAULT serves now, if it still exists.
        if let current = supervisor.catalog.defaultConfigs.first(where: { $0.name == session.runtime.name }) { refill(current) }
    }

    /// Stops refilling, waits for sandboxes being started, and hands back the pooled ones for the caller to end.
    func shutdown() async -> [Session] {
        shuttingDown = true
        for t in tasks.values where t.cancellable { t.task.cancel() }
        while let t = tasks.values.first { await t.task.value }
        let pooled = sessions
        idle = [:]
        return pooled
    }

    func refill(_ runtime: RuntimeConfig) {
        guard !shuttingDown, supervisor.catalog.defaultConfigs.contains(where: { $0.name == runtime.name && $0.version == runtime.version }) else { return }
        let missing = runtime.warmPool - (idle[runtime.name]?.count ?? 0) - (starting[runtime.name] ?? 0)
        guard missing > 0 else { return }
        starting[runtime.name, default: 0] += missing
        for _ in 0..<missing {
            let supervisor = self.supervisor
            run { pools in
                let session = try? await supervisor.start(runtime, sessionID: nil)
                await pools.started(runtime, session)
            }
        }
    }

    private func started(_ runtime: RuntimeConfig, _ session: Session?) async {
        // Counted as starting until ended or pooled: shutdown waits for these tasks before the daemon
        // removes the state directory and cgroup parent, so a teardown here must finish first.
        defer { starting[runtime.name, default: 1] -= 1 }
        guard let session else {
            run(after: Self.retryDelayNanoseconds) { await $0.refill(runtime) }
            return
        }
        if shuttingDown {
            _ = await supervisor.end(session, .daemonShutdown)
            return
        }
        // The runtime changed or went while this one started: it is not what the pool should hold.
        guard supervisor.catalog.defaultConfigs.contains(where: { $0.name == runtime.name && $0.version == runtime.version }) else {
            _ = await supervisor.end(session, .runtimeDeleted)
            return
        }
        idle[runtime.name, default: []].append(session)
    }

    /// Runs `job` (after `delay`) as a task of this actor's, forgotten once it ends and cancelled by shutdown.
    private func run(after delay: UInt64 = 0, _ job: @escaping @Sendable (WarmPools) async -> Void) {
        guard !shuttingDown else { return }
        let key = nextTask
        nextTask += 1
        let task = Task {
            if delay > 0 {
                try? await Task.sleep(nanoseconds: delay)
            }
            if delay == 0 || !Task.isCancelled { await job(self) }
            await self.forget(key)
        }
        tasks[key] = (task, delay > 0)
    }

    private func forget(_ key: Int) { tasks[key] = nil }
}
