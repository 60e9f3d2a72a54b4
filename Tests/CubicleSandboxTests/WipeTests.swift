#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import Foundation
import Testing
@testable import CubicleSandbox

/// Teardown's wipe reaches a sandbox's files through descriptors pinned while its init was alive, never
/// through a pid looked up later; it costs what the files hold; and init is not the OOM killer's choice.
@Suite(.enabled(if: isRoot, rootReason))
struct WipeTests {
    /// Opens a file of the sandbox from the host, as something that outlives the sandbox would hold it.
    static func hold(_ s: Sandbox, _ path: String) throws -> Int32 {
        let fd = open("/proc/\(s.initPID)/root\(path)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.lastError("open \(path) through init's root") }
        return fd
    }

    static func size(_ fd: Int32) -> Int64 {
        var st = stat()
        return fstat(fd, &st) == 0 ? Int64(st.st_size) : -1
    }

    /// An init killed from outside (as the OOM killer would) is reaped at once and its pid is free: the
    /// wipe must still reach every writable tmpfs, which the old pid-based wiper could not (it found no
    /// /proc/<pid>/mountinfo, or worse, someone else's).
    @Test func aDeadInitsFilesAreStillWiped() async throws {
        try await withHost { host in
            let s = try await host.launch()
            let secret = "secret-\(UInt64.random(in: 0...UInt64.max))"
            let paths = ["/tmp/kept", "/dev/shm/kept", "/home/agent/kept"]
            _ = try await s.sh(paths.map { "echo \(secret) > \($0)" }.joined(separator: "; "))
            let held = try paths.map { try Self.hold(s, $0) }
            defer { held.forEach { close($0) } }
            #expect(held.allSatisfy { Self.size($0) == Int64(secret.utf8.count + 1) })
            kill(s.initPID, SIGKILL)
            for await _ in s.events {}
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
            #expect(report.wipedFiles >= 3)
            for (path, fd) in zip(paths, held) {
                #expect(Self.size(fd) == 0, "\(path) kept its bytes after its init died")
            }
        }
    }

    /// How the mounts to wipe are opened in init's root: a symlink (a hostile init could replace a mount
    /// point with one to a host path) is refused, and `..` cannot climb out of the root.
    @Test func mountPointsAreResolvedInsideTheRootWithoutSymlinks() throws {
        let root = "/tmp/cubicle-openroot-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Files.makeDirectories(root + "/home/agent", mode: 0o755)
        defer { try? Files.removeTree(root) }
        #expect(symlink("/etc", root + "/tmp") == 0)
        let rootFD = open(root, Descriptors.openPathOnly | O_DIRECTORY | O_CLOEXEC)
        try #require(rootFD >= 0)
        defer { close(rootFD) }
        #expect(cubicle_open_in_root(rootFD, "/tmp", O_RDONLY | O_DIRECTORY) < 0 && errno == ELOOP, "a symlinked mount point is followed")
        let home = cubicle_open_in_root(rootFD, "/../../../home/agent", O_RDONLY | O_DIRECTORY)
        #expect(home >= 0, "errno \(errno)")
        var inside = stat(), expected = stat()
        #expect(fstat(home, &inside) == 0 && stat(root + "/home/agent", &expected) == 0 && inside.st_ino == expected.st_ino,
                "`..` stays at the root")
        close(home)
    }

    /// A 1 TiB sparse file holding one page costs one page: zeros go over allocated extents only, so the
    /// wipe allocates nothing outside the session's cgroup (the old wiper wrote from offset 0 until the
    /// tmpfs was full, from cubicled's own cgroup).
    @Test func sparseFilesCostWhatTheyHold() async throws {
        try await withHost { host in
            let s = try await host.launch { $0.tmpBytes = 32 << 20 }
            _ = try await s.sh("truncate -s 1T /tmp/sparse && printf secret | dd of=/tmp/sparse bs=4096 seek=$((1 << 27)) conv=notrunc 2>/dev/null")
            let fd = try Self.hold(s, "/tmp/sparse")
            defer { close(fd) }
            var st = stat()
            #expect(fstat(fd, &st) == 0 && Int64(st.st_size) == 1 << 40)
            let allocated = Int64(st.st_blocks) * 512
            #expect(allocated > 0 && allocated <= 4 << 20, "one page (a huge page at most) holds the data: \(allocated)")
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
            #expect(report.wipedBytes >= allocated && report.wipedBytes <= allocated + (1 << 20), "wiped \(report.wipedBytes) bytes for \(allocated) allocated")
            #expect(Self.size(fd) == 0)
        }
    }

