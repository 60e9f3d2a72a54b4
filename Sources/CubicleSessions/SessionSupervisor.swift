#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleAgentLink
import CubicleImages
import CubicleLinux
import CubicleNetwork
import CubicleRPC
import CubicleRuntimes
import CCubicleShim
import CubicleSandbox
import CubicleStorage
import Logging
import NIOCore
import Synchronization

/// What happens to one session from its sandbox's start to its end: the launch, the agent's start and
/// /ping protocol, and the session's own tasks (its agent's logs, the watch on its sandbox's events, health
/// polling and the lifecycle rules), which run in the task group the `Session` holds, so ending the session
/// cancels every one of them. It keeps no registry state: an ending is reported to whoever set `onEnded`.
struct SessionSupervisor: Sendable {
    let config: DaemonConfig
    let launcher: SandboxLauncher
    let seccompProgram: [UInt8]
    let group: any EventLoopGroup
    let clock: MonotonicClock
    let logger: Logger
    let events: SessionEvents
    /// The runtimes and their versions, for adoption.
    let catalog: RuntimeCatalog
    /// Links, policy, DNS and credentials for PUBLIC sessions: started with the first PUBLIC runtime.
    let networkSlot: NetworkSlot
    var network: SessionNetworking? { networkSlot.value }
    /// The runtimes' images, prepared at start; nil when no runtime names one.
    let images: PreparedImages?
    /// Sessions' storage volumes; nil when cubicled keeps none (tests without a data directory).
    let storage: SessionStorage?
    let endings = Endings()

    /// Where a supervisor reports ended sessions: the registry, set once it exists.
    final class Endings: Sendable {
        typealias Handler = @Sendable (_ session: Session, _ summary: SessionSummary, _ wasWarm: Bool) async -> Void
        private let handler = Mutex<Handler?>(nil)
        func set(_ h: @escaping Handler) { handler.withLock { $0 = h } }
        func report(_ session: Session, _ summary: SessionSummary, wasWarm: Bool) async {
            await handler.withLock { $0 }?(session, summary, wasWarm)
        }
    }

    // MARK: - Start

    /// The agent's process in an image: the runtime's command, else the image's Entrypoint and Cmd; the
    /// image's Env under Cubicle's and the runtime's (a name set twice takes the later); its WorkingDir
    /// unless the runtime has a code directory. Its user: the image's, unless that is root (then uid 1000).
    static func process(for runtime: RuntimeConfig, image: OCI.ImageConfig, base: ProcessParams) -> ProcessParams {
        var p = base
        if runtime.command.isEmpty { p.argv = image.entrypoint + image.cmd }
        var env: [String] = []
        for entry in image.env + base.env {
            let key = entry.split(separator: "=", maxSplits: 1).first.map(String.init) ?? entry
            env.removeAll { $0.hasPrefix(key + "=") }
            env.append(entry)
        }
        p.env = env
        if runtime.codeDirectory == nil { p.cwd = image.workingDir ?? "/" }
        return p
    }

