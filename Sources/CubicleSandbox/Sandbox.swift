#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC
import Dispatch
import Synchronization

/// Why a sandbox ended.
public enum SandboxEndReason: Equatable, Sendable {
    case stopped
    case initExited(status: Int32)
    case controlChannelClosed
    case protocolViolation(String)

    public var description: String {
        switch self {
        case .stopped: "stopped"
        case .initExited(let s): "init exited (wait status \(s))"
        case .controlChannelClosed: "control channel closed"
        case .protocolViolation(let why): "protocol violation: \(why)"
        }
    }
}

public enum SandboxEvent: Equatable, Sendable {
    case agentExited(pid: Int32, exitCode: Int32?, signal: Int32?)
    case commandExited(CommandExit)
    case ended(SandboxEndReason)
}

public struct CommandExit: Equatable, Sendable {
    public var pid: Int32
    public var exitCode: Int32?
    public var signal: Int32?
    public var timedOut: Bool
}

/// A process init started for us, with the read ends of its stdout and stderr, which the caller owns.
public struct StartedProcess: Sendable {
    public var pid: Int32
    public var stdout: Int32
    public var stderr: Int32
}

public struct TeardownReport: Sendable {
    public var reason: SandboxEndReason
    public var wipedFiles = 0
    public var wipedBytes: Int64 = 0
    public var nanoseconds: UInt64 = 0
    public var finalUsage: CgroupUsage
    /// Anything of the sandbox still on the host afterwards; empty when teardown was complete.
    public var leftovers: [String] = []
}

/// A running sandbox: cubicle-init as PID 1 of its own namespaces, in its own cgroup, with its own
/// host uid range. Ends exactly once, by `teardown` or because init died or misbehaved.
public final class Sandbox: Sendable {
    public let id: String
    public let initPID: pid_t
    public let cgroup: Cgroup
    public let uidRange: UIDRange
    public let stateDirectory: String
    /// The CPUs it may run on (its cpuset); empty: all.
    public let cpus: [Int]
    let cpuPlacer: CPUPlacer
    /// Launch start to init's `ready`, in nanoseconds: the one place spawn time is measured.
    public let spawnNanoseconds: UInt64
    /// The same time split by step (host paths, uid range, cgroup, clone, init's own steps, ready).
    public let spawnPhases: [SpawnPhase]
    public let events: AsyncStream<SandboxEvent>

    let eventSink: AsyncStream<SandboxEvent>.Continuation
    let connection: InitConnection
    /// Its writable tmpfs mounts, held from launch (or adoption) until teardown has wiped them.
    let mounts: PinnedMounts
    let allocator: UIDRangeAllocator
    let state = Mutex(State())
    /// Touched only on `connection.queue`.
    let pidfdWatch = SourceBox()

    final class SourceBox: @unchecked Sendable {
        var source: DispatchSourceRead?
    }

    struct State {
        var ended: SandboxEndReason?
        var teardown: Task<TeardownReport, Never>?
        var commandWaiters: [Int32: CheckedContinuation<CommandExit, Never>] = [:]
        var commandExits: [Int32: CommandExit] = [:]
        var initStatus: Int32?
    }

    /// What a launch or an adoption learnt about the sandbox.
    struct Facts {
        var id: String
        var initPID: pid_t
        var cgroup: Cgroup
        var uidRange: UIDRange
        var stateDirectory: String
        var cpus: [Int]
        var spawnNanoseconds: UInt64
        var spawnPhases: [SpawnPhase]
    }

    init(_ facts: Facts, connection: InitConnection, mounts: PinnedMounts, allocator: UIDRangeAllocator,
         cpuPlacer: CPUPlacer, events: AsyncStream<SandboxEvent>, sink: AsyncStream<SandboxEvent>.Continuation) {
        self.mounts = mounts
        self.cpus = facts.cpus
        self.cpuPlacer = cpuPlacer
        self.id = facts.id
        self.initPID = facts.initPID
        self.cgroup = facts.cgroup
        self.uidRange = facts.uidRange
        self.stateDirectory = facts.stateDirectory
        self.spawnNanoseconds = facts.spawnNanoseconds
        self.spawnPhases = facts.spawnPhases
        self.connection = connection
        self.allocator = allocator
        self.events = events
        self.eventSink = sink
    }

    public var endReason: SandboxEndReason? { state.withLock { $0.ended } }
    public var isRunning: Bool { state.withLock { $0.ended == nil } }

    // MARK: - Requests to init

    /// Every descriptor from init is checked for what it must be; anything else ends the sandbox.
    private func expect(_ fds: [Int32], _ kinds: [(DescriptorKind) -> Bool], what: String) throws(SandboxError) {
        guard fds.count == kinds.count, zip(fds, kinds).allSatisfy({ $1(DescriptorKind.of($0)) }) else {
            fds.forEach { close($0) }
            let why = "\(what): expected \(kinds.count) descriptors of the right type, got \(fds.map { DescriptorKind.of($0) })"
            end(.protocolViolation(why))
            throw .protocolViolation(why)
        }
    }

