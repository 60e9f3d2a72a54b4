#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC
import Dispatch
import Synchronization

/// Makes sandboxes. Safe to call from many tasks at once: each launch owns its own ids, cgroup and fds.
public struct SandboxLauncher: Sendable {
    public let host: SandboxHostConfig
    public let cpuPlacer: CPUPlacer
    /// Whether the sessions' parent cgroup has had its CPU class set, which happens with the first session.
    private let parentPrepared = Flag()
    /// nil when the host config asks for none or the pool could not start (launches then make their own).
    public let networkNamespaces: NetworkNamespacePool?
    /// nil when the host config turns it off: every init is then exec'd by the launch that needs it.
    public let forkServer: InitForkServer?
    /// Spare cgroups (v1 only); nil: each launch makes its own.
    public let cgroupPool: CgroupPool?

    public init(host: SandboxHostConfig, cpuPlacer: CPUPlacer = CPUPlacer()) {
        self.host = host
        self.cpuPlacer = cpuPlacer
        networkNamespaces = host.networkNamespacePool > 0 ? try? NetworkNamespacePool(size: host.networkNamespacePool) : nil
        forkServer = host.initForkServer ? InitForkServer(initPath: host.initPath, timeoutMilliseconds: host.readyTimeoutMilliseconds) : nil
        cgroupPool = host.cgroupVersion == .v1 && host.cgroupPool > 0
            ? CgroupPool(root: host.cgroupRoot, parent: host.cgroupParent, size: host.cgroupPool) : nil
        lowersInitOOMScore = Capabilities.effective(Capabilities.sysResource)
    }

    /// Ends what the launcher keeps ready (network namespaces, spare cgroups, the fork server); sandboxes
    /// it made are not touched. For shutdown: the launcher makes nothing afterwards.
    public func shutdown() {
        networkNamespaces?.close()
        cgroupPool?.close()
        forkServer?.stop()
    }

    static let cloneNewUser: Int32 = 0x1000_0000, cloneNewPID: Int32 = 0x2000_0000, cloneNewNS: Int32 = 0x0002_0000
    static let cloneNewNet: Int32 = 0x4000_0000, cloneNewIPC: Int32 = 0x0800_0000, cloneNewUTS: Int32 = 0x0400_0000

    /// Undo list for a launch that fails part way, so a failure leaves nothing behind.
    final class Rollback: @unchecked Sendable {
        var steps: [() -> Void] = []
        func add(_ step: @escaping () -> Void) { steps.append(step) }
        func run() { for s in steps.reversed() { s() }; steps.removeAll() }
        func disarm() { steps.removeAll() }
    }

    /// No backtracer: init's stdio is /dev/null, and looking for swift-backtrace costs its start-up.
    static let initEnvironment = ["PATH=/usr/local/bin:/usr/bin:/bin", "SWIFT_BACKTRACE=enable=no"]
    /// init's argv (and the fork server's, whose clones show its command line): no host path, which a
    /// sandbox reads in /proc/1/cmdline.
    static let initArguments = ["cubicle-init"]


