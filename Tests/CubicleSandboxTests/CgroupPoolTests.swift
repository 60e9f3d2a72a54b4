#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
@testable import CubicleSandbox
import Foundation
import Testing

/// cgroup v1's spare cgroups: a launch takes one made for its limits, renamed to its own name; spares are
/// made again behind it, removed at shutdown, and a new pool removes what a killed daemon left.
@Suite(.enabled(if: isRoot && Cgroup.detectVersion() == .v1, "needs root and cgroup v1 (v2 cgroups cannot be renamed, so v2 has no pool)"))
struct CgroupPoolTests {
    static func spares(_ host: TestHost) -> [String] {
        Cgroup(version: .v1, root: host.config.cgroupRoot, path: host.cgroupParent).directories.flatMap { d in
            ((try? Files.listDirectory(d)) ?? []).filter { $0.hasPrefix(CgroupPool.prefix) }
        }
    }

    static func waitForSpares(_ host: TestHost, _ n: Int) async throws {
        for _ in 0..<400 where host.launcher.cgroupPool?.readyCount != n { try await Task.sleep(for: .milliseconds(5)) }
    }

    @Test func aLaunchTakesASpareWithItsLimitsAndSparesAreMadeAgain() async throws {
        try await withHost { host in
            let pool = try #require(host.launcher.cgroupPool)
            _ = try await host.launch()  // nothing spare yet: the launch makes its own, and asks for spares
            try await Self.waitForSpares(host, 2)
            #expect(pool.readyCount == 2)
            let before = Set(Self.spares(host))
            #expect(before.count == 2)
            let s = try await host.launch { $0.limits.memoryBytes = 256 << 20 }
            // Its cgroup is named for it, in every hierarchy, and is one of the spares that was ready.
            for d in s.cgroup.directories { #expect(Files.isDirectory(d), "\(d)") }
            let taken = before.subtracting(Self.spares(host))
            #expect(taken.count == 1)
            #expect(s.cgroup.path.hasSuffix("/" + s.id))
            let limit = try Files.read(s.cgroup.directories.first { $0.contains("/memory/") }! + "/memory.limit_in_bytes")
            #expect(limit.trimmingCharacters(in: .whitespacesAndNewlines) == String(256 << 20))
            #expect(s.cgroup.processes().contains(s.initPID))
            // Other limits get spares of their own; the first set's are kept too.
            _ = try await host.launch { $0.limits.pids = 64 }
            try await Self.waitForSpares(host, 4)
            #expect(pool.readyCount == 4)
            host.launcher.shutdown()
            #expect(Self.spares(host).isEmpty, "shutdown removes the spares")
        }
    }

    @Test func aNewPoolRemovesTheSparesAKilledDaemonLeft() async throws {
        try await withHost { host in
            _ = try await host.launch()
            try await Self.waitForSpares(host, 2)
            #expect(Self.spares(host).count == 2 * Cgroup.v1Hierarchies(root: host.config.cgroupRoot).count)
            // As after a SIGKILL: the spares stay on the host, and the next daemon's pool finds them.
            let next = CgroupPool(root: host.config.cgroupRoot, parent: host.cgroupParent, size: 0)
            #expect(Self.spares(host).isEmpty)
            next.close()
        }
    }
}
