#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import Synchronization

/// Limits for one session's cgroup. nil leaves the kernel default (unlimited).
public struct CgroupLimits: Equatable, Sendable {
    public var memoryBytes: Int64?
    /// CPU time per period, in microseconds: 200_000 of 100_000 is two CPUs.
    public var cpuQuotaMicros: Int64?
    public var cpuPeriodMicros: Int64 = 100_000
    public var pids: Int64?
    /// The CPUs the session's processes may run on (cpuset), so it runs on at most as many at once as it
    /// has CPUs of quota, like a VM's vCPUs; nil: any.
    public var cpuSet: [Int]?

    public init(memoryBytes: Int64? = nil, cpuQuotaMicros: Int64? = nil, pids: Int64? = nil) {
        self.memoryBytes = memoryBytes
        self.cpuQuotaMicros = cpuQuotaMicros
        self.pids = pids
    }
}

public struct CgroupUsage: Equatable, Sendable {
    public var memoryBytes: Int64 = 0
    public var memoryPeakBytes: Int64?
    public var cpuNanoseconds: Int64 = 0
    public var pids: Int64 = 0
    public var oomKills: Int64 = 0
    /// Times the pids limit refused a fork (v1 and v2: pids.events "max").
    public var pidsLimitHits: Int64 = 0
}

public struct CgroupError: Error, CustomStringConvertible, Sendable {
    public enum Reason: Sendable {
        case unsupported(String)
        case system(SystemError)
        case notEmpty(remaining: Int)
    }
    public var cgroup: String
    public var reason: Reason

    public var description: String {
        switch reason {
        case .unsupported(let why): "cgroup \(cgroup): \(why)"
        case .system(let e): "cgroup \(cgroup): \(e)"
        case .notEmpty(let n): "cgroup \(cgroup): \(n) processes still inside after kill"
        }
    }
}

/// One session's cgroup, on either hierarchy. v1 spreads it over one directory per controller; v2 is a
/// single directory. `root` is normally /sys/fs/cgroup; tests point it at a fake tree.
public struct Cgroup: Sendable {
    public enum Version: String, Sendable { case v1, v2 }

    public let version: Version
    public let root: String
    /// Relative to the hierarchy root, e.g. "cubicle/sb-1a2b".
    public let path: String

    static let v1Controllers = ["memory", "pids", "cpu", "cpuacct", "freezer", "cpuset"]

    public init(version: Version, root: String = "/sys/fs/cgroup", path: String) {
        self.version = version
        self.root = root
        self.path = path
    }

    /// cgroup2 mounted at `root` (it has cgroup.controllers) means v2; a tmpfs of v1 hierarchies
    /// (hybrid, as on this CI machine) means v1.
    public static func detectVersion(root: String = "/sys/fs/cgroup") -> Version {
        Files.exists(root + "/cgroup.controllers") ? .v2 : .v1
    }

    /// Every directory this cgroup owns (one on v2, one per controller on v1).
    public var directories: [String] {
        switch version {
        case .v2: ["\(root)/\(path)"]
        case .v1: Self.v1Hierarchies(root: root).map { "\(root)/\($0)/\(path)" }
        }
    }

    /// The v1 controllers that name hierarchies of their own under `root`: cpu and cpuacct are often one
    /// hierarchy with two names, and each real directory must be counted once. The layout is the host's,
    /// so it is learnt once per root (by comparing the mount points, not a cgroup's directories, which
    /// may not exist yet or any more) instead of with a dozen stat calls every time a cgroup is used.
    static func v1Hierarchies(root: String) -> [String] {
        if let known = knownV1Hierarchies.withLock({ $0[root] }) { return known }
        let hierarchies = v1Controllers.reduce(into: [String]()) { kept, c in
            if !kept.contains(where: { sameFile("\(root)/\($0)", "\(root)/\(c)") }) { kept.append(c) }
        }
        // Learnt only once every controller is mounted; until then (create refuses) ask again next time.
        if v1Controllers.allSatisfy({ Files.isDirectory("\(root)/\($0)") }) {
            knownV1Hierarchies.withLock { $0[root] = hierarchies }
        }
        return hierarchies
    }

    private static let knownV1Hierarchies = Mutex<[String: [String]]>([:])

    private func dir(_ controller: String) -> String {
        version == .v2 ? "\(root)/\(path)" : "\(root)/\(controller)/\(path)"
    }