    /// Every host source init binds, and what each becomes inside. The child opens them (see the shim).
    func sources(_ spec: SandboxSpec) throws(SandboxError) -> (mounts: [InitConfig.Mount], paths: [String]) {
        var mounts: [InitConfig.Mount] = []
        var paths: [String] = []
        func add(_ source: String, target: String) {
            mounts.append(.init(target: target, kind: .bindReadOnly(sourceIndex: paths.count, directory: Files.isDirectory(source))))
            paths.append(source)
        }
        for path in SandboxSpec.systemPaths where spec.imageLayers == nil {
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            if (st.st_mode & S_IFMT) == S_IFLNK {
                var buf = [CChar](repeating: 0, count: 4096)
                let n = readlink(path, &buf, buf.count - 1)
                guard n > 0 else { continue }
                mounts.append(.init(target: path, kind: .symlink(destination: String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self))))
            } else {
                add(path, target: path)
            }
        }
        // A session with a DNS of its own gets a resolv.conf naming it, written by init, not the host's.
        for path in SandboxSpec.etcPaths where Files.exists(path) && !(spec.nameserver != nil && path == "/etc/resolv.conf")
            && (spec.imageLayers == nil || path == "/etc/resolv.conf" || path == "/etc/hosts") {
            add(path, target: path)
        }
        if let code = spec.codeDirectory {
            guard Files.isDirectory(code) else { throw .missingCodeDirectory(code) }
            add(code, target: InitConfig.codePath)
        }
        for m in spec.readOnlyMounts {
            guard Files.exists(m.source) else { throw .missingBindSource(m.source) }
            add(m.source, target: m.target)
        }
        guard paths.count <= 48 else { throw .system(SystemError("too many read-only mounts", errno: E2BIG)) }
        return (mounts, paths)
    }

    public func launch(_ spec: SandboxSpec) async throws(SandboxError) -> Sandbox {
        let start = DispatchTime.now().uptimeNanoseconds
        guard access(host.initPath, X_OK) == 0 else { throw .missingInit(host.initPath) }
        let id = StateDirectory.newSandboxID()
        let rollback = Rollback()
        // What this launch takes from the pools is made up after it, not beside it (see `CgroupPool.refill`).
        defer {
            cgroupPool?.refill()
            networkNamespaces?.refill()
        }
        do {
            return try await launch(spec, id: id, start: start, rollback: rollback)
        } catch {
            await BlockingWork.run { rollback.run() }
            throw error
        }
    }

    /// With the parent of every session cgroup idle for the CPU scheduler, a session spinning on a CPU
    /// delays cubicled, its clients and the rest of the host by a context switch instead of a scheduler
    /// tick. `never` sets it back to normal weight, in case an earlier daemon left it idle; under
    /// `whileThrottled` it is the daemon's throttle watch that sets it, from its first look on.
    private func prepareParent() throws(CgroupError) {
        guard !parentPrepared.isSet else { return }
        switch host.sessionsYieldCPUToHost {
        case .always: try sessionsParent.setCPUIdle(true)
        case .never: try sessionsParent.setCPUIdle(false)
        case .whileThrottled: break
        }
        parentPrepared.set()
    }

    private var sessionsParent: Cgroup { Cgroup(version: host.cgroupVersion, root: host.cgroupRoot, path: host.cgroupParent) }

    /// For `SessionsCPUYield.whileThrottled`: puts sessions below (or back beside) the host's processes.
    public func setSessionsBelowHost(_ below: Bool) throws(CgroupError) {
        try sessionsParent.setCPUIdle(below)
    }

    /// Whether cubicled holds CAP_SYS_RESOURCE, without which lowering init's oom_score_adj fails (EACCES):
    /// learnt once, so a host that withholds it pays no failing write per launch.
    let lowersInitOOMScore: Bool

    /// init's oom_score_adj where cubicled may lower it: below every process the session starts, so within
    /// the session's memory limit the agent is chosen first, but not -1000, which would leave a session
    /// whose agent lowered itself as far with no process the OOM killer may take.
    static let initOOMScoreAdjustment = -999

    /// The blocking half of a launch: host paths, uid range, state directory, cgroup, and init cloned and
    /// exec'd with its configuration queued. Everything it makes is on `rollback`.
    private func startInit(_ spec: SandboxSpec, id: String, start: UInt64, rollback: Rollback) throws(SandboxError) -> Started {
        let phases = SpawnPhases(start: start)
        let sources = try sources(spec)
        phases.mark("host paths")

        let allocator = host.uidAllocator
        let range = try allocator.allocate(owner: id)
        rollback.add { allocator.release(range) }
        phases.mark("uid range")

        let directory = host.state.sandbox(id)
        let stateDirectory = directory.path
        do {
            try Files.makeDirectories(host.state.sandboxes, mode: 0o700)
            try sys("mkdir \(stateDirectory)") { mkdir(stateDirectory, 0o700) }
        } catch {
            throw .system(error)
        }
        rollback.add { try? Files.removeTree(stateDirectory) }
        phases.mark("state directory")

        let cgroup = host.cgroup(forSandbox: id)
        let (limits, taskFiles) = try placeInCgroup(cgroup, spec, rollback: rollback)
        defer { taskFiles.forEach { _ = close($0) } }
        phases.mark("cgroup")
        let (hostSock, childSock): (Int32, Int32)
        do { (hostSock, childSock) = try Descriptors.socketPair() } catch { throw .system(error) }
        let hostSockOwned = HostSocketOwnership()
        rollback.add { if hostSockOwned.owned { close(hostSock) } }
        defer { close(childSock) }
        // Where a restarted daemon reaches this init again; init holds the only listening descriptor.
        let reconnectSock: Int32
        do { reconnectSock = try Descriptors.listenUnix(directory: stateDirectory, name: SandboxDirectory.controlSocketName) } catch { throw .system(error) }
        defer { close(reconnectSock) }

        // Clone; the child waits while its id maps are written (and, on v2, it is put in its cgroup).
        let pooledNetwork = spec.networkNamespaceFD ?? networkNamespaces?.take() ?? -1
        defer { if pooledNetwork >= 0 && spec.networkNamespaceFD == nil { close(pooledNetwork) } }
        let child = InitChild(namespaces: Self.cloneNewUser | Self.cloneNewPID | Self.cloneNewNS | Self.cloneNewIPC | Self.cloneNewUTS
                                  | (pooledNetwork >= 0 ? 0 : Self.cloneNewNet),
                              idMap: "0 \(range.hostBase) \(range.size)\n", sources: sources.paths, placed: [childSock, reconnectSock],
                              network: pooledNetwork, taskFiles: taskFiles, usernsOwner: range.hostBase)
        // The fork server hands it to the clone already parsed; an exec'd init reads it from its socket.
        let configuration = spec.initConfig(mounts: sources.mounts, reconnectSeconds: host.reconnectSeconds).json
        // An image's init takes its layers after the clone (they are idmapped through the sandbox's user
        // namespace, which exists only then): `sendImageLayers` below, for both ways of starting it.
        let forked = try forkServer.flatMap { server throws(SandboxError) in try fork(child, via: server, cgroup: cgroup, configuration: configuration) }
        let pid: pid_t
        if let forked {
            pid = forked
        } else {
            // Queued before the clone, so init finds its configuration waiting when it first reads.
            do {
                try BlockingChannel(fd: hostSock).send(.notification(method: RPCMethod.configure, params: configuration, fds: 0))
            } catch {
                throw .system(error)
            }
            pid = try exec(child, preparation: ChildPreparation(idMap: child.idMap, cgroup: taskFiles.isEmpty ? cgroup : nil))
        }
        rollback.add {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
        }
        if let layers = spec.imageLayers { try sendImageLayers(layers, to: pid, over: hostSock) }
        // The OOM killer's last choice: a dead init ends the session, and the agent is what uses the memory.
        // Every process init starts raises itself to 500 (the shim); lowering init's own score as well
        // takes CAP_SYS_RESOURCE, which the host may have withheld from us: then init keeps cubicled's
        // score, still below its children's. init has started no child yet.
        if lowersInitOOMScore { _ = try? Files.write("/proc/\(pid)/oom_score_adj", String(Self.initOOMScoreAdjustment)) }
        phases.mark(forked == nil ? SpawnPhases.execStep : SpawnPhases.forkStep)
        // The spawn figures are filled in once init is ready.
        return Started(facts: Sandbox.Facts(id: id, initPID: pid, cgroup: cgroup, uidRange: range, stateDirectory: stateDirectory,
                                            cpus: limits.cpuSet ?? [], spawnNanoseconds: 0, spawnPhases: []),
                       hostSock: hostSock, hostSockOwned: hostSockOwned, phases: phases)
    }

    /// Each layer as a detached, read-only mount idmapped through the new sandbox's user namespace (its id
    /// map is written by now), top layer first, to init as the second frame.
    private func sendImageLayers(_ layers: [String], to pid: pid_t, over socket: Int32) throws(SandboxError) {
        let userns = open("/proc/\(pid)/ns/user", O_RDONLY | O_CLOEXEC)
        guard userns >= 0 else { throw .system(SystemError.lastError("open the sandbox's user namespace")) }
        defer { close(userns) }
        var fds: [Int32] = []
        defer { fds.forEach { _ = close($0) } }
        for layer in layers.reversed() {
            let fd = cubicle_idmapped_tree(layer, userns)
            guard fd >= 0 else { throw .system(SystemError.lastError("idmapped mount of \(layer)")) }
            fds.append(fd)
        }
        do {
            try BlockingChannel(fd: socket).send(.notification(method: RPCMethod.imageLayers, params: .object([:]), fds: fds.count), fds: fds)
        } catch {
            throw .system(error)
        }
    }

    /// The sandbox's cgroup made (or a spare taken) with the spec's limits and CPUs; on v1, the `tasks`
    /// files the child moves itself in through (see the shim). v2 has no such door: cgroup.procs moves a
    /// whole thread group under the global lock, so the fork server or the preparation writes it.
    private func placeInCgroup(_ cgroup: Cgroup, _ spec: SandboxSpec, rollback: Rollback) throws(SandboxError) -> (CgroupLimits, [Int32]) {
        var limits = spec.limits
        if let n = spec.cpuCount, let cpus = cpuPlacer.take(n) {
            limits.cpuSet = cpus
            rollback.add { [cpuPlacer] in cpuPlacer.release(cpus) }
        }
        var taskFiles: [Int32] = []
        do throws(CgroupError) {
            rollback.add { try? cgroup.killAll(); try? cgroup.remove() }
            if let spare = cgroupPool?.take(limits, as: cgroup) {
                taskFiles = spare
                if let cpus = limits.cpuSet {
                    var placement = CgroupLimits()
                    placement.cpuSet = cpus
                    try cgroup.apply(placement)
                }
            } else {
                try cgroup.create()
                try cgroup.apply(limits)
                taskFiles = try cgroup.openTaskFiles()
            }
            try prepareParent()
        } catch {
            taskFiles.forEach { _ = close($0) }
            throw .cgroup(error)
        }
        return (limits, taskFiles)
    }

    /// init cloned by the fork server from its runtime's template; nil when there is no server to ask.
    private func fork(_ child: InitChild, via server: InitForkServer, cgroup: Cgroup, configuration: JSON) throws(SandboxError) -> pid_t? {
        var procs: Int32 = -1
        if cgroup.version == .v2 {
            procs = open(cgroup.directories[0] + "/cgroup.procs", O_WRONLY | O_CLOEXEC)
            guard procs >= 0 else { throw .cgroup(CgroupError(cgroup: cgroup.path, reason: .system(.lastError("open cgroup.procs")))) }
        }
        defer { if procs >= 0 { close(procs) } }
        let request = ForkRequest(namespaces: child.namespaces, unshareCgroup: true, idMap: child.idMap, sources: child.sources,
                                  hasNetworkNamespace: child.network >= 0, cgroupTaskFiles: child.taskFiles.count, hasCgroupProcs: procs >= 0,
                                  usernsOwner: child.usernsOwner)
        // In the order the server places them: init's sockets, the network namespace, tasks files, cgroup.procs.
        let fds = child.placed + (child.network >= 0 ? [child.network] : []) + child.taskFiles + (procs >= 0 ? [procs] : [])
        return try server.fork(request, configuration: configuration.serialized(), fds: fds)
    }

    /// init cloned from this (threaded) process and exec'd, when there is no fork server.
    private func exec(_ child: InitChild, preparation: ChildPreparation) throws(SandboxError) -> pid_t {
        var failure = cubicle_spawn_error()
        let pid: pid_t = withCStrings(Self.initArguments) { argv in
            withCStrings(Self.initEnvironment) { envp in
                withCStrings(child.sources) { paths in
                    child.placed.withUnsafeBufferPointer { fds in child.taskFiles.withUnsafeBufferPointer { taskFDs in
                        host.initPath.withCString { path in
                            var spawn = cubicle_sandbox_spawn(path: path, argv: argv, envp: envp, namespaces: child.namespaces,
                                                              unshare_cgroup: 1, fds: fds.baseAddress, nfds: Int32(fds.count),
                                                              sources: UnsafeRawPointer(paths).assumingMemoryBound(to: UnsafePointer<CChar>?.self),
                                                              nsources: Int32(child.sources.count), netns_fd: child.network,
                                                              host_netns_fd: networkNamespaces?.hostNetworkFD ?? -1,
                                                              cgroup_task_fds: taskFDs.baseAddress, ncgroup_task_fds: Int32(taskFDs.count),
                                                              userns_owner: child.usernsOwner)
                            return withExtendedLifetime(preparation) {
                                cubicle_sandbox_spawn_run(&spawn, ChildPreparation.run, Unmanaged.passUnretained(preparation).toOpaque(), &failure)
                            }
                        }
                    }}
                }
            }
        }
        guard pid > 0 else {
            if let error = preparation.error { throw error }
            throw .childFailed(step: failure.step, errno: failure.err, index: failure.index, sources: child.sources)
        }
        return pid
    }

    /// A new init as both ways of starting one need it: its namespaces, id map and bind sources, and the
    /// descriptors it is given. The fork server gets it as a `ForkRequest`, an exec as the shim's spawn.
    private struct InitChild {
        var namespaces: Int32
        /// uid_map and gid_map, written while the child waits.
        var idMap: String
        var sources: [String]
        /// init's control and reconnect sockets, its fds 3 and 4.
        var placed: [Int32]
        /// A pooled network namespace to join; -1 for a new one.
        var network: Int32
        /// cgroup v1 `tasks` files the child writes itself into.
        var taskFiles: [Int32]
        var usernsOwner: UInt32
    }

    /// What the blocking half of a launch leaves for the async half.
    private struct Started: @unchecked Sendable {
        var facts: Sandbox.Facts
        var hostSock: Int32
        var hostSockOwned: HostSocketOwnership
        var phases: SpawnPhases
    }

    private func launch(_ spec: SandboxSpec, id: String, start: UInt64, rollback: Rollback) async throws(SandboxError) -> Sandbox {
        // mkdir, cgroup writes, clone and the wait for exec block for a millisecond or more: they run on a
        // thread of their own, never on the executor that serves requests.
        let started = try await BlockingWork.run { () throws(SandboxError) -> Started in
            try self.startInit(spec, id: id, start: start, rollback: rollback)
        }
        var facts = started.facts
        let (pid, hostSock, phases) = (facts.initPID, started.hostSock, started.phases)
        let allocator = host.uidAllocator

        // Wait for init's ready or failed.
        let startup = StartupWaiter()
        let link = InitLink(fd: hostSock, label: id, startup: startup)
        let connection = link.connection
        started.hostSockOwned.owned = false
        rollback.add { connection.shutdown() }
        connection.start()
        let initMarks = try await startup.wait(timeoutMilliseconds: host.readyTimeoutMilliseconds, queue: connection.queue)

        phases.mark("ready")
        // init is our child and unreaped (nothing waits for it before watchInit), so its pid is its own here.
        let mounts = PinnedMounts.pin(initPID: pid)
        guard mounts.count > 0 else { throw .ended("no writable tmpfs of init's could be pinned for the wipe") }
        phases.mark("mounts pinned")
        facts.spawnNanoseconds = DispatchTime.now().uptimeNanoseconds - start
        facts.spawnPhases = phases.merged(initMarks: initMarks)
        let sandbox = link.attach(facts, mounts: mounts, allocator: allocator, cpuPlacer: cpuPlacer)
        rollback.disarm()
        // Facts a restarted daemon needs to find this sandbox again.
        SandboxFacts(id: id, initPID: pid, cgroup: facts.cgroup, uidRange: facts.uidRange).write(to: facts.stateDirectory)
        return sandbox
    }
}

