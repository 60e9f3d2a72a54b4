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

extension HostLimitTests {
    static func fileNumbers() throws -> (allocated: Int64, max: Int64) {
        let nr = try Files.read("/proc/sys/fs/file-nr").split(whereSeparator: { $0 == "\t" || $0 == " " || $0 == "\n" })
        return (Int64(nr[0])!, Int64(try Files.read("/proc/sys/fs/file-max").trimmingSpaces)!)
    }

    /// Whether an unprivileged host user (nobody) can open a file now: root may exceed file-max
    /// (CAP_SYS_ADMIN), every other user gets ENFILE once the table is full.
    static func anUnprivilegedUserCanOpenAFile() throws -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        p.arguments = ["--reuid", "65534", "--regid", "65534", "--clear-groups", "/bin/cat", "/dev/null"]
        try p.run()
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    /// On a host whose file table one session could fill (file-max set here to what the host holds plus
    /// 400,000), the budget raises file-max to back two sessions of these limits; then a session that opens
    /// every descriptor its 32 processes may hold (524,288) runs into its own limits (EMFILE), and a host
    /// user can still open a file. Without the budget the session reaches ENFILE and so does the host
    /// user. file-max is put back afterwards.
    @Test func aSessionRunsOutOfItsOwnDescriptorsBeforeTheHostsFileTable() async throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else {
            print("aSessionRunsOutOfItsOwnDescriptorsBeforeTheHostsFileTable: skipped, no /usr/bin/setpriv (util-linux) to open a file as a host user")
            return
        }
        let saved = try Self.fileNumbers().max
        defer { try? Files.write("/proc/sys/fs/file-max", String(saved)) }
        try Files.write("/proc/sys/fs/file-max", String(try Self.fileNumbers().allocated + 400_000))
        // init, the probe and its 32 children fit in the pids limit.
        let session = FileBudget.Session(memoryBytes: 512 << 20, pids: 40, openFiles: 16384)
        let raised = try FileBudget.ensure(maxSessions: 2, sessions: [session])
        #expect(raised != nil && raised!.to >= 2 * FileBudget.ceiling(session, maxMapCount: 65530), "\(String(describing: raised))")
        try await withHost { host in
            let s = try await host.launch {
                $0.limits.memoryBytes = session.memoryBytes
                $0.limits.pids = session.pids
                $0.maxOpenFiles = UInt64(session.openFiles)
            }
            let agent = try await s.startAgent(ProcessParams(argv: ["/app/cubicle-probe", "files", "32", "60"], env: sandboxEnv))
            close(agent.stderr)
            var line = [UInt8](), byte: UInt8 = 0
            while read(agent.stdout, &byte, 1) == 1 && byte != 10 { line.append(byte) }
            close(agent.stdout)
            let words = String(decoding: line, as: UTF8.self).split(separator: " ")
            let opened = words.count == 4 ? Int64(words[1]) ?? 0 : 0
            print("aSessionRunsOutOfItsOwnDescriptorsBeforeTheHostsFileTable: the session opened \(opened), stopped by errno \(words.last ?? "?")")
            #expect(opened > 400_000, "\(words)")
            #expect(words.last.map { Int32($0) } == EMFILE, "the session's processes stop at their own limit: \(words)")
            #expect(try Self.anUnprivilegedUserCanOpenAFile(), "a host user gets ENFILE")
        }
    }
}