    private static let isPipe: @Sendable (DescriptorKind) -> Bool = { $0 == .readablePipe }
    /// A pseudo-terminal's master: devpts' ptmx (character device 5:2) and nothing else.
    private static let isTerminalMaster: @Sendable (DescriptorKind) -> Bool = { $0 == .terminalMaster }
    private static let isTCP: @Sendable (DescriptorKind) -> Bool = { if case .streamSocket(let d) = $0 { d == AF_INET || d == AF_INET6 } else { false } }

    /// Sends `request` and checks what comes back: a reply of the request's shape with the descriptors it
    /// must carry, each of the right kind. Anything else ends the sandbox.
    private func call(_ request: InitRequest, descriptors kinds: [(DescriptorKind) -> Bool]) async throws(SandboxError) -> (InitReply, [Int32]) {
        let raw: InitConnection.Reply
        do {
            raw = try await connection.call(request.method, request.params)
        } catch let e as SandboxError {
            throw e
        } catch {
            throw .ended("\(error)")
        }
        try expect(raw.fds, kinds, what: request.method)
        do {
            return (try InitReply(json: raw.value, for: request), raw.fds)
        } catch {
            raw.fds.forEach { close($0) }
            end(.protocolViolation("\(error)"))
            throw .protocolViolation("\(error)")
        }
    }

    /// For a daemon that reconnected: the agent's pid inside, or nil once it has exited.
    public func agentStatus() async throws(SandboxError) -> pid_t? {
        guard case (.status(let pid), _) = try await call(.status, descriptors: []) else { return nil }
        return pid
    }

    /// For a daemon that reconnected: the read ends of the running agent's stdout and stderr.
    public func agentLogs() async throws(SandboxError) -> (stdout: Int32, stderr: Int32) {
        let (_, fds) = try await call(.agentLogs, descriptors: [Self.isPipe, Self.isPipe])
        return (fds[0], fds[1])
    }

    public func startAgent(_ params: ProcessParams) async throws(SandboxError) -> StartedProcess {
        try await started(.startAgent(params))
    }

    /// A TCP connection to 127.0.0.1:port inside the sandbox's network namespace, opened by init.
    public func connect(port: UInt16) async throws(SandboxError) -> Int32 {
        try await call(.connect(port: port), descriptors: [Self.isTCP]).1[0]
    }

    public func runCommand(_ params: ProcessParams, timeoutSeconds: Int) async throws(SandboxError) -> StartedProcess {
        try await started(.runCommand(params, timeoutSeconds: timeoutSeconds))
    }

    /// A process on a terminal of its own in the sandbox (`params` with the agent's identity): its pid inside
    /// and the terminal's master. Its end comes as a command's does (`waitForCommand`); closing the master
    /// hangs it up.
    public func openShell(_ params: ProcessParams, rows: Int, cols: Int) async throws(SandboxError) -> (pid: Int32, master: Int32) {
        let (reply, fds) = try await call(.openShell(params, rows: rows, cols: cols), descriptors: [Self.isTerminalMaster])
        guard case .started(let pid) = reply else { fds.forEach { close($0) }; throw .protocolViolation("shell.open: not started") }
        return (pid, fds[0])
    }

    /// Ends a command or shell whose client went away (SIGKILL to its process group); its end then comes to
    /// `waitForCommand` as any end does. Refused (`.rpc`) for a pid that is not a running command of init's:
    /// one that already exited, the agent, init.
    public func endCommand(pid: Int32) async throws(SandboxError) {
        _ = try await call(.endCommand(pid: pid), descriptors: [])
    }

    private func started(_ request: InitRequest) async throws(SandboxError) -> StartedProcess {
        let (reply, fds) = try await call(request, descriptors: [Self.isPipe, Self.isPipe])
        guard case .started(let pid) = reply else { fds.forEach { close($0) }; throw .protocolViolation("\(request.method): not started") }
        return StartedProcess(pid: pid, stdout: fds[0], stderr: fds[1])
    }

    /// Waits for a command's `command.exited`; returns at once if it already came.
    public func waitForCommand(pid: Int32) async -> CommandExit {
        await withCheckedContinuation { c in
            let ready: CommandExit? = state.withLock { s in
                if let e = s.commandExits.removeValue(forKey: pid) { return e }
                if s.ended != nil { return CommandExit(pid: pid, exitCode: nil, signal: SIGKILL, timedOut: false) }
                s.commandWaiters[pid] = c
                return nil
            }
            if let ready { c.resume(returning: ready) }
        }
    }

    // MARK: - Notifications and endings