extension SandboxLauncher {
    /// A sandbox a previous daemon launched, found again through its state directory: its facts, then its
    /// init over the reconnect socket. Returns it with the agent's pid inside (nil if the agent has exited).
    public func adopt(stateDirectory: String) async throws(SandboxError) -> (sandbox: Sandbox, agentPID: pid_t?) {
        guard let facts = SandboxFacts(readingFrom: stateDirectory, cgroupRoot: host.cgroupRoot) else {
            throw .ended("no readable, complete sandbox facts in \(stateDirectory)")
        }
        let (id, pid, cgroup) = (facts.id, facts.initPID, facts.cgroup)
        let fd: Int32
        do { fd = try Descriptors.connectUnix(directory: stateDirectory, name: SandboxDirectory.controlSocketName) } catch { throw .system(error) }
        let link = InitLink(fd: fd, label: id, startup: nil)
        link.connection.start()
        let adoptedCPUs = cgroup.cpuSet().flatMap { $0.count < cpuPlacer.online.count ? $0 : nil } ?? []
        cpuPlacer.claim(adoptedCPUs)
        // Not our child: checked to be in the sandbox's cgroup as well as unreaped while its mounts were opened.
        let mounts = PinnedMounts.pin(initPID: pid, cgroup: cgroup)
        let sandbox = link.attach(Sandbox.Facts(id: id, initPID: pid, cgroup: cgroup, uidRange: facts.uidRange, stateDirectory: stateDirectory,
                                                cpus: adoptedCPUs, spawnNanoseconds: 0, spawnPhases: []),
                                  mounts: mounts, allocator: host.uidAllocator, cpuPlacer: cpuPlacer)
        do {
            return (sandbox, try await sandbox.agentStatus())
        } catch {
            _ = await sandbox.teardown()
            throw error
        }
    }
}