    /// Starts a sandbox and its agent and waits until the agent is healthy. Without a session id it is a
    /// warm sandbox for the runtime's pool.
    func start(_ runtime: RuntimeConfig, sessionID: String?, owner: String = SessionKey.anonymousOwner, endpoint: String? = nil) async throws -> Session {
        let sandbox: Sandbox
        var spec = runtime.sandboxSpec(seccompProgram: seccompProgram)
        var process = ProcessParams(argv: runtime.command, env: Session.environment(for: runtime, region: config.region),
                                    cwd: runtime.codeDirectory == nil ? InitConfig.agentHome : InitConfig.codePath)
        if let uri = runtime.containerUri {
            guard let prepared = images?.prepared(uri) else { throw SessionError.couldNotStart("Session could not start: its image \(uri) is not prepared") }
            switch prepared {
            case .failure(let e): throw SessionError.couldNotStart("Session could not start: its image \(uri) could not be prepared: \(e)")
            case .success(let image):
                spec.imageLayers = image.layers
                // The image's writable layer lives in the root's tmpfs: as large as the runtime's tmpfs limit
                // (512 MiB by default), not the 16 MiB a read-only host root needs for its scaffolding.
                spec.rootBytes = runtime.limits.tmpfsBytes
                if let (uid, gid) = OCI.user(image.config.user, layers: image.layers) { (spec.agentUID, spec.agentGID) = (uid, gid) }
                process = Self.process(for: runtime, image: image.config, base: process)
            }
        }
        // A PUBLIC session's link and policy exist before its sandbox does, so its first packet is policed.
        var link: SessionLink?
        if runtime.networkMode == .public {
            guard let network else { throw SessionError.couldNotStart("Session could not start: PUBLIC networking is not available on this daemon") }
            do {
                let role = runtime.roleArn.flatMap { arn in config.roleCredentials.first { $0.roleArn == arn } }
                let made = try await network.take(runtime: runtime.name, policy: runtime.egress, role: role)
                spec.networkNamespaceFD = made.namespaceFD
                spec.nameserver = network.gateway.description
                link = made
            } catch {
                logger.error("session link failed", metadata: ["session": "\(sessionID ?? "(warm pool)")", "error": "\(error)"])
                throw SessionError.couldNotStart("Session could not start: its network link: \(error)")
            }
        }
        do {
            // The policy goes into the kernel beside the launch, and is there before the agent starts; until
            // then the link's address is in no set and everything from it is refused.
            let taken = link, net = network
            async let policed: Void = { if let taken, let net { try await net.police(taken) } }()
            do {
                sandbox = try await launcher.launch(spec)
            } catch {
                _ = try? await policed
                throw error
            }
            // The sandbox's processes hold its namespace now.
            link = link.map { network!.handedOver($0) }
            do { try await policed } catch {
                _ = await sandbox.teardown()
                throw error
            }
        } catch {
            if let link { network?.detach(link.address) }
            network?.refill()
            logger.error("session start failed", metadata: ["session": "\(sessionID ?? "(warm pool)")", "error": "\(error)"])
            throw SessionError.couldNotStart("Session could not start: \(error)")
        }
        // The session's storage, in place before its agent starts: its volume mounted on the host (made, or
        // made anew for a new version), then an idmapped copy attached inside at the mount path.
        var lease: SessionStorage.Lease?
        if runtime.sessionStorage != nil, let sessionID {
            do {
                lease = try await attachStorage(to: sandbox, runtime, owner: owner, sessionID: sessionID, endpoint: endpoint)
            } catch {
                _ = await sandbox.teardown()
                if let link { network?.detach(link.address) }
                logger.error("session storage failed", metadata: ["session": "\(sessionID)", "error": "\(error)"])
                throw SessionError.couldNotStart("Session could not start: its session storage: \(error)")
            }
        }
        let started: StartedProcess
        do {
            started = try await sandbox.startAgent(process)
        } catch {
            _ = await sandbox.teardown()
            if let lease { await storage?.release(lease, now: Int(time(nil))) }
            if let link { network?.detach(link.address) }
            throw SessionError.couldNotStart("Agent could not start: \(error)")
        }
        let session = Session(id: sessionID, owner: owner, runtime: runtime, sandbox: sandbox, agent: transport(to: sandbox, runtime),
                              agentPID: started.pid, clock: clock, link: link, region: config.region, storage: lease)
        if let link, let sessionID { network?.name(link.address, sessionID: sessionID) }
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
            if link != nil { network?.refill() }
            _ = await end(session, .startFailed("\(error)"))
            throw error
        }
        // The link taken is made up once the agent answers: making one beside its start competes with it for
        // the CPU and the rtnl lock (+1.2 ms to a PUBLIC session's first answer, egress_bench).
        if link != nil { network?.refill() }
        let now = clock()
        session.state.withLock { $0.lifecycle.ready(now: now) }
        if sessionID != nil { events.publish("ready", session: session) }
        logger.info(sessionID == nil ? "warm sandbox ready" : "session ready",
                    metadata: ["session": "\(sessionID ?? "-")", "runtime": "\(runtime.name)", "sandbox": "\(sandbox.id)",
                               "spawn_us": "\(sandbox.spawnNanoseconds / 1000)"])
        session.lifecycleMayStart.resolve(.success(()))
        return session
    }

    /// The session's volume mounted on the host and attached inside `sandbox` at its mount path; released
    /// again if the attach fails.
    func attachStorage(to sandbox: Sandbox, _ runtime: RuntimeConfig, owner: String, sessionID: String, endpoint: String?) async throws -> SessionStorage.Lease {
        guard let fs = runtime.sessionStorage else { throw SystemError("session storage: the runtime has none", errno: EINVAL) }
        guard let storage else { throw SystemError("session storage: cubicled keeps none", errno: ENOTSUP) }
        let lease = try await storage.attach(SessionStorage.Key(runtime: runtime.name, owner: owner, id: sessionID), version: runtime.version,
                                             endpoint: endpoint ?? "DEFAULT", limits: .forBytes(fs.bytes), now: Int(time(nil)))
        var step: Int32 = 0
        guard cubicle_mount_into_sandbox(sandbox.initPID, lease.hostPath, fs.mountPath, &step) == 0 else {
            let error = SystemError.lastError("attach session storage at \(fs.mountPath) (step \(step))")
            await storage.release(lease, now: Int(time(nil)))
            throw error
        }
        return lease
    }

    /// A warm sandbox just claimed by a session with storage: the volume attached before the session's
    /// first request reaches its agent. The agent sees the mount path fill in at that moment.
    func attachStorage(toClaimed session: Session, owner: String, sessionID: String, endpoint: String?) async throws {
        session.hold(try await attachStorage(to: session.sandbox, session.runtime, owner: owner, sessionID: sessionID, endpoint: endpoint))
    }

    /// A session for a sandbox a previous cubicled left running, served again under its id from now on.
    func resume(_ sandbox: Sandbox, id: String, owner: String, runtime: RuntimeConfig, agentPID: Int32, created: Int,
                logs: (stdout: Int32, stderr: Int32), link: SessionLink?, storage: SessionStorage.Lease? = nil) -> Session {
        let session = Session(id: id, owner: owner, runtime: runtime, sandbox: sandbox, agent: transport(to: sandbox, runtime), agentPID: agentPID,
                              clock: clock, createdUnixTime: created, link: link, region: config.region, storage: storage)
        let now = clock()
        session.state.withLock { $0.lifecycle.ready(now: now) }
        supervise(session, stdout: logs.stdout, stderr: logs.stderr)
        Telemetry.sessionStarted(runtime: runtime.name)
        return session
    }

    private func transport(to sandbox: Sandbox, _ runtime: RuntimeConfig) -> AgentTransport {
        let port = runtime.serverProtocol.port
        return AgentTransport(group: group) { try await sandbox.connect(port: port) }
    }

    /// The session's tasks, owned by it (`Session.supervise`): its agent's stdout and stderr into its log,
    /// the watch on its sandbox's events, and its lifecycle (for a starting session, once it is healthy).
    private func supervise(_ session: Session, stdout: Int32, stderr: Int32, lifecycleAfterStart: Bool = false) {
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

    // MARK: - Health

    private func waitUntilHealthy(_ session: Session) async throws {
        let seconds = config.initializationTimeoutSeconds
        let deadline = clock() + seconds
        var delay: UInt64 = 500_000
        while true {
            if let exit = session.state.withLock({ $0.agentExit }) {
                throw SessionError.couldNotStart("Agent exited during initialization (\(EndReason.agentExited(code: exit.code, signal: exit.signal)))")
            }
            if !session.sandbox.isRunning { throw SessionError.couldNotStart("Sandbox ended during initialization") }
            if (try? await ping(session, timeout: max(0.05, min(2, deadline - clock())))) != nil { return }
            guard clock() < deadline else {
                throw SessionError.initializationTimedOut(seconds: Int(seconds), isAWSDefault: seconds == Double(Limits.initializationSeconds))
            }
            try? await Task.sleep(nanoseconds: delay)
            delay = min(delay * 2, 50_000_000)
        }
    }

    /// GET /ping; returns whether the agent says HealthyBusy. MCP and A2A agents have no /ping: a
    /// connection accepted on their port is their health.
    private func ping(_ session: Session, timeout: Double) async throws -> Bool {
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

    // MARK: - Watching

    private func watchEvents(_ session: Session) async {
        for await event in session.sandbox.events {
            switch event {
            case .agentExited(let pid, let code, let signal) where pid == session.agentPID:
                session.state.withLock { $0.agentExit = (code, signal) }
                let oom = signal == SIGKILL && session.sandbox.cgroup.usage().oomKills > 0
                _ = await end(session, oom ? .outOfMemory : .agentExited(code: code, signal: signal))
            case .ended(let reason) where reason != .stopped:
                _ = await end(session, .sandboxFailed(reason.description))
            default:
                break
            }
        }
    }

    /// OOM kills and refused forks since the last look, as events and counters. The cgroup counts them;
    /// the session remembers how many it has reported.
    private func reportLimits(_ session: Session, _ usage: CgroupUsage) {
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
    private func superviseLifecycle(_ session: Session) async {
        // A warm sandbox is pinged more often than the transport's idle limit, so its link to the agent
        // stays open and the claiming session's first request does not wait for a new one.
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

    /// Ends a session for `reason` (the first reason given wins) and returns what is kept of it, once the
    /// sandbox is torn down and the registry has heard.
    @discardableResult
    func end(_ session: Session, _ reason: EndReason) async -> SessionSummary {
        let (first, wasWarm) = session.state.withLock { ($0.lifecycle.stop(reason), $0.warm) }
        guard first else { return (try? await session.done.value) ?? session.summary }
        // An agent that answered and then exited (its response still in flight to us) is not cut off: its
        // links end at the end of file its exit gives them. Any other ending cuts what is in flight.
        if case .agentExited = reason { session.agent.close(keepingInUse: true) } else { session.agent.close() }
        let report = await session.sandbox.end(.stopped).value
        // Its elements out of the kernel and its link deleted once nothing inside can send any more.
        if let link = session.link { network?.detach(link.address) }
        // Its storage flushed and unmounted once nothing inside can write any more; the session's next
        // sandbox waits for this.
        if let lease = session.storage { await storage?.release(lease, now: Int(time(nil))) }
        session.state.withLock { $0.lifecycle.ended() }
        session.logs.close()
        // Not awaited: end may be called from one of those tasks.
        session.stopSupervising()
        var summary = session.summary(usage: report.finalUsage)
        Telemetry.tornDown(nanoseconds: report.nanoseconds)
        if wasWarm {
            // Never anyone's session: nothing to list or count as ended, only the pool to refill.
            logger.info("warm sandbox ended", metadata: ["sandbox": "\(session.sandbox.id)", "reason": "\(summary.endReason?.description ?? "?")"])
            await endings.report(session, summary, wasWarm: true)
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
        await endings.report(session, summary, wasWarm: false)
        session.done.resolve(.success(summary))
        return summary
    }
}

extension RuntimeConfig {
    /// The sandbox a session of this runtime gets.
    func sandboxSpec(seccompProgram: [UInt8]) -> SandboxSpec {
        var spec = SandboxSpec(seccompProgram: seccompProgram)
        spec.codeDirectory = codeDirectory
        spec.readOnlyMounts = readOnlyMounts
        // A session runs on as many CPUs as its quota rounds up to (cpuCount below, like a VM's vCPUs), and
        // its quota comes in 10 ms periods rather than the kernel's 100 ms, so a session at its limit holds
        // its core for 5 ms at a time, not 50. noisy_bench: a 4-thread CPU hog at half a CPU took a
        // neighbour's p99 to 5x its quiet baseline with neither; with both, 1 to 4x (the rest is host threads
        // waiting behind the hog on its core). The smallest quota is 1 ms, hence 100 ms below a tenth of a CPU.
        let period: Int64 = limits.cpus >= 0.1 ? 10_000 : 100_000
        spec.limits = CgroupLimits(memoryBytes: limits.memoryBytes, cpuQuotaMicros: Int64(limits.cpus * Double(period)), pids: Int64(limits.pids))
        spec.limits.cpuPeriodMicros = period
        spec.tmpBytes = limits.tmpfsBytes
        spec.maxProcesses = UInt64(limits.pids)
        spec.maxOpenFiles = UInt64(limits.openFiles)
        spec.cpuCount = Int(limits.cpus.rounded(.up))
        if let fs = sessionStorage { spec.mountPoints = [fs.mountPath] }
        return spec
    }
}

extension Session {
    static func environment(for runtime: RuntimeConfig, region: String? = nil) -> [String] {
        var env = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=\(InitConfig.agentHome)", "LANG=C.UTF-8",
                   "AGENTCORE_RUNTIME_NAME=\(runtime.name)"]
        // As AgentCore's runtime sets them: SDKs inside find their region without a config file.
        if let region { env += ["AWS_REGION=\(region)", "AWS_DEFAULT_REGION=\(region)"] }
        for (k, v) in runtime.environment.sorted(by: { $0.key < $1.key }) {
            env.removeAll { $0.hasPrefix(k + "=") }
            env.append("\(k)=\(v)")
        }
        return env
    }
}

/// PUBLIC networking, set once when it starts: at daemon start, or later with the first PUBLIC runtime.
public final class NetworkSlot: Sendable {
    private let network = Mutex<SessionNetworking?>(nil)
    public init() {}
    public var value: SessionNetworking? { network.withLock { $0 } }
    /// False if one was set already.
    func set(_ n: SessionNetworking) -> Bool {
        network.withLock { current in
            guard current == nil else { return false }
            current = n
            return true
        }
    }
}