    static func sameFile(_ a: String, _ b: String) -> Bool {
        var sa = stat(), sb = stat()
        guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }

    private func fail(_ e: SystemError) -> CgroupError { CgroupError(cgroup: path, reason: .system(e)) }

    /// Makes the directories. On v2 the parents must delegate memory, pids and cpu to their children.
    public func create() throws(CgroupError) {
        do {
            switch version {
            case .v2:
                var parent = root
                let parts = path.split(separator: "/")
                for part in parts.dropLast() {
                    try enableV2Controllers(at: parent)
                    parent += "/\(part)"
                    if mkdir(parent, 0o755) != 0 && errno != EEXIST { throw SystemError.lastError("mkdir \(parent)") }
                }
                try enableV2Controllers(at: parent)
                try sys("mkdir \(root)/\(path)") { mkdir("\(root)/\(path)", 0o755) }
            case .v1:
                for c in Self.v1Controllers {
                    guard Files.isDirectory("\(root)/\(c)") else {
                        throw CgroupError(cgroup: path, reason: .unsupported("cgroup v1 controller \(c) is not mounted at \(root)/\(c)"))
                    }
                    try Files.makeDirectories(dir(c))
                }
                try inheritV1Cpuset()
            }
        } catch let e as SystemError {
            try? remove()
            throw fail(e)
        } catch let e as CgroupError {
            try? remove()
            throw e
        } catch {
            fatalError("unreachable: \(error)")
        }
    }

    /// For a daemon whose own v2 cgroup was delegated to it (systemd `Delegate=yes`): v2 lets a cgroup
    /// with processes have no children with controllers, so the daemon moves itself into `<own>/daemon`
    /// and session cgroups go under `<own>/sessions`, which this returns (relative to `root`).
    /// `membership` is the text of /proc/self/cgroup; on v2 its one line is `0::/PATH`.
    /// Only for a cgroup that is really delegated: under the host's root cgroup it would make top-level
    /// `daemon` and `sessions` cgroups.
    public static func adoptDelegatedSubtree(root: String = "/sys/fs/cgroup", membership: String, pid: pid_t = getpid()) throws(CgroupError) -> String {
        guard detectVersion(root: root) == .v2 else {
            throw CgroupError(cgroup: root, reason: .unsupported("a delegated subtree needs cgroup v2 (this host runs v1); use --cgroup-parent"))
        }
        guard let line = membership.split(separator: "\n").first(where: { $0.hasPrefix("0::") }) else {
            throw CgroupError(cgroup: root, reason: .unsupported("/proc/self/cgroup has no v2 entry"))
        }
        let own = line.dropFirst(3).split(separator: "/").map(String.init)
        guard !own.contains("..") else { throw CgroupError(cgroup: root, reason: .unsupported("/proc/self/cgroup: bad path")) }
        // "/" is the container's own cgroup under a private cgroup namespace (Kubernetes and Docker on v2).
        // Already in the leaf (a restart in the same cgroup) keeps the layout instead of nesting deeper.
        let base = (own.last == "daemon" ? own.dropLast() : own[...]).joined(separator: "/")
        let prefix = base.isEmpty ? "" : base + "/"
        let leaf = "\(root)/\(prefix)daemon"
        do throws(SystemError) {
            if mkdir(leaf, 0o755) != 0 && errno != EEXIST { throw SystemError.lastError("mkdir \(leaf)") }
            try Files.write("\(leaf)/cgroup.procs", "\(pid)", flags: O_WRONLY | O_CLOEXEC)
        } catch {
            throw CgroupError(cgroup: base, reason: .system(error))
        }
        return prefix + "sessions"
    }