extension SandboxLauncher {
    /// What a sandbox that cannot be adopted left on the host: every process in its cgroup killed (never by
    /// pid: a dead init's pid may belong to someone else by now), the cgroup, its uid lease if still its own,
    /// and its state directory. Returns what could not be removed.
    public func removeLeftovers(stateDirectory: String) async -> [String] {
        await BlockingWork.run { self.removeLeftoversNow(stateDirectory: stateDirectory) }
    }

    func removeLeftoversNow(stateDirectory: String) -> [String] {
        var left: [String] = []
        let facts = SandboxFacts(readingFrom: stateDirectory, cgroupRoot: host.cgroupRoot)
        // Killed before init was ready, so before the facts were written: the names follow from the id.
        if let id = facts?.id ?? SandboxDirectory(path: stateDirectory)?.id {
            let cgroup = facts?.cgroup ?? host.cgroup(forSandbox: id)
            if cgroup.exists {
                do { try cgroup.killAll(); try cgroup.remove() } catch { left.append("\(error)") }
            }
            let allocator = host.uidAllocator
            for slot in facts.map({ [$0.uidRange.slot] }) ?? allocator.allocated() {
                allocator.release(UIDRange(slot: slot, hostBase: 0, size: 0), ifOwnedBy: id)
            }
        }
        do { try Files.removeTree(stateDirectory) } catch { left.append("state: \(error)") }
        return left
    }
}

