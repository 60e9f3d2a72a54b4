#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleRPC
@testable import CubicleSandbox
import Foundation
import Testing

/// init made by the fork server and init exec'd by the launcher build the same sandbox; the fork server
/// comes back after it dies, and an init binary that is none leaves launches to exec.
@Suite(.enabled(if: isRoot, rootReason))
struct ForkServerTests {
    /// What a sandbox looks like from inside, minus what differs between any two sandboxes (mount ids,
    /// device numbers).
    static func view(_ s: Sandbox) async throws -> String {
        let r = try await s.sh("""
            awk '{ print $5, $6 }' /proc/self/mountinfo; grep -E '^(Uid|Gid|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status
            id; hostname; ls -la /dev | awk '{ print $1, $NF }'; ulimit -n; ulimit -p 2>/dev/null || true
            """)
        #expect(r.exit.exitCode == 0, "\(r.stderr)")
        return r.stdout
    }

    static func environment(_ pid: pid_t) -> [String] {
        ((try? Files.read("/proc/\(pid)/environ")) ?? "").split(separator: "\0").map(String.init)
    }

    static func state(_ pid: pid_t) -> Substring? {
        guard let stat = try? Files.read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(after: close)...].split(separator: " ").first
    }

    static func parent(_ pid: pid_t) -> pid_t? {
        // The fields after the parenthesised name: state, then ppid.
        guard let stat = try? Files.read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(after: close)...].split(separator: " ").dropFirst().first.flatMap { pid_t($0) }
    }

    @Test func forkedAndExecdInitsBuildTheSameSandbox() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { forking in
            try await withHost({ try TestHost(forkServer: false) }) { execing in
                let forked = try await forking.launch()
                let execd = try await execing.launch()
                #expect(forking.launcher.forkServer?.unavailableReason == nil)
                // The fork server's environment marks its clones; an exec'd init has its own.
                #expect(Self.environment(forked.initPID).contains("\(ForkReply.environmentKey)=1"))
                #expect(!Self.environment(execd.initPID).contains { $0.hasPrefix(ForkReply.environmentKey) })
                // Either way this process is init's parent: it reaps it and sees it exit.
                #expect(Self.parent(forked.initPID) == getpid())
                #expect(Self.parent(execd.initPID) == getpid())
                let a = try await Self.view(forked), b = try await Self.view(execd)
                #expect(a == b)
                #expect(a.contains("Seccomp:\t2") && a.contains("CapEff:\t0000000000000000"))
            }
        }
    }

    /// A code directory mounted on the host after the fork server started is what a sandbox sees, as with
    /// an exec'd init: the server stays in the host's mount namespace and builds a template from it as it
    /// is at that launch (a copy of its own would be stale where the host's / is a private mount, as here).
    @Test func aDirectoryMountedAfterTheServerStartedIsSeen() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { host in
            _ = try await host.launch()
            #expect(host.launcher.forkServer?.serverPID != nil)

            let late = "/tmp/cubicle-late-code-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            try Files.makeDirectories(late, mode: 0o755)
            defer { umount2(late, Int32(MNT_DETACH)); rmdir(late) }
            #expect(mount("tmpfs", late, "tmpfs", 0, "size=1m,mode=0755") == 0)
            try Files.write(late + "/marker", "mounted later\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
            let s = try await host.launch { $0.codeDirectory = late }
            let r = try await s.sh("cat /app/marker")
            // It read empty, exiting 0, twice under the full parallel suite; what /app held then tells an empty
            // file from lost output.
            let seen = r.stdout == "mounted later\n" ? "" : (try? await s.sh("ls -la /app; wc -c /app/marker; echo probe")).map { "\($0.stdout)\($0.stderr)" } ?? "?"
            #expect(r.stdout == "mounted later\n", "exit \(r.exit), stderr: \(r.stderr); then /app: \(seen)")
        }
    }

    /// The server reuses the configuration it parsed last only for the same bytes: sandboxes with other
    /// settings, one after another from one server, each get their own. The two "alpha" ones share a
    /// template (sizes of /tmp are per sandbox), and still get their own /tmp size.
    @Test func eachLaunchGetsItsOwnConfiguration() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { host in
            for (name, mebibytes) in [("alpha", 32), ("beta", 8), ("alpha", 8), ("gamma", 32)] {
                let s = try await host.launch { $0.hostname = name; $0.tmpBytes = Int64(mebibytes) << 20 }
                let r = try await s.sh("hostname; df -k /tmp | tail -1 | awk '{ print $2 }'")
                #expect(r.stdout == "\(name)\n\(mebibytes * 1024)\n")
            }
        }
    }

    @Test func aKilledForkServerIsStartedAgain() async throws {
        try await withHost({ try TestHost(forkServer: true) }) { host in
            let first = try await host.launch()
            let server = try #require(host.launcher.forkServer?.serverPID)
            kill(server, SIGKILL)
            // Dead but not reaped: reaping it is the launcher's business.
            for _ in 0..<400 where Self.state(server) != "Z" { try await Task.sleep(for: .milliseconds(5)) }
            let second = try await host.launch()
            #expect(Self.environment(second.initPID).contains("\(ForkReply.environmentKey)=1"))
            let again = try #require(host.launcher.forkServer?.serverPID)
            #expect(again != server)
            // The first sandbox never depended on the server that made it.
            let r = try await first.sh("echo alive")
            #expect(r.stdout == "alive\n")
        }
    }

    @Test func anInitThatIsNoForkServerIsExecd() async throws {
        let script = "/tmp/cubicle-not-a-fork-server-\(getpid())"
        try Files.write(script, "#!/bin/sh\nexec \(Paths.probe) hostile-init garbage\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o755)
        defer { unlink(script) }
        try await withHost({ try TestHost(initPath: script, forkServer: true) }) { host in
            // The stand-in answers the handshake with garbage: the launch execs it instead, and it then
            // breaks the control protocol as it was written to.
            _ = try? await host.launch()
            let reason = try #require(host.launcher.forkServer?.unavailableReason)
            #expect(reason.contains("did not answer as a fork server"))
            #expect(host.launcher.forkServer?.serverPID == nil)
        }
    }

}
