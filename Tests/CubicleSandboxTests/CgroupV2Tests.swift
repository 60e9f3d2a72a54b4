import CubicleLinux
import Foundation
import Testing
@testable import CubicleSandbox

/// cgroup v2 paths against a fake hierarchy in a temp dir: this machine runs v1, most hosts run v2.
struct CgroupV2Tests {
    static func fakeRoot() throws -> String {
        let root = NSTemporaryDirectory() + "cubicle-fake-cgroup-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: root + "/cgroup.controllers", contents: Data("cpu memory pids".utf8))
        FileManager.default.createFile(atPath: root + "/cgroup.subtree_control", contents: Data())
        return root
    }

    static func touch(_ dir: String, _ files: [String: String]) {
        for (name, contents) in files { FileManager.default.createFile(atPath: dir + "/" + name, contents: Data(contents.utf8)) }
    }

    @Test func detectsV2AndAppliesLimits() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        #expect(Cgroup.detectVersion(root: root) == .v2)
        let cg = Cgroup(version: .v2, root: root, path: "cubicle/sb-test")
        // Parents delegate before the child is made; the fake parent's control file exists once mkdir ran.
        try FileManager.default.createDirectory(atPath: root + "/cubicle", withIntermediateDirectories: true)
        // The root offers no cpuset here; "cubicle" does, so sessions under it are confined to their CPUs.
        Self.touch(root + "/cubicle", ["cgroup.subtree_control": "", "cgroup.controllers": "cpu memory pids cpuset"])
        try cg.create()
        #expect(try Files.read(root + "/cgroup.subtree_control") == "+memory +pids +cpu")
        #expect(try Files.read(root + "/cubicle/cgroup.subtree_control") == "+memory +pids +cpu +cpuset")
        let dir = root + "/cubicle/sb-test"
        Self.touch(dir, ["memory.max": "max", "memory.swap.max": "max", "cpu.max": "max 100000", "pids.max": "max", "cpuset.cpus": ""])
        var limits = CgroupLimits(memoryBytes: 64 << 20, cpuQuotaMicros: 50_000, pids: 99)
        limits.cpuSet = [3, 1]
        try cg.apply(limits)
        #expect(try Files.read(dir + "/cpuset.cpus") == "1,3")
        #expect(cg.cpuSet() == [1, 3])
        #expect(try Files.read(dir + "/memory.max") == "67108864")
        #expect(try Files.read(dir + "/memory.swap.max") == "0")
        #expect(try Files.read(dir + "/cpu.max") == "50000 100000")
        #expect(try Files.read(dir + "/pids.max") == "99")
    }

    /// v1 with cpu and cpuacct mounted as one hierarchy under two names (a symlink, as most distributions
    /// do): each real directory is listed once, whether or not the cgroup's own directories exist yet.
    @Test func v1CountsAHierarchyWithTwoNamesOnce() throws {
        let root = NSTemporaryDirectory() + "cubicle-fake-v1-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        for c in ["memory", "pids", "cpu,cpuacct", "freezer", "cpuset"] {
            try FileManager.default.createDirectory(atPath: root + "/" + c, withIntermediateDirectories: true)
        }
        try FileManager.default.createSymbolicLink(atPath: root + "/cpu", withDestinationPath: "cpu,cpuacct")
        try FileManager.default.createSymbolicLink(atPath: root + "/cpuacct", withDestinationPath: "cpu,cpuacct")
        let cg = Cgroup(version: .v1, root: root, path: "cubicle/sb-v1")
        let expected = ["memory", "pids", "cpu", "freezer", "cpuset"].map { "\(root)/\($0)/cubicle/sb-v1" }
        #expect(cg.directories == expected, "before its directories exist")
        for d in expected { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        #expect(cg.directories == expected, "once they do")
        try cg.remove()
        #expect(!cg.exists)
    }

    @Test func marksAParentIdleForTheCPUSchedulerWhereTheKernelCan() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/cubicle", withIntermediateDirectories: true)
        let parent = Cgroup(version: .v2, root: root, path: "cubicle")
        #expect(try parent.setCPUIdle(true) == false, "no cpu.idle (a kernel before 5.15): nothing written")
        Self.touch(root + "/cubicle", ["cpu.idle": "0"])
        #expect(try parent.setCPUIdle(true))
        #expect(try Files.read(root + "/cubicle/cpu.idle") == "1")
        try parent.setCPUIdle(false)
        #expect(try Files.read(root + "/cubicle/cpu.idle") == "0")
    }

    @Test func readsThrottledPeriodsFromCPUStat() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        let cg = Cgroup(version: .v2, root: root, path: "cubicle/sb-t")
        try FileManager.default.createDirectory(atPath: root + "/cubicle/sb-t", withIntermediateDirectories: true)
        #expect(cg.cpuThrottledPeriods() == 0, "no cpu.stat: nothing throttled")
        Self.touch(root + "/cubicle/sb-t", ["cpu.stat": "usage_usec 5000\nuser_usec 4000\nsystem_usec 1000\nnr_periods 40\nnr_throttled 17\nthrottled_usec 90000\n"])
        #expect(cg.cpuThrottledPeriods() == 17)
    }

    @Test func readsUsageAndKillsWithCgroupKill() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        let dir = root + "/cubicle/sb-u"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        Self.touch(dir, ["memory.current": "4096\n", "memory.peak": "8192\n", "cpu.stat": "usage_usec 1500\nuser_usec 1000\n",
                         "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n", "pids.current": "5\n",
                         "pids.events": "max 7\n", "cgroup.kill": "", "cgroup.procs": ""])
        let cg = Cgroup(version: .v2, root: root, path: "cubicle/sb-u")
        let u = cg.usage()
        #expect(u == CgroupUsage(memoryBytes: 4096, memoryPeakBytes: 8192, cpuNanoseconds: 1_500_000, pids: 5, oomKills: 2, pidsLimitHits: 7))
        try cg.killAll(timeoutMilliseconds: 100)
        #expect(try Files.read(dir + "/cgroup.kill") == "1")
    }

    @Test func killWaitsForAnEmptyCgroupAndReportsStragglers() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        let dir = root + "/cubicle/sb-k"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        // A pid that never leaves: the fake kernel ignores cgroup.kill.
        Self.touch(dir, ["cgroup.kill": "", "cgroup.procs": "999999\n"])
        let cg = Cgroup(version: .v2, root: root, path: "cubicle/sb-k")
        #expect(throws: CgroupError.self) { try cg.killAll(timeoutMilliseconds: 20) }
    }

    @Test func delegatedSubtreeMovesTheDaemonIntoALeafAndPutsSessionsBesideIt() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        let own = root + "/system.slice/cubicled.service"
        try FileManager.default.createDirectory(atPath: own + "/daemon", withIntermediateDirectories: true)
        // systemd enabled the controllers down to the delegated service; cubicled must not need to touch them.
        Self.touch(root, ["cgroup.subtree_control": "cpu memory pids"])
        Self.touch(root + "/system.slice", ["cgroup.subtree_control": "cpu memory pids"])
        Self.touch(own, ["cgroup.subtree_control": ""])
        Self.touch(own + "/daemon", ["cgroup.procs": ""])
        let parent = try Cgroup.adoptDelegatedSubtree(root: root, membership: "0::/system.slice/cubicled.service\n", pid: 4242)
        #expect(parent == "system.slice/cubicled.service/sessions")
        #expect(try Files.read(own + "/daemon/cgroup.procs") == "4242")
        // A restarted daemon already in the leaf keeps the same layout instead of nesting deeper.
        #expect(try Cgroup.adoptDelegatedSubtree(root: root, membership: "0::/system.slice/cubicled.service/daemon\n", pid: 4243) == parent)
        #expect(try Files.read(own + "/daemon/cgroup.procs") == "4243")
        // Sessions under it: the service's cgroup (now without processes) delegates controllers to `sessions`.
        try FileManager.default.createDirectory(atPath: own + "/sessions", withIntermediateDirectories: true)
        Self.touch(own + "/sessions", ["cgroup.subtree_control": ""])
        try Cgroup(version: .v2, root: root, path: parent + "/sb-1").create()
        #expect(try Files.read(own + "/cgroup.subtree_control") == "+memory +pids +cpu")
        #expect(try Files.read(root + "/system.slice/cgroup.subtree_control") == "cpu memory pids")
        #expect(Files.isDirectory(own + "/sessions/sb-1"))
    }

    @Test func delegatedSubtreeUnderAPrivateCgroupNamespaceIsTheNamespaceRoot() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/daemon", withIntermediateDirectories: true)
        Self.touch(root + "/daemon", ["cgroup.procs": ""])
        #expect(try Cgroup.adoptDelegatedSubtree(root: root, membership: "0::/\n", pid: 7) == "sessions")
        #expect(try Files.read(root + "/daemon/cgroup.procs") == "7")
    }

    @Test func delegatedSubtreeIsRefusedOnV1AndWithoutAV2Entry() throws {
        let root = try Self.fakeRoot()
        defer { try? FileManager.default.removeItem(atPath: root) }
        #expect(throws: CgroupError.self) { try Cgroup.adoptDelegatedSubtree(root: root, membership: "1:name=systemd:/x\n") }
        try FileManager.default.removeItem(atPath: root + "/cgroup.controllers")
        #expect(throws: CgroupError.self) { try Cgroup.adoptDelegatedSubtree(root: root, membership: "0::/system.slice/c.service\n") }
    }

    @Test func cpuPlacerSpreadsSessionsOverTheLeastUsedCPUs() {
        let placer = CPUPlacer(online: [0, 1, 2, 3])
        #expect(placer.take(4) == nil, "a session with every CPU's worth of quota is not confined")
        let a = placer.take(1)!, b = placer.take(2)!, c = placer.take(1)!
        #expect(a == [0] && b == [1, 2] && c == [3])
        #expect(placer.take(1) == [0], "all used once: the lowest again")
        placer.release(b)
        #expect(placer.take(2) == [1, 2])
        placer.claim([3])
        #expect(placer.take(1) == [1], "loads now 2, 1, 1, 2")
        #expect(CPUPlacer.parseList("0-2,5") == [0, 1, 2, 5] && CPUPlacer.parseList("x") == nil && CPUPlacer.parseList("3-1") == nil)
    }
}