/// What a sandbox's state directory records about it (`sandbox.json`), so that a daemon that did not launch
/// it can reach it again, or clean up after it.
struct SandboxFacts {

    var id: String
    var initPID: pid_t
    var cgroup: Cgroup
    var uidRange: UIDRange

    init(id: String, initPID: pid_t, cgroup: Cgroup, uidRange: UIDRange) {
        (self.id, self.initPID, self.cgroup, self.uidRange) = (id, initPID, cgroup, uidRange)
    }

    /// nil when the file is missing, unreadable or incomplete.
    init?(readingFrom stateDirectory: String, cgroupRoot: String) {
        guard let directory = SandboxDirectory(path: stateDirectory), let facts = try? JSON.parse(try Files.read(directory.facts)),
              let id = facts["id"]?.stringValue, id == directory.id,
              let pid = facts["initPID"]?.intValue.flatMap({ pid_t(exactly: $0) }), pid > 1,
              let path = facts["cgroup"]?.stringValue, let version = facts["cgroupVersion"]?.stringValue.flatMap(Cgroup.Version.init(rawValue:)),
              let base = facts["uidBase"]?.intValue.flatMap({ UInt32(exactly: $0) }), let size = facts["uidSize"]?.intValue.flatMap({ UInt32(exactly: $0) }),
              let slot = facts["uidSlot"]?.intValue.flatMap({ Int(exactly: $0) }) else { return nil }
        self.init(id: id, initPID: pid, cgroup: Cgroup(version: version, root: cgroupRoot, path: path),
                  uidRange: UIDRange(slot: slot, hostBase: base, size: size))
    }

