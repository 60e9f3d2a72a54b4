#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleRPC
import Foundation
import Testing
@testable import CubicleSandbox

/// Per-user kernel quotas (inotify instances, message-queue bytes, queued signals) are charged up the
/// user-namespace tree to each namespace's owner. A sandbox's namespace is owned by its own host uid, so a
/// session that takes all of its quotas spends nothing of host root's or of another session's.
///
/// These tests exhaust host-wide limits when the protection is missing, so `make test` runs this suite
/// alone, after every other Swift test (`swift test --filter HostLimitTests`); it gives back everything it
/// took when its sandboxes end.
@Suite(.enabled(if: isRoot, rootReason), .serialized)
struct HostLimitTests {
    /// `cubicle-probe quotas` run on the host as root: the errno of one inotify instance, one message queue
    /// and one queued signal (0 each when root still has its quota).
    static func rootCanStillTakeOneOfEach() throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Paths.probe)
        p.arguments = ["quotas"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return text
    }

    @Test(arguments: [false, true]) func aSessionThatTakesEveryQuotaTakesNoneOfRootsOrAnotherSessions(forkServer: Bool) async throws {
        try await withHost({ try TestHost(forkServer: forkServer) }) { host in
            let greedy = try await host.launch()
            let agent = try await greedy.startAgent(ProcessParams(argv: ["/app/cubicle-probe", "exhaust", "60"], env: sandboxEnv))
            close(agent.stderr)
            var line = [UInt8]()
            var byte: UInt8 = 0
            while read(agent.stdout, &byte, 1) == 1 && byte != 10 { line.append(byte) }
            close(agent.stdout)
            let taken = String(decoding: line, as: UTF8.self).split(separator: " ")
            let counts = stride(from: 0, to: taken.count - 1, by: 2).reduce(into: [String: Int]()) { $0[String(taken[$1])] = Int(taken[$1 + 1]) }
            // Each stops at the kernel's limit for one user: max_user_instances, RLIMIT_MSGQUEUE, RLIMIT_SIGPENDING.
            #expect((counts["inotify"] ?? 0) > 0 && (counts["mqueue"] ?? 0) > 0 && (counts["signals"] ?? 0) > 0, "\(taken)")
            #expect(try Self.rootCanStillTakeOneOfEach() == "inotify 0 mqueue 0 signals 0\n", "the session took \(taken)")
            let other = try await host.launch()
            let r = try await other.run(["/app/cubicle-probe", "quotas"])
            #expect(r.stdout == "inotify 0 mqueue 0 signals 0\n", "another session beside one that took \(taken)")
        }
    }
}

extension HostLimitTests {
    /// Loopback TCP pairs that nobody reads buffer up to tcp_rmem + tcp_wmem each. The session's socket
    /// memory is charged to its cgroup (v2 always; v1 once memory.kmem.tcp.limit_in_bytes is set, which
    /// the launcher does), so sends stop short of twice its limit instead of buffering gigabytes of host
    /// memory. Runs alone: without the protection it drives the host's TCP memory towards pressure.
    @Test func socketBuffersAreChargedToTheSession() async throws {
        try await withHost { host in
            let limit = 64 << 20
            let s = try await host.launch { $0.limits.memoryBytes = Int64(limit) }
            let script = """
                import socket
                total, pairs = 0, []
                listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(128)
                while len(pairs) < 96 and total < 512 << 20:
                    a = socket.create_connection(listener.getsockname()); b, _ = listener.accept()
                    a.setblocking(False); pairs.append((a, b))
                    chunk = b"x" * 65536
                    while True:
                        try:
                            n = a.send(chunk)
                        except (BlockingIOError, OSError):
                            break
                        total += n
                print(total)
                """
            let r = try await s.run(["/usr/bin/python3", "-c", script], timeoutSeconds: 120)
            let buffered = Int(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
            print("socketBuffersAreChargedToTheSession: \(buffered >> 20) MiB buffered under a \(limit >> 20) MiB limit")
            #expect(buffered > 0, "stdout \(r.stdout) stderr \(r.stderr)")
            #expect(buffered < 2 * limit, "\(buffered >> 20) MiB buffered by a session limited to \(limit >> 20) MiB")
            if host.config.cgroupVersion == .v1 {
                let tcpLimit = try Files.read(s.cgroup.directories.first { $0.contains("/memory/") }! + "/memory.kmem.tcp.limit_in_bytes")
                #expect(Int(tcpLimit.trimmingSpaces) == limit)
            }
        }
    }
}
