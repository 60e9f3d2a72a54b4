#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
@testable import CubicleSandbox
import Foundation
import Testing

/// The fork server's template of a runtime's read-only tree (`Sources/CubicleInit/Template.swift`): built
/// once, reused while its sources are unchanged, built again when the host changes one, and locked inside.
@Suite(.enabled(if: isRoot, rootReason),
       .enabled(if: cubicle_mount_setattr_available() != 0, "needs mount_setattr (Linux 5.12): without it the fork server builds no template"))
struct TemplateTests {
    /// A tmpfs root's device number: sandboxes made from one template share its (read-only) root.
    static func rootDevice(_ s: Sandbox) async throws -> String {
        let r = try await s.sh("stat -c %d /")
        #expect(r.exit.exitCode == 0, "\(r.stderr)")
        return r.stdout
    }

    @Test func aSourceChangedOnTheHostIsSeenByTheNextSandbox() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { host in
            let base = "/tmp/cubicle-template-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            let code = base + "/code", file = base + "/settings"
            try Files.makeDirectories(code, mode: 0o755)
            defer { umount2(code, Int32(MNT_DETACH)); try? Files.removeTree(base) }
            try Files.write(code + "/marker", "one\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            try Files.write(file, "first\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            func launch() async throws -> Sandbox {
                try await host.launch { spec in
                    spec.codeDirectory = code
                    spec.readOnlyMounts = [.init(source: file, target: "/etc/cubicle-settings")]
                }
            }
            let first = try await launch(), again = try await launch()
            #expect(try await first.sh("cat /app/marker /etc/cubicle-settings").stdout == "one\nfirst\n")
            #expect(try await Self.rootDevice(first) == Self.rootDevice(again), "unchanged sources: one template")

            // A file replaced by rename (as resolv.conf is) and a directory mounted over.
            try Files.write(file + ".new", "second\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            #expect(rename(file + ".new", file) == 0)
            #expect(mount("tmpfs", code, "tmpfs", 0, "size=1m,mode=0755") == 0)
            try Files.write(code + "/marker", "two\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            let changed = try await launch()
            let r = try await changed.sh("cat /app/marker /etc/cubicle-settings")
            #expect(r.stdout == "two\nsecond\n", "\(r.stderr)")
            #expect(try await Self.rootDevice(changed) != Self.rootDevice(first), "a changed source: a new template")
            // A file edited in place is the same file: seen through the template as it is.
            try Files.write(file, "third\n", flags: O_WRONLY | O_TRUNC, mode: 0o644)
            let edited = try await launch()
            #expect(try await edited.sh("cat /etc/cubicle-settings").stdout == "third\n")
            #expect(try await Self.rootDevice(edited) == Self.rootDevice(changed))
        }
    }

    /// The server keeps eight templates (`TemplateStore.capacity`, in cubicle-init), dropping the least
    /// recently used: hostnames make them differ, and a reused template shows as the same root device.
    @Test func eightTemplatesAreKeptAndTheLeastRecentlyUsedIsDropped() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { host in
            func root(_ name: String) async throws -> String {
                try await Self.rootDevice(try await host.launch { $0.hostname = name })
            }
            var first: [String: String] = [:]
            for i in 0..<8 { first["t\(i)"] = try await root("t\(i)") }
            #expect(Set(first.values).count == 8, "each configuration its own template: \(first)")
            #expect(try await root("t0") == first["t0"], "t0 reused, and now the most recently used")
            _ = try await root("t8")  // a ninth: t1, the least recently used, is dropped
            #expect(try await root("t0") == first["t0"], "t0 kept")
            #expect(try await root("t2") == first["t2"], "t2 kept")
            #expect(try await root("t1") != first["t1"], "t1 dropped and built again")
        }
    }

    /// Runs `script` as root of the sandbox's user namespace, in its mount namespace: the rights init has
    /// there (the agent has none), more than any process inside ever holds.
    static func asNamespaceRoot(_ s: Sandbox, _ script: String) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/nsenter")
        p.arguments = ["-t", "\(s.initPID)", "-U", "-m", "/bin/sh", "-c", script]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// The template's mounts come from a namespace of the host's user namespace, so in a sandbox's copy
    /// they are locked: even its namespace root cannot make them writable or unmount them to see beneath.
    /// Its own mounts (/tmp) it can change, which shows the refusals are the lock's.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/nsenter"), "needs nsenter (util-linux)"))
    func theTemplatesMountsAreLockedEvenForTheSandboxRoot() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { host in
            let s = try await host.launch()
            let (status, output) = try Self.asNamespaceRoot(s, """
                id -u
                mount -o remount,bind,rw /usr 2>/dev/null && echo usr-writable
                mount -o remount,bind,rw / 2>/dev/null && echo root-writable
                umount -l /usr 2>/dev/null && echo usr-unmounted
                umount -l /etc/hosts 2>/dev/null && echo hosts-unmounted
                touch /cubicle-x 2>/dev/null && echo root-written
                touch /dev/cubicle-x 2>/dev/null && echo dev-written
                mount -o remount,bind,ro /tmp && echo tmp-remounted
                """)
            #expect(status == 0, "\(output)")
            #expect(output == "0\ntmp-remounted\n")
        }
    }
}