    /// Not fsynced: it has to outlive the daemon, not the machine, whose reboot ends the sandbox anyway.
    func write(to stateDirectory: String) {
        let json: JSON = ["id": .string(id), "initPID": .int(Int64(initPID)), "cgroup": .string(cgroup.path),
                          "cgroupVersion": .string(cgroup.version.rawValue), "uidBase": .int(Int64(uidRange.hostBase)),
                          "uidSize": .int(Int64(uidRange.size)), "uidSlot": .int(Int64(uidRange.slot))]
        guard let directory = SandboxDirectory(path: stateDirectory) else { return }
        try? Files.writeAtomically(directory.facts, json.text, durable: false)
    }
}

/// Whether a failed launch still has the host end of the control socket to close: once the connection
/// has it, the connection closes it.
final class HostSocketOwnership: @unchecked Sendable {
    var owned = true
}

/// Where spawn time goes, for the benchmark: host steps, then init's own steps from its ready (the same
/// monotonic clock), each as the time since the previous mark.
final class SpawnPhases: @unchecked Sendable {
    static let execStep = "clone, maps, exec"
    static let forkStep = "fork server clone, maps"
    private let start: UInt64
    private var marks: [(String, UInt64)] = []

    init(start: UInt64) { self.start = start }

    func mark(_ name: String) { marks.append((name, DispatchTime.now().uptimeNanoseconds)) }