    func handleNotification(_ method: String, _ params: JSON) {
        // ready/failed after start are harmless repeats; a malformed notification changes nothing.
        switch try? InitNotification(method: method, params: params) {
        case .agentExited(let e)?:
            eventSink.yield(.agentExited(pid: e.pid, exitCode: e.exitCode, signal: e.signal))
        case .commandExited(let e, let timedOut)?:
            let exit = CommandExit(pid: e.pid, exitCode: e.exitCode, signal: e.signal, timedOut: timedOut)
            let waiter: CheckedContinuation<CommandExit, Never>? = state.withLock { s in
                if let w = s.commandWaiters.removeValue(forKey: e.pid) { return w }
                // Bounded: a hostile init cannot grow this past a few thousand entries.
                if s.commandExits.count < 4096 { s.commandExits[e.pid] = exit }
                return nil
            }
            waiter?.resume(returning: exit)
            eventSink.yield(.commandExited(exit))
        default:
            break
        }
    }

    func watchInit() {
        let pidfd = cubicle_pidfd_open(initPID)
        guard pidfd >= 0 else { return }
        let source = DispatchSource.makeReadSource(fileDescriptor: pidfd, queue: connection.queue)
        source.setEventHandler { [weak self] in
            guard let self else { return }
            var status: Int32 = 0
            let r = waitpid(self.initPID, &status, WNOHANG)
            if r == self.initPID {
                self.state.withLock { $0.initStatus = status }
                self.end(.initExited(status: status))
            } else if r < 0 && errno == ECHILD {
                // Adopted from a daemon that died: init is not our child, so its status is its new parent's.
                self.state.withLock { $0.initStatus = 0 }
                self.end(.initExited(status: 0))
            }
            self.pidfdWatch.source?.cancel()
            self.pidfdWatch.source = nil
        }
        source.setCancelHandler { close(pidfd) }
        connection.queue.sync { pidfdWatch.source = source }
        source.resume()
    }

    /// Starts teardown for `reason` unless it has begun already. Never blocks.
    @discardableResult
    public func end(_ reason: SandboxEndReason) -> Task<TeardownReport, Never> {
        state.withLock { s in
            if let t = s.teardown { return t }
            s.ended = reason
            let t = Task.detached { await BlockingWork.run { self.performTeardown(reason) } }
            s.teardown = t
            return t
        }
    }

    /// Ends the sandbox (if it has not ended) and waits until nothing of it remains on the host.
    public func teardown() async -> TeardownReport {
        await end(.stopped).value
    }

    private func performTeardown(_ reason: SandboxEndReason) -> TeardownReport {
        let start = DispatchTime.now().uptimeNanoseconds
        var report = TeardownReport(reason: reason, finalUsage: cgroup.usage())
        // Killed first, so nothing inside can write while the wipe runs; the pinned mounts outlive every
        // process of the sandbox, and the wipe reaches them through nothing a pid could redirect.
        do { try cgroup.killAll() } catch { report.leftovers.append("\(error)") }
        let wiped = TmpfsWiper.wipe(mounts.take())
        report.wipedFiles = wiped.files
        report.wipedBytes = wiped.bytes
        if wiped.stoppedAtBudget { report.leftovers.append("wipe stopped at its budget (what the tmpfs said it used)") }
        connection.shutdown()
        reapInit()
        do { try cgroup.remove() } catch { report.leftovers.append("\(error)") }
        allocator.release(uidRange)
        cpuPlacer.release(cpus)
        do { try Files.removeTree(stateDirectory) } catch { report.leftovers.append("state: \(error)") }
        if cgroup.exists { report.leftovers.append("cgroup \(cgroup.path)") }
        if Files.exists(stateDirectory) { report.leftovers.append("state directory \(stateDirectory)") }
        if Self.isAlive(initPID) && state.withLock({ $0.initStatus == nil }) { report.leftovers.append("init pid \(initPID)") }
        let waiters = state.withLock { s -> [Int32: CheckedContinuation<CommandExit, Never>] in
            let w = s.commandWaiters
            s.commandWaiters.removeAll()
            return w
        }
        connection.queue.sync {
            pidfdWatch.source?.cancel()
            pidfdWatch.source = nil
        }
        for (pid, w) in waiters { w.resume(returning: CommandExit(pid: pid, exitCode: nil, signal: SIGKILL, timedOut: false)) }
        report.nanoseconds = DispatchTime.now().uptimeNanoseconds - start
        eventSink.yield(.ended(reason))
        eventSink.finish()
        return report
    }

    /// Running, not a zombie: an adopted init that died stays a zombie until its new parent reaps it.
    static func isAlive(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 else { return false }
        guard let stat = try? Files.read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return true }
        return stat[stat.index(after: close)...].dropFirst().first != "Z"
    }

    private func reapInit() {
        if state.withLock({ $0.initStatus != nil }) { return }
        var status: Int32 = 0
        for _ in 0..<20000 {
            let r = waitpid(initPID, &status, WNOHANG)
            if r == initPID { state.withLock { $0.initStatus = status }; return }
            if r < 0 {
                // ECHILD: the pidfd watcher reaped it, or init is not our child (adopted): wait until it is dead.
                var spins = 0
                while Self.isAlive(initPID) && spins < 8000 { usleep(250); spins += 1 }
                return
            }
            usleep(250)
        }
    }
}
