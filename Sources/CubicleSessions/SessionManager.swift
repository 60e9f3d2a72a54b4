#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleAgentLink
import CubicleLinux
import CubicleRPC
import CubicleSandbox
import Logging
import NIOCore
import Synchronization

/// Finds or creates the one session for a (runtime, session id), ends sessions by their lifecycle rules,
/// and keeps ended ones listed for a while.
public actor SessionManager {
    public struct Key: Hashable, Sendable {
        public var runtime: String
        public var id: String
        public init(runtime: String, id: String) { self.runtime = runtime; self.id = id }
    }

    public nonisolated let config: DaemonConfig
    public nonisolated let launcher: SandboxLauncher
    let seccompProgram: [UInt8]
    let group: any EventLoopGroup
    let clock: MonotonicClock
    let logger: Logger
    /// How long a new agent has to answer /ping (AWS: 30 s).
    let initializationSeconds: Double

    /// Live sessions. Every write goes through it and its mirror `liveIndex`, which the request path reads
    /// without waiting for the actor.
    private var live: [Key: Session] = [:]
    private nonisolated let liveIndex = Mutex<[Key: Session]>([:])

    private func setLive(_ key: Key, _ session: Session?) {
        live[key] = session
        liveIndex.withLock { $0[key] = session }
    }
    private var starting: [Key: Task<Session, any Error>] = [:]
    private var ended: [SessionSummary] = []
    private var shuttingDown = false
    nonisolated var liveIndexSessions: [Session] { liveIndex.withLock { Array($0.values) } }
    /// Operators' live event feed.
    public nonisolated let events = SessionEvents()
    private var endings: [Task<Void, Never>] = []
    /// Per runtime: healthy sandboxes nobody has claimed yet, and how many are being started for the pool.
    private var warm: [String: [Session]] = [:]
    private var warming: [String: Int] = [:]

    public init(config: DaemonConfig, launcher: SandboxLauncher, seccompProgram: [UInt8], group: any EventLoopGroup,
                logger: Logger, clock: @escaping MonotonicClock = systemClock) {
        self.config = config
        self.launcher = launcher
        self.seccompProgram = seccompProgram
        self.group = group
        self.logger = logger
        self.initializationSeconds = config.initializationTimeoutSeconds
        self.clock = clock
    }

    public var liveSessions: [Session] { Array(live.values) }
    public var warmSessions: [Session] { config.runtimes.flatMap { warm[$0.name] ?? [] } }
    public var endedSessions: [SessionSummary] { ended }
    public var liveCount: Int { live.count + starting.count }

    public func session(runtime: String, id: String) -> Session? { live[Key(runtime: runtime, id: id)] }

    /// The live session for `id`, created (exactly once, however many calls race) when there is none.
    /// The session for an invocation: a live one straight from the index, without a hop to the actor;
    /// otherwise a warm sandbox or a new one, on the actor, so racing first calls make one sandbox.
    public nonisolated func acquire(runtime name: String, sessionID: String) async throws(SessionError) -> Session {
        if let s = liveSession(runtime: name, sessionID: sessionID) { return s }
        return try await acquireOrStart(runtime: name, sessionID: sessionID)
    }

    /// A live session from the index alone, never starting one: for callers that cannot wait.
    public nonisolated func liveSession(runtime name: String, sessionID: String) -> Session? {
        guard let s = liveIndex.withLock({ $0[Key(runtime: name, id: sessionID)] }), s.isLive else { return nil }
        return s
    }

    private func acquireOrStart(runtime name: String, sessionID: String) async throws(SessionError) -> Session {
        guard let runtime = config.runtime(named: name) else { throw .runtimeNotFound(name) }
        let key = Key(runtime: name, id: sessionID)
        if let s = live[key], s.isLive { return s }
        let task: Task<Session, any Error>
        if let t = starting[key] {
            task = t
        } else {
            guard !shuttingDown else { throw .shuttingDown }
            guard live.count + starting.count < config.maxSessions else { throw .quotaReached(config.maxSessions) }
            if let session = claimWarm(runtime, as: sessionID) {
                setLive(key, session)
                return session
            }
            task = Task { try await self.start(runtime, sessionID: sessionID) }
            starting[key] = task
        }
        do {
            let session = try await task.value
            if starting[key] == task {
                starting[key] = nil
                setLive(key, session)
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
    public func stop(runtime name: String, sessionID: String) async throws(SessionError) {
        guard config.runtime(named: name) != nil else { throw .runtimeNotFound(name) }
        let key = Key(runtime: name, id: sessionID)
        if live[key] == nil, let t = starting[key] { _ = try? await t.value }
        guard let s = live[key], s.isLive else { throw .sessionNotFound(sessionID) }
        _ = await end(s, .stopped)
    }

    /// Ends every session and warm sandbox (daemon shutdown) and waits for their teardown.
    public func shutdown() async {
        shuttingDown = true
        for t in starting.values { _ = try? await t.value }
        // A warm sandbox still starting ends itself when it finds the daemon shutting down (`warmed`).
        while warming.values.contains(where: { $0 > 0 }) { try? await Task.sleep(nanoseconds: 10_000_000) }
        let pooled = warmSessions
        warm = [:]
        await withTaskGroup(of: Void.self) { group in
            for s in live.values { group.addTask { _ = await self.end(s, .daemonShutdown) } }
            for s in pooled { group.addTask { _ = await self.end(s, .daemonShutdown) } }
        }
        for t in endings { await t.value }
        events.finishAll()
    }

    /// Finds a live or ended session by id or unique id prefix, for operators. Live sessions win over ended ones.
    public func find(_ prefix: String) -> Result<FoundSession, LookupError> {
        let live = live.values.filter { $0.id.hasPrefix(prefix) }
        if let exact = live.first(where: { $0.id == prefix }) { return .success(.live(exact)) }
        if live.count == 1 { return .success(.live(live[0])) }
        if live.count > 1 { return .failure(.ambiguous(live.map(\.id).sorted())) }
        let ended = ended.filter { $0.id.hasPrefix(prefix) }
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

    // MARK: - Warm pools

    /// Starts filling every runtime's warm pool; called once the daemon serves.
    public func startWarmPools() {
        for runtime in config.runtimes where runtime.warmPool > 0 { refill(runtime) }
    }

    private func claimWarm(_ runtime: RuntimeConfig, as sessionID: String) -> Session? {
        guard runtime.warmPool > 0 else { return nil }
        // Refill a moment later: a new agent's start-up (hundreds of ms of CPU for a Python agent) would
        // otherwise compete with the first request of the session that just claimed a sandbox.
        defer {
            Task {
                try? await Task.sleep(nanoseconds: Self.refillDelayNanoseconds)
                await self.refill(runtime)
            }
        }
        while var pool = warm[runtime.name], !pool.isEmpty {
            let candidate = pool.removeFirst()
            warm[runtime.name] = pool
            guard candidate.claim(as: sessionID) else { continue }
            Telemetry.sessionStarted(runtime: runtime.name)
            events.publish("created", session: candidate, ["initPID": .int(Int64(candidate.sandbox.initPID)),
                                                          "agentPID": .int(Int64(candidate.agentPID)), "warm": true])
            events.publish("ready", session: candidate)
            logger.info("session claimed a warm sandbox", metadata: ["session": "\(sessionID)", "runtime": "\(runtime.name)",
                                                                      "sandbox": "\(candidate.sandbox.id)"])
            return candidate
        }
        return nil
    }

    static let refillDelayNanoseconds: UInt64 = 100_000_000

    private func refill(_ runtime: RuntimeConfig) {
        guard !shuttingDown else { return }
        let missing = runtime.warmPool - (warm[runtime.name]?.count ?? 0) - (warming[runtime.name] ?? 0)
        guard missing > 0 else { return }
        warming[runtime.name, default: 0] += missing
        for _ in 0..<missing {
            Task {
                let session = try? await self.start(runtime, sessionID: nil)
                await self.warmed(runtime, session)
            }
        }
    }

    private func warmed(_ runtime: RuntimeConfig, _ session: Session?) async {
        // Counted as warming until ended or pooled: shutdown waits for the count to reach zero before it
        // removes the state directory and cgroup parent, so a teardown here must finish first.
        defer { warming[runtime.name, default: 1] -= 1 }
        guard let session else {
            // A runtime whose sandboxes cannot start would otherwise be retried in a tight loop.
            guard !shuttingDown else { return }
            Task {
                try? await Task.sleep(nanoseconds: 5_000_000_000)
                await self.refill(runtime)
            }
            return
        }
        if shuttingDown {
            _ = await end(session, .daemonShutdown)
            return
        }
        warm[runtime.name, default: []].append(session)
    }

    /// A warm sandbox that ended before anyone claimed it (its agent died, it failed its health checks).
    private func unpool(_ session: Session) {
        warm[session.runtime.name]?.removeAll { $0 === session }
        refill(session.runtime)
    }

    // MARK: - Taking over from a daemon that died

    /// Sandboxes a previous cubicled left running (it was killed, or crashed): each session's sandbox is
    /// reconnected through its reconnect socket and served again under its id; anything that cannot be
    /// (a warm sandbox, a half-built one, a dead init, a runtime no longer configured) is removed. Runs
    /// before the listeners start, so no request can race it.
    public func adoptLeftovers() async -> (adopted: [String], removed: Int) {
        let state = launcher.host.state
        var adopted: [String] = []
        var removed = 0
        for name in state.sandboxIDs() {
            let path = state.sandbox(name).path
            if let session = await adoptOne(state.sandbox(name)) {
                setLive(Key(runtime: session.runtime.name, id: session.id), session)
                adopted.append(session.id)
            } else {
                let left = await launcher.removeLeftovers(stateDirectory: path)
                if !left.isEmpty { logger.error("could not remove a dead sandbox", metadata: ["sandbox": "\(name)", "left": "\(left)"]) }
                removed += 1
            }
        }
        return (adopted, removed)
    }

    private func adoptOne(_ directory: SandboxDirectory) async -> Session? {
        let path = directory.path
        guard let facts = try? JSON.parse(try Files.read(directory.sessionRecord)),
              let id = facts["session"]?.stringValue, (try? Validate.sessionID(id)) != nil,
              let runtime = facts["runtime"]?.stringValue.flatMap({ config.runtime(named: $0) }),
              let created = facts["created"]?.intValue, live[Key(runtime: runtime.name, id: id)] == nil else { return nil }
        let sandbox: Sandbox
        let agentPID: pid_t
        do {
            let found = try await launcher.adopt(stateDirectory: path)
            guard let pid = found.agentPID else {
                _ = await found.sandbox.teardown()
                return nil
            }
            (sandbox, agentPID) = (found.sandbox, pid)
        } catch {
            logger.warning("sandbox could not be adopted", metadata: ["path": "\(path)", "error": "\(error)"])
            return nil
        }
        let logs: (stdout: Int32, stderr: Int32)
        do { logs = try await sandbox.agentLogs() } catch {
            _ = await sandbox.teardown()
            return nil
        }
        let port = runtime.serverProtocol.port
        let agent = AgentTransport(group: group) { try await sandbox.connect(port: port) }
        let session = Session(id: id, runtime: runtime, sandbox: sandbox, agent: agent, agentPID: agentPID, clock: clock,
                              createdUnixTime: Int(created))
        let now = clock()
        session.state.withLock { $0.lifecycle.ready(now: now) }
        supervise(session, stdout: logs.stdout, stderr: logs.stderr)
        Telemetry.sessionStarted(runtime: runtime.name)
        events.publish("adopted", session: session, ["initPID": .int(Int64(sandbox.initPID)), "agentPID": .int(Int64(agentPID))])
        logger.notice("session adopted from a previous cubicled", metadata: ["session": "\(id)", "runtime": "\(runtime.name)",
                                                                             "sandbox": "\(sandbox.id)"])
        return session
    }

    // MARK: - Start

    private func spec(for runtime: RuntimeConfig) -> SandboxSpec {
        var spec = SandboxSpec(seccompProgram: seccompProgram)
        spec.codeDirectory = runtime.codeDirectory
        spec.readOnlyMounts = runtime.readOnlyMounts
        // A session runs on as many CPUs as its quota rounds up to (cpuCount below, like a VM's vCPUs), and
        // its quota comes in 10 ms periods rather than the kernel's 100 ms, so a session at its limit holds
        // its core for 5 ms at a time, not 50. noisy_bench: a 4-thread CPU hog at half a CPU took a
        // neighbour's p99 to 5x its quiet baseline with neither; with both, 1 to 4x (the rest is host threads
        // waiting behind the hog on its core). The smallest quota is 1 ms, hence 100 ms below a tenth of a CPU.
        let period: Int64 = runtime.limits.cpus >= 0.1 ? 10_000 : 100_000
        spec.limits = CgroupLimits(memoryBytes: runtime.limits.memoryBytes,
                                   cpuQuotaMicros: Int64(runtime.limits.cpus * Double(period)), pids: Int64(runtime.limits.pids))
        spec.limits.cpuPeriodMicros = period
        spec.tmpBytes = runtime.limits.tmpfsBytes
        spec.maxProcesses = UInt64(runtime.limits.pids)
        spec.maxOpenFiles = UInt64(runtime.limits.openFiles)
        spec.cpuCount = Int(runtime.limits.cpus.rounded(.up))
        return spec
    }

    /// Starts a sandbox and its agent and waits until the agent is healthy. Without a session id it is a
    /// warm sandbox for the runtime's pool.
    private nonisolated func start(_ runtime: RuntimeConfig, sessionID: String?) async throws -> Session {
        let sandbox: Sandbox
        do {
            sandbox = try await launcher.launch(await spec(for: runtime))
        } catch {
            logger.error("session start failed", metadata: ["session": "\(sessionID ?? "(warm pool)")", "error": "\(error)"])
            throw SessionError.couldNotStart("Session could not start: \(error)")
        }
        let port = runtime.serverProtocol.port
        let agent = AgentTransport(group: group) { try await sandbox.connect(port: port) }
        let started: StartedProcess
        let env = Session.environment(for: runtime)
        do {
            started = try await sandbox.startAgent(ProcessParams(argv: runtime.command, env: env,
                                                                 cwd: runtime.codeDirectory == nil ? InitConfig.agentHome : InitConfig.codePath))
        } catch {
            _ = await sandbox.teardown()
            throw SessionError.couldNotStart("Agent could not start: \(error)")
        }
        let session = Session(id: sessionID, runtime: runtime, sandbox: sandbox, agent: agent, agentPID: started.pid, clock: clock)
        Telemetry.spawned(nanoseconds: sandbox.spawnNanoseconds)
        if sessionID != nil {
            session.recordOwnership()
            Telemetry.sessionStarted(runtime: runtime.name)
            events.publish("created", session: session, ["initPID": .int(Int64(sandbox.initPID)), "agentPID": .int(Int64(started.pid))])
        }
        supervise(session, stdout: started.stdout, stderr: started.stderr, lifecycleAfterStart: true)
        do {
            try await waitUntilHealthy(session)
        } catch {
            _ = await end(session, .startFailed("\(error)"))
            throw error
        }
        let now = clock()
        session.state.withLock { $0.lifecycle.ready(now: now) }
        if sessionID != nil { events.publish("ready", session: session) }
        logger.info(sessionID == nil ? "warm sandbox ready" : "session ready",
                    metadata: ["session": "\(sessionID ?? "-")", "runtime": "\(runtime.name)", "sandbox": "\(sandbox.id)",
                               "spawn_us": "\(sandbox.spawnNanoseconds / 1000)"])
        session.lifecycleMayStart.resolve(.success(()))
        return session
    }

    /// The session's tasks, owned by it (`Session.supervise`): its agent's stdout and stderr into its log,
    /// the watch on its sandbox's events, and its lifecycle (for a starting session, once it is healthy).
    private nonisolated func supervise(_ session: Session, stdout: Int32, stderr: Int32, lifecycleAfterStart: Bool = false) {
        let group = self.group
        if !lifecycleAfterStart { session.lifecycleMayStart.resolve(.success(())) }
        session.supervise([
            { await session.logs.drain(fd: stdout, stream: "stdout", group: group) },
            { await session.logs.drain(fd: stderr, stream: "stderr", group: group) },
            { await self.watchEvents(session) },
            {
                guard (try? await session.lifecycleMayStart.value) != nil else { return }
                await self.superviseLifecycle(session)
            },
        ])
    }

    private nonisolated func waitUntilHealthy(_ session: Session) async throws {
        let deadline = clock() + initializationSeconds
        var delay: UInt64 = 500_000
        while true {
            if let exit = session.state.withLock({ $0.agentExit }) {
                throw SessionError.couldNotStart("Agent exited during initialization (\(EndReason.agentExited(code: exit.code, signal: exit.signal)))")
            }
            if !session.sandbox.isRunning { throw SessionError.couldNotStart("Sandbox ended during initialization") }
            if (try? await ping(session, timeout: max(0.05, min(2, deadline - clock())))) != nil { return }
            guard clock() < deadline else {
                throw SessionError.initializationTimedOut(seconds: Int(initializationSeconds),
                                                          isAWSDefault: initializationSeconds == Double(Limits.initializationSeconds))
            }
            try? await Task.sleep(nanoseconds: delay)
            delay = min(delay * 2, 50_000_000)
        }
    }

    /// GET /ping; returns whether the agent says HealthyBusy. MCP and A2A agents have no /ping: a
    /// connection accepted on their port is their health.
    private nonisolated func ping(_ session: Session, timeout: Double) async throws -> Bool {
        guard let path = session.runtime.serverProtocol.pingPath else {
            let fd = try await session.sandbox.connect(port: session.runtime.serverProtocol.port)
            close(fd)
            return false
        }
        let (status, body) = try await session.agent.fetch(path: path, timeoutSeconds: timeout)
        guard status == 200 else { throw AgentLinkError("\(path) answered \(status)") }
        let health = (try? JSON.parse(body))?["status"]?.stringValue ?? "Healthy"
        let busy = health == "HealthyBusy"
        let now = clock()
        session.state.withLock { s in
            s.lastPing = String(health.prefix(32))
            s.pingFailures = 0
            s.lifecycle.pinged(busy: busy, now: now)
        }
        return busy
    }

    private nonisolated func watchEvents(_ session: Session) async {
        for await event in session.sandbox.events {
            switch event {
            case .agentExited(let pid, let code, let signal) where pid == session.agentPID:
                session.state.withLock { $0.agentExit = (code, signal) }
                let oom = signal == SIGKILL && session.sandbox.cgroup.usage().oomKills > 0
                _ = await self.end(session, oom ? .outOfMemory : .agentExited(code: code, signal: signal))
            case .ended(let reason) where reason != .stopped:
                _ = await self.end(session, .sandboxFailed(reason.description))
            default:
                break
            }
        }
    }

    /// OOM kills and refused forks since the last look, as events and counters. The cgroup counts them;
    /// the session remembers how many it has reported.
    private nonisolated func reportLimits(_ session: Session, _ usage: CgroupUsage) {
        let (oom, pids) = session.state.withLock { s -> (Int64, Int64) in
            defer { s.reportedOOMKills = usage.oomKills; s.reportedPidsLimitHits = usage.pidsLimitHits }
            return (usage.oomKills - s.reportedOOMKills, usage.pidsLimitHits - s.reportedPidsLimitHits)
        }
        if oom > 0 {
            Telemetry.oomKills(runtime: session.runtime.name, count: Int(oom))
            events.publish("oom_kill", session: session, ["count": .int(oom), "total": .int(usage.oomKills)])
        }
        if pids > 0 {
            Telemetry.limitHits(runtime: session.runtime.name, limit: "pids", count: Int(pids))
            events.publish("limit_hit", session: session, ["limit": "pids", "count": .int(pids), "total": .int(usage.pidsLimitHits)])
        }
    }

    /// Polls /ping and applies the idle and max-lifetime rules until the session ends.
    private nonisolated func superviseLifecycle(_ session: Session) async {
        // A warm sandbox is pinged more often than the agent pool's idle limit, so its connection to the
        // agent stays open and the claiming session's first request does not wait for a new one.
        func period() -> Double { session.isWarm ? min(config.healthPollSeconds, 1) : config.healthPollSeconds }
        var nextPing = clock() + period()
        while session.isLive {
            let now = clock()
            // A warm sandbox is kept until claimed; its lifecycle starts then. Health checks still run.
            if !session.isWarm, let reason = session.lifecycle.expiry(now: now) {
                _ = await end(session, reason)
                return
            }
            if now >= nextPing {
                nextPing = now + period()
                reportLimits(session, session.sandbox.cgroup.usage())
                do {
                    _ = try await ping(session, timeout: max(1, config.healthPollSeconds * 2))
                } catch {
                    let failures = session.state.withLock { s -> Int in s.pingFailures += 1; return s.pingFailures }
                    if failures >= config.unhealthyAfterFailures {
                        _ = await end(session, .unhealthy("\(failures) health checks failed; last: \(error)"))
                        return
                    }
                }
                continue
            }
            let wake = session.isWarm ? nextPing : min(nextPing, session.lifecycle.nextDeadline)
            try? await Task.sleep(nanoseconds: UInt64(max(0.001, min(wake - clock(), 60)) * 1e9))
        }
    }

    // MARK: - End

    /// Ends a session for `reason` (the first reason given wins) and returns what is kept of it.
    @discardableResult
    public nonisolated func end(_ session: Session, _ reason: EndReason) async -> SessionSummary {
        let (first, wasWarm) = session.state.withLock { ($0.lifecycle.stop(reason), $0.warm) }
        guard first else { return (try? await session.done.value) ?? session.summary }
        session.agent.close()
        let report = await session.sandbox.end(.stopped).value
        session.state.withLock { $0.lifecycle.ended() }
        session.logs.close()
        // Not awaited: end may be called from one of those tasks.
        session.stopSupervising()
        var summary = session.summary
        summary.usage = report.finalUsage
        Telemetry.tornDown(nanoseconds: report.nanoseconds)
        if wasWarm {
            // Never anyone's session: nothing to list or count as ended, only the pool to refill.
            logger.info("warm sandbox ended", metadata: ["sandbox": "\(session.sandbox.id)", "reason": "\(summary.endReason?.description ?? "?")"])
            await unpool(session)
            session.done.resolve(.success(summary))
            return summary
        }
        Telemetry.sessionEnded(runtime: session.runtime.name, reason: summary.endReason?.name ?? "unknown")
        reportLimits(session, summary.usage)
        events.publish("ended", session: session, ["reason": .string(summary.endReason?.name ?? "unknown"),
                                                   "detail": .string(summary.endReason?.description ?? "")])
        summary.endedUnixTime = Int(time(nil))
        summary.teardownLeftovers = report.leftovers
        if !report.leftovers.isEmpty {
            logger.error("teardown left something behind", metadata: ["session": "\(session.id)", "leftovers": "\(report.leftovers)"])
        }
        logger.info("session ended", metadata: ["session": "\(session.id)", "reason": "\(summary.endReason?.name ?? "?")",
                                                 "detail": "\(summary.endReason?.description ?? "?")",
                                                 "teardown_us": "\(report.nanoseconds / 1000)"])
        await retire(session, summary)
        session.done.resolve(.success(summary))
        return summary
    }

    private func retire(_ session: Session, _ summary: SessionSummary) {
        let key = Key(runtime: session.runtime.name, id: session.id)
        if live[key] === session { setLive(key, nil) }
        ended.append(summary)
        let cutoff = Int(time(nil)) - config.endedRetentionSeconds
        ended.removeAll { ($0.endedUnixTime ?? 0) < cutoff }
        if ended.count > 10_000 { ended.removeFirst(ended.count - 10_000) }
    }
}

extension Session {
    static func environment(for runtime: RuntimeConfig) -> [String] {
        var env = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=\(InitConfig.agentHome)", "LANG=C.UTF-8",
                   "AGENTCORE_RUNTIME_NAME=\(runtime.name)"]
        for (k, v) in runtime.environment.sorted(by: { $0.key < $1.key }) {
            env.removeAll { $0.hasPrefix(k + "=") }
            env.append("\(k)=\(v)")
        }
        return env
    }
}