    func merged(initMarks: [UInt64]) -> [SpawnPhase] {
        var all = marks
        if initMarks.count == 3, let exec = all.firstIndex(where: { $0.0 == Self.execStep || $0.0 == Self.forkStep }), all.count > exec + 1,
           initMarks[0] <= initMarks[1], initMarks[1] <= initMarks[2], initMarks[2] <= all[exec + 1].1 {
            // init may be running before the host hears that exec succeeded: the exec step ends when init starts.
            all[exec].1 = min(all[exec].1, initMarks[0])
            all.insert(contentsOf: zip(["init start", "init configured", "init filesystem"], initMarks).map { ($0, $1) }, at: exec + 1)
        }
        var previous = start
        return all.map { name, t in
            defer { previous = t }
            return SpawnPhase(name: name, nanoseconds: t &- previous)
        }
    }
}

public struct SpawnPhase: Sendable {
    public let name: String
    public let nanoseconds: UInt64
}

/// What the parent does while the cloned child waits: its uid/gid maps (one unprivileged host range), then
/// on v2 its cgroup (on v1 the child joins it itself, first thing after the wait), so it is limited before
/// it runs a single instruction of cubicle-init.
final class ChildPreparation {
    let idMap: String
    /// nil when the child joins its cgroup itself.
    let cgroup: Cgroup?
    var error: SandboxError?

    init(idMap: String, cgroup: Cgroup?) {
        self.idMap = idMap
        self.cgroup = cgroup
    }

    static let run: cubicle_sandbox_prepare = { context, pid in
        let me = Unmanaged<ChildPreparation>.fromOpaque(context!).takeUnretainedValue()
        do throws(SystemError) {
            try IDMaps.write(me.idMap, to: pid)
        } catch {
            me.error = .system(error)
            return -1
        }
        do throws(CgroupError) { try me.cgroup?.addProcess(pid) } catch {
            me.error = .cgroup(error)
            return -1
        }
        return 0
    }
}

/// The one way a sandbox is wired to its init's control channel, for a launch and an adoption alike.
/// Notifications go to start-up first while a launch waits for init's ready, then to the sandbox once it
/// exists; a channel that closes or breaks the protocol ends the sandbox (and fails a start-up).
final class InitLink: Sendable {
    let connection: InitConnection
    private let holder = SandboxHolder()