    /// What teardown writes is bounded by what statfs says each tmpfs holds, so a tree the sandbox made
    /// cannot make the wipe run longer than its own tmpfs sizes allow.
    @Test func theWipeStaysWithinWhatTheTmpfsHolds() throws {
        let dir = "/tmp/cubicle-wipe-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Files.makeDirectories(dir, mode: 0o700)
        defer { _ = umount2(dir, Int32(MNT_DETACH)); rmdir(dir) }
        guard mount("tmpfs", dir, "tmpfs", 0, "size=8m") == 0 else { throw SystemError.lastError("mount tmpfs") }
        let data = [UInt8](repeating: 0x41, count: 3 << 20)
        try Files.writeAtomically(dir + "/a", data, durable: false)
        let sparse = open(dir + "/b", O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
        #expect(ftruncate(sparse, 1 << 40) == 0)
        #expect(pwrite(sparse, "x", 1, 1 << 30) == 1)
        close(sparse)
        let root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        let report = TmpfsWiper.wipe([root])
        #expect(report.files == 2)
        #expect(report.bytes >= (3 << 20) + 1 && report.bytes <= (3 << 20) + (4 << 20), "\(report.bytes)")
        #expect(!report.stoppedAtBudget)
        var budget: Int64 = 4096
        let again = open(dir + "/c", O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        defer { close(again) }
        _ = data.withUnsafeBytes { pwrite(again, $0.baseAddress, $0.count, 0) }
        #expect(TmpfsWiper.overwriteData(again, budget: &budget) == 4096 && budget == 0, "the budget stops the overwrite")
    }

    /// An adopted init is not our child: a pid from a state directory may belong to another process by
    /// now. Pinning checks it is in the sandbox's cgroup, so a host process that took the pid, with a
    /// writable tmpfs of its own, gives no mount to wipe.
    @Test func aPidThatIsNotTheSandboxsPinsNothing() async throws {
        try await withHost { host in
            let s = try await host.launch()
            let victim = Process()
            victim.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
            victim.arguments = ["-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /tmp && echo data > /tmp/mine && exec sleep 30"]
            try victim.run()
            defer { kill(victim.processIdentifier, SIGKILL); victim.waitUntilExit() }
            let pid = victim.processIdentifier
            for _ in 0..<200 where !(((try? Files.read("/proc/\(pid)/mountinfo")) ?? "").contains(" /tmp rw") && ((try? Files.read("/proc/\(pid)/comm")) ?? "") == "sleep\n") {
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(PinnedMounts.pin(initPID: pid).count >= 1, "the victim has a writable tmpfs: without the cgroup check it would be pinned")
            #expect(PinnedMounts.pin(initPID: pid, cgroup: s.cgroup).count == 0)
            #expect(PinnedMounts.pin(initPID: s.initPID, cgroup: s.cgroup).count >= 3)
        }
    }

    /// Filling /dev/shm (pages of the session's cgroup that no process's RSS shows) drives the session
    /// into its memory limit with nothing big to kill. The processes init starts score 500 and init at
    /// most cubicled's own score (-999 where cubicled holds CAP_SYS_RESOURCE), so the filler dies and
    /// init, and with it the session, lives.
    @Test func initIsNotTheOOMKillersChoice() async throws {
        try await withHost { host in
            let s = try await host.launch { $0.limits.memoryBytes = 64 << 20; $0.tmpBytes = 256 << 20 }
            let own = try Files.read("/proc/self/oom_score_adj").trimmingSpaces
            let hasSysResource = Capabilities.effective(Capabilities.sysResource)
            let initScore = try Files.read("/proc/\(s.initPID)/oom_score_adj").trimmingSpaces
            #expect(initScore == (hasSysResource ? String(SandboxLauncher.initOOMScoreAdjustment) : own), "CAP_SYS_RESOURCE: \(hasSysResource)")
            if !hasSysResource { print("initIsNotTheOOMKillersChoice: no CAP_SYS_RESOURCE here, init keeps this process's score \(own)") }
            #expect(try await s.run(["/bin/cat", "/proc/self/oom_score_adj"]).stdout == "500\n")
            let fill = try await s.run(["/bin/dd", "if=/dev/zero", "of=/dev/shm/fill", "bs=1M", "count=200"], timeoutSeconds: 60)
            #expect(fill.exit.signal == SIGKILL, "the filler should be the OOM killer's choice: \(fill.exit) \(fill.stderr)")
            #expect(s.cgroup.usage().oomKills >= 1)
            #expect(s.isRunning && kill(s.initPID, 0) == 0, "init was killed")
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
            #expect(report.wipedBytes >= 32 << 20, "the filled /dev/shm was wiped: \(report.wipedBytes)")
        }
    }
}