    /// A new v1 cpuset directory starts with no CPUs and no memory nodes, and takes no tasks until it has
    /// both: each level gets its parent's.
    private func inheritV1Cpuset() throws(SystemError) {
        var parent = "\(root)/cpuset"
        for part in path.split(separator: "/") {
            let child = parent + "/" + part
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if ((try? Files.read(child + "/" + file)) ?? "").trimmingSpaces.isEmpty {
                    try Files.write(child + "/" + file, (try Files.read(parent + "/" + file)).trimmingSpaces)
                }
            }
            parent = child
        }
    }

    private func enableV2Controllers(at dir: String) throws(SystemError) {
        let have = (try? Files.read("\(dir)/cgroup.subtree_control")) ?? ""
        // cpuset only where the parent offers it: systemd delegates it only when the unit asks
        // (Delegate=cpu cpuset io memory pids); without it sessions are not confined to CPUs.
        let offered = ((try? Files.read("\(dir)/cgroup.controllers")) ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" })
        let wanted = (["memory", "pids", "cpu"] + (offered.contains("cpuset") ? ["cpuset"] : [])).filter { !have.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains(Substring($0)) }
        guard !wanted.isEmpty else { return }
        try Files.write("\(dir)/cgroup.subtree_control", wanted.map { "+" + $0 }.joined(separator: " "))
    }

    public func apply(_ limits: CgroupLimits) throws(CgroupError) {
        do {
            switch version {
            case .v2:
                if let m = limits.memoryBytes {
                    try Files.write(dir("memory") + "/memory.max", String(m))
                    // No swap for a session; absent when the kernel has no swap accounting.
                    try writeIfPresent(dir("memory") + "/memory.swap.max", "0")
                }
                if let q = limits.cpuQuotaMicros {
                    try Files.write(dir("cpu") + "/cpu.max", "\(q) \(limits.cpuPeriodMicros)")
                }
                if let p = limits.pids { try Files.write(dir("pids") + "/pids.max", String(p)) }
                if let cpus = limits.cpuSet { try writeIfPresent(dir("cpuset") + "/cpuset.cpus", Self.cpuList(cpus)) }
            case .v1:
                if let m = limits.memoryBytes {
                    try writeIfPresent(dir("memory") + "/memory.swappiness", "0")
                    try Files.write(dir("memory") + "/memory.limit_in_bytes", String(m))
                    try writeIfPresent(dir("memory") + "/memory.memsw.limit_in_bytes", String(m))
                    // v1 charges TCP socket buffers to a cgroup only once this is written (v2 always does):
                    // without it a session's loopback socket pairs buffer gigabytes outside its limit and
                    // push the host past its TCP memory pressure threshold. A counter of its own, so a
                    // session may hold up to its memory limit in socket buffers besides its memory.
                    try writeIfPresent(dir("memory") + "/memory.kmem.tcp.limit_in_bytes", String(m))
                }
                if let q = limits.cpuQuotaMicros {
                    try Files.write(dir("cpu") + "/cpu.cfs_period_us", String(limits.cpuPeriodMicros))
                    try Files.write(dir("cpu") + "/cpu.cfs_quota_us", String(q))
                }
                if let p = limits.pids { try Files.write(dir("pids") + "/pids.max", String(p)) }
                if let cpus = limits.cpuSet { try Files.write(dir("cpuset") + "/cpuset.cpus", Self.cpuList(cpus)) }
            }
        } catch {
            throw fail(error)
        }
    }

    private func writeIfPresent(_ file: String, _ value: String) throws(SystemError) {
        guard Files.exists(file) else { return }
        try Files.write(file, value)
    }

    /// Marks this cgroup idle for the CPU scheduler (`cpu.idle`, Linux 5.15+, v1 and v2): while anything
    /// outside it wants a CPU, the tasks below it give way at once and get the smallest weight; among
    /// themselves they share as before. Returns false where the kernel has no `cpu.idle`.
    @discardableResult
    public func setCPUIdle(_ idle: Bool) throws(CgroupError) -> Bool {
        let file = dir("cpu") + "/cpu.idle"
        guard Files.exists(file) else { return false }
        do { try Files.write(file, idle ? "1" : "0") } catch { throw fail(error) }
        return true
    }

    /// Periods in which the CPU quota held this cgroup back (`nr_throttled` of `cpu.stat`, v1 and v2);
    /// 0 where it cannot be read.
    public func cpuThrottledPeriods() -> Int64 { Self.keyed(dir("cpu") + "/cpu.stat", "nr_throttled") ?? 0 }

    /// The number after `key` in a file of "key value" lines (cpu.stat, memory.events, pids.events).
    private static func keyed(_ file: String, _ key: String) -> Int64? {
        guard let text = try? Files.read(file) else { return nil }
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, parts[0] == key { return Int64(parts[1]) }
        }
        return nil
    }

    /// v1: this cgroup's `tasks` files, open for writing (the caller's to close), through which a child
    /// moves itself in (see the shim); the kernel checks the opener's credentials. v2 has none: [].
    func openTaskFiles() throws(CgroupError) -> [Int32] {
        guard version == .v1 else { return [] }
        var files: [Int32] = []
        for directory in directories {
            let fd = open(directory + "/tasks", O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else {
                let error = fail(.lastError("open \(directory)/tasks"))
                files.forEach { _ = close($0) }
                throw error
            }
            files.append(fd)
        }
        return files
    }

    public func addProcess(_ pid: pid_t) throws(CgroupError) {
        do {
            for d in directories { try Files.write(d + "/cgroup.procs", String(pid)) }
        } catch {
            throw fail(error)
        }
    }

    public func processes() -> [pid_t] {
        let text = (try? Files.read(dir("pids") + "/cgroup.procs")) ?? ""
        return text.split(separator: "\n").compactMap { pid_t($0) }
    }

    public func usage() -> CgroupUsage {
        func number(_ file: String) -> Int64? {
            (try? Files.read(file)).flatMap { Int64($0.trimmingSpaces) }
        }
        let keyed = Self.keyed
        var u = CgroupUsage()
        switch version {
        case .v2:
            u.memoryBytes = number(dir("memory") + "/memory.current") ?? 0
            u.memoryPeakBytes = number(dir("memory") + "/memory.peak")
            u.cpuNanoseconds = (keyed(dir("cpu") + "/cpu.stat", "usage_usec") ?? 0) * 1000
            u.oomKills = keyed(dir("memory") + "/memory.events", "oom_kill") ?? 0
        case .v1:
            u.memoryBytes = number(dir("memory") + "/memory.usage_in_bytes") ?? 0
            u.memoryPeakBytes = number(dir("memory") + "/memory.max_usage_in_bytes")
            u.cpuNanoseconds = number(dir("cpuacct") + "/cpuacct.usage") ?? 0
            u.oomKills = keyed(dir("memory") + "/memory.oom_control", "oom_kill") ?? 0
        }
        u.pids = number(dir("pids") + "/pids.current") ?? 0
        u.pidsLimitHits = keyed(dir("pids") + "/pids.events", "max") ?? 0
        return u
    }

    /// Kills every process in the cgroup and waits until it is empty. Nothing can fork its way out:
    /// v2 kills the whole cgroup atomically; v1 freezes it first, so the set we SIGKILL is the full set.
    public func killAll(timeoutMilliseconds: Int = 5000) throws(CgroupError) {
        do {
            switch version {
            case .v2:
                if Files.exists(dir("") + "/cgroup.kill") {
                    try Files.write(dir("") + "/cgroup.kill", "1")
                } else {
                    try Files.write(dir("") + "/cgroup.freeze", "1")
                    for pid in processes() { kill(pid, SIGKILL) }
                    try Files.write(dir("") + "/cgroup.freeze", "0")
                }
            case .v1:
                // Lift the CPU quota so a throttled cgroup is not slow to die.
                try? Files.write(dir("cpu") + "/cpu.cfs_quota_us", "-1")
                let freezer = dir("freezer") + "/freezer.state"
                try Files.write(freezer, "FROZEN")
                var spins = 0
                while (try? Files.read(freezer))?.trimmingSpaces == "FREEZING" && spins < 2000 {
                    usleep(500)
                    spins += 1
                }
                for pid in processes() { kill(pid, SIGKILL) }
                try Files.write(freezer, "THAWED")
            }
        } catch {
            throw fail(error)
        }
        var waited = 0
        while true {
            let left = processes().count
            if left == 0 { return }
            if waited >= timeoutMilliseconds * 4 {
                throw CgroupError(cgroup: path, reason: .notEmpty(remaining: left))
            }
            usleep(250)
            waited += 1
        }
    }

    /// Removes the directories; the cgroup must be empty. Missing directories are fine.
    public func remove() throws(CgroupError) {
        for d in directories.reversed() {
            if rmdir(d) != 0 && errno != ENOENT { throw fail(SystemError.lastError("rmdir \(d)")) }
        }
    }

    public var exists: Bool { directories.contains { Files.isDirectory($0) } }

    static func cpuList(_ cpus: [Int]) -> String { cpus.sorted().map(String.init).joined(separator: ",") }

    /// The CPUs in this cgroup's cpuset (a restarted daemon learns an adopted sandbox's placement here).
    public func cpuSet() -> [Int]? {
        guard let text = try? Files.read(dir("cpuset") + "/cpuset.cpus") else { return nil }
        return CPUPlacer.parseList(text.trimmingSpaces)
    }
}


