#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleAgentLink
import CubicleLinux
import CubicleRPC
import CubicleNetwork
import CubicleRuntimes
import CubicleSandbox
import CubicleStorage
import Dispatch
import Synchronization

/// Seconds on a monotonic clock; tests drive lifecycles with their own.
public typealias MonotonicClock = @Sendable () -> Double
public let systemClock: MonotonicClock = { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// One runtime session: its sandbox, its agent, its lifecycle. Shared by the gateway (requests and
/// commands), the manager (ending it) and operators (inspect, logs).
public final class Session: Sendable {
    /// The session id; a warm sandbox (started ahead for the runtime's pool) gets its id when claimed.
    public var id: String { identity.withLock { $0.id } }
    /// Who created it: a principal's name, `jwt:ISSUER#SUBJECT`, or `anonymous` (SessionKey).
    public var owner: String { identity.withLock { $0.owner } }
    public var key: SessionKey { identity.withLock { SessionKey(runtime: runtime.name, owner: $0.owner, id: $0.id) } }
    public var createdUnixTime: Int { identity.withLock { $0.created } }
    public let runtime: RuntimeConfig
    public let sandbox: Sandbox
    /// The one way to the agent: links for the gateway's forwarder, exchanges for everything else.
    public let agent: AgentTransport
    public let logs = LogRing()
    public let agentPID: Int32
    /// A PUBLIC session's link (its namespace already handed to the sandbox); nil for SANDBOX.
    public let link: SessionLink?
    /// cubicled's region, in the agent's environment as AWS_REGION.
    let region: String?
    /// The session's storage volume, mounted while this sandbox lives: from its start, or (a warm sandbox)
    /// from its claim.
    public var storage: SessionStorage.Lease? { storageLease.withLock { $0 } }
    private let storageLease: Mutex<SessionStorage.Lease?>

    func hold(_ lease: SessionStorage.Lease) {
        storageLease.withLock { $0 = lease }
        recordOwnership()
    }
    let clock: MonotonicClock
    private let identity: Mutex<(id: String, owner: String, created: Int)>
    /// `warm`: in its runtime's pool, not yet any session's. Under the same lock as the lifecycle, so a
    /// claim and an ending cannot both win.
    let state: Mutex<(lifecycle: Lifecycle, lastPing: String?, pingFailures: Int, agentExit: (code: Int32?, signal: Int32?)?,
                      reportedOOMKills: Int64, reportedPidsLimitHits: Int64, warm: Bool)>
    /// Resolves once teardown has finished.
    let done = OneShot<SessionSummary>()
    /// The session's own tasks (log drains, the watch on its sandbox's events, its lifecycle), owned by one
    /// task: ending the session cancels it, and it finishes once the last of them has.
    private let supervision = Mutex<Task<Void, Never>?>(nil)
    /// Resolved when the lifecycle may run (a starting session is healthy), or failed when it never will.
    let lifecycleMayStart = OneShot<Void>()

    func supervise(_ jobs: [@Sendable () async -> Void]) {
        let task = Task {
            await withDiscardingTaskGroup { group in
                for job in jobs { group.addTask { await job() } }
            }
        }
        supervision.withLock { $0 = task }
    }

    func stopSupervising() {
        lifecycleMayStart.resolve(.failure(CancellationError()))
        supervision.withLock { $0?.cancel() }
    }

    /// Returns once every task the session started has ended.
    public func supervisionEnded() async { await supervision.withLock { $0 }?.value }

    /// `createdUnixTime` is given for a session taken over from a daemon that died: its max lifetime counts
    /// from when it was really created.
    init(id: String?, owner: String = SessionKey.anonymousOwner, runtime: RuntimeConfig, sandbox: Sandbox, agent: AgentTransport, agentPID: Int32,
         clock: @escaping MonotonicClock, createdUnixTime: Int? = nil, link: SessionLink? = nil, region: String? = nil,
         storage: SessionStorage.Lease? = nil) {
        self.link = link
        self.storageLease = Mutex(storage)
        self.region = region
        let nowUnix = Int(time(nil))
        self.identity = Mutex((id ?? "", owner, createdUnixTime ?? nowUnix))
        self.runtime = runtime
        self.sandbox = sandbox
        self.agent = agent
        self.agentPID = agentPID
        self.clock = clock
        let age = Double(max(0, nowUnix - (createdUnixTime ?? nowUnix)))
        state = Mutex((Self.freshLifecycle(runtime, now: clock() - age), nil, 0, nil, 0, 0, id == nil))
    }

    /// Beside the sandbox's own facts, what a restarted daemon needs to take this session over.
    func recordOwnership() {
        let (id, owner, created) = identity.withLock { $0 }
        var fields: [String: JSON] = ["session": .string(id), "owner": .string(owner), "runtime": .string(runtime.name), "version": .int(Int64(runtime.version)), "created": .int(Int64(created)),
                                      "agentPID": .int(Int64(agentPID))]
        if let link { fields["link"] = .int(Int64(link.index)) }
        if storage != nil { fields["storage"] = .bool(true) }
        let facts = JSON.object(fields)
        guard let directory = SandboxDirectory(path: sandbox.stateDirectory) else { return }
        try? Files.writeAtomically(directory.sessionRecord, facts.text, durable: false)
    }

    private static func freshLifecycle(_ runtime: RuntimeConfig, now: Double) -> Lifecycle {
        Lifecycle(now: now, idleTimeout: Double(runtime.idleRuntimeSessionTimeout), maxLifetime: Double(runtime.maxLifetime))
    }

    public var isWarm: Bool { state.withLock { $0.warm } }

    /// Makes a healthy warm sandbox session `id`'s, once: its lifecycle starts now, as a new session's
    /// would. false when it is no longer warm or has begun to end.
    func claim(as id: String, owner: String) -> Bool {
        let now = clock()
        let claimed = state.withLock { s -> Bool in
            guard s.warm, s.lifecycle.isLive else { return false }
            s.warm = false
            var fresh = Self.freshLifecycle(runtime, now: now)
            fresh.ready(now: now)
            s.lifecycle = fresh
            return true
        }
        if claimed {
            identity.withLock { $0 = (id, owner, Int(time(nil))) }
            recordOwnership()
        }
        return claimed
    }

    public var lifecycle: Lifecycle { state.withLock { $0.lifecycle } }
    public var lastPingStatus: String? { state.withLock { $0.lastPing } }
    public var isLive: Bool { lifecycle.isLive }

    /// Brackets one invocation, so the session is not idle while it runs.
    public func requestStarted() { let now = clock(); state.withLock { $0.lifecycle.requestStarted(now: now) } }
    public func requestEnded() { let now = clock(); state.withLock { $0.lifecycle.requestEnded(now: now) } }
    public func commandStarted() { let now = clock(); state.withLock { $0.lifecycle.commandStarted(now: now) } }
    public func commandEnded() { let now = clock(); state.withLock { $0.lifecycle.commandEnded(now: now) } }

    /// Why the agent failed to answer, when the session ended under the request (the agent died, was
    /// OOM-killed, the session was stopped): waits briefly for the end reason, which the manager records
    /// when init reports the exit, a moment after the connection closed. nil while the session lives.
    public func endedCause(waitingUpTo seconds: Double = 0.5) async -> String? {
        let deadline = clock() + seconds
        while true {
            switch lifecycle.endReason {
            case .outOfMemory?:
                return "the agent was killed for exceeding the session's memory limit (\(runtime.limits.memoryBytes >> 20) MiB); the session has ended"
            case let reason?:
                return "the session ended (\(reason))"
            case nil:
                guard clock() < deadline else { return nil }
                try? await Task.sleep(nanoseconds: 20_000_000)
            }
        }
    }

    /// The environment the agent and every command in the session run with.
    public var environment: [String] { Session.environment(for: runtime, region: region) }

    /// The lifecycle's moments as Unix times, for operators.
    public var timeline: Timeline {
        let lc = lifecycle
        let offset = SessionEvents.unixTime() - clock()
        return Timeline(lastActivity: lc.lastActivity + offset, idleDeadline: lc.idleDeadline.map { $0 + offset },
                        maxLifetimeDeadline: lc.maxLifetimeDeadline + offset, idleSeconds: max(0, clock() - lc.lastActivity))
    }

    public struct Timeline: Sendable {
        public var lastActivity: Double
        /// nil while the session is busy (a request, a command, or the agent reporting HealthyBusy).
        public var idleDeadline: Double?
        public var maxLifetimeDeadline: Double
        public var idleSeconds: Double
    }

    /// What operators see now; its usage read from the cgroup.
    public var summary: SessionSummary { summary(usage: sandbox.cgroup.usage()) }

    /// The same with `usage` given: an ended session's cgroup is gone, and its teardown kept the last figures.
    func summary(usage: CgroupUsage) -> SessionSummary {
        let (lc, ping, warm) = state.withLock { ($0.lifecycle, $0.lastPing, $0.warm) }
        return SessionSummary(id: id, owner: owner, runtime: runtime.name, runtimeVersion: runtime.version, state: warm && lc.isLive ? "warm" : lc.state.name, endReason: lc.endReason,
                              createdUnixTime: createdUnixTime, invocations: lc.invocations, lastPing: ping,
                              initPID: sandbox.initPID, agentPID: agentPID, sandboxID: sandbox.id, usage: usage)
    }
}

/// What is kept of a session for operators, live or ended.
public struct SessionSummary: Sendable {
    public var id: String
    public var owner: String
    public var runtime: String
    /// The runtime version the session started with, and keeps until it ends.
    public var runtimeVersion: Int
    public var state: String
    public var endReason: EndReason?
    public var createdUnixTime: Int
    public var endedUnixTime: Int?
    public var invocations: Int
    public var lastPing: String?
    public var initPID: Int32
    public var agentPID: Int32
    public var sandboxID: String
    public var usage: CgroupUsage
    public var teardownLeftovers: [String] = []
}