    init(fd: Int32, label: String, startup: StartupWaiter?) {
        let holder = self.holder
        connection = InitConnection(
            fd: fd, label: label,
            onNotification: { method, params in
                if let startup, startup.deliver(method, params) { return }
                holder.sandbox?.handleNotification(method, params)
            },
            onClose: { reason in
                startup?.fail(.ended(InitConnection.describe(reason)))
                switch reason {
                case .violation(let why): holder.sandbox?.end(.protocolViolation(why))
                case .eof: holder.sandbox?.end(.controlChannelClosed)
                case .closedByHost: break
                }
            })
    }

    /// The sandbox on this link, watched from now on (its init's exit ends it).
    func attach(_ facts: Sandbox.Facts, mounts: PinnedMounts, allocator: UIDRangeAllocator, cpuPlacer: CPUPlacer) -> Sandbox {
        let (events, sink) = AsyncStream<SandboxEvent>.makeStream(bufferingPolicy: .bufferingNewest(1024))
        let sandbox = Sandbox(facts, connection: connection, mounts: mounts, allocator: allocator, cpuPlacer: cpuPlacer, events: events, sink: sink)
        holder.sandbox = sandbox
        sandbox.watchInit()
        return sandbox
    }
}

/// Lets the connection's callbacks reach the sandbox, which exists only after init is ready.
final class SandboxHolder: Sendable {
    private struct Weak { weak var sandbox: Sandbox? }
    /// Weak: the sandbox owns its connection, whose callbacks hold this; a strong reference here would be a
    /// cycle that kept every ended sandbox (and its connection) in memory for the daemon's life.
    private let lock = Mutex(Weak())
    var sandbox: Sandbox? {
        get { lock.withLock { $0.sandbox } }
        set { lock.withLock { $0.sandbox = newValue } }
    }
}

/// Resolves once: init's `ready`, its `failed` with a step and errno, a closed channel, or a timeout.
final class StartupWaiter: Sendable {
    private let state = Mutex<(done: Bool, result: Result<[UInt64], SandboxError>?, waiter: CheckedContinuation<[UInt64], Error>?)>((false, nil, nil))

    /// True while start-up is being decided, so start-up notifications are not passed on.
    func deliver(_ method: String, _ params: JSON) -> Bool {
        switch try? InitNotification(method: method, params: params) {
        case .ready(let timings)?:
            // init's own CLOCK_MONOTONIC marks: main entered, configured, filesystem built.
            finish(.success(timings))
        case .failed(let step, let errno)?:
            finish(.failure(.initFailed(step: step, errno: errno)))
        default: return !state.withLock { $0.done }
        }
        return true
    }

    func fail(_ error: SandboxError) { finish(.failure(error)) }

    private func finish(_ result: Result<[UInt64], SandboxError>) {
        let waiter = state.withLock { s -> CheckedContinuation<[UInt64], Error>? in
            guard !s.done else { return nil }
            s.done = true
            s.result = result
            let w = s.waiter
            s.waiter = nil
            return w
        }
        waiter?.resume(with: result.mapError { $0 as Error })
    }

    /// Returns init's timings from its ready.
    func wait(timeoutMilliseconds: Int, queue: DispatchQueue) async throws(SandboxError) -> [UInt64] {
        queue.asyncAfter(deadline: .now() + .milliseconds(timeoutMilliseconds)) { [self] in
            finish(.failure(.initTimeout("ready after \(timeoutMilliseconds) ms")))
        }
        do {
            return try await withCheckedThrowingContinuation { (c: CheckedContinuation<[UInt64], Error>) in
                let done = state.withLock { s -> Result<[UInt64], SandboxError>? in
                    if let r = s.result { return r }
                    s.waiter = c
                    return nil
                }
                if let done { c.resume(with: done.mapError { $0 as Error }) }
            }
        } catch let e as SandboxError {
            throw e
        } catch {
            throw .ended("\(error)")
        }
    }
}


/// A flag shared by every copy of the launcher that holds it.
final class Flag: Sendable {
    private let value = Atomic(false)
    var isSet: Bool { value.load(ordering: .acquiring) }
    func set() { value.store(true, ordering: .releasing) }
}
