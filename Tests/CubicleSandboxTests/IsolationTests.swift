#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleRPC
import Foundation
import Testing
@testable import CubicleSandbox

/// One test per row of DESIGN.md's isolation table, each checked from inside a real sandbox.
@Suite(.enabled(if: isRoot, rootReason))
struct IsolationTests {
    static func status(_ text: String, _ key: String) -> String? {
        text.split(separator: "\n").first { $0.hasPrefix(key + ":") }.map { $0.dropFirst(key.count + 1).trimmingCharacters(in: .whitespaces) }
    }

    @Test(arguments: RootKind.allCases) func processesHaveNoCapabilitiesNoNewPrivsAndSeccomp(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root) else { return }
            let r = try await s.sh("cat /proc/self/status; id -u; id -g")
            #expect(r.exit.exitCode == 0)
            for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                #expect(Self.status(r.stdout, key) == "0000000000000000", "\(key)")
            }
            #expect(Self.status(r.stdout, "NoNewPrivs") == "1")
            #expect(Self.status(r.stdout, "Seccomp") == "2")
            let lines = r.stdout.split(separator: "\n")
            #expect(lines.suffix(2) == ["1000", "1000"])
        }
    }

    @Test(arguments: RootKind.allCases) func deniedSyscallsAreDenied(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root) else { return }
            let r = try await s.run(["/app/cubicle-probe", "syscalls"])
            var results: [String: Int32] = [:]
            for line in r.stdout.split(separator: "\n") {
                let parts = line.split(separator: " ")
                if parts.count == 2 { results[String(parts[0])] = Int32(parts[1]) }
            }
            let denied = ["keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup", "bpf", "kexec_load",
                          "init_module", "finit_module", "mount", "umount2", "unshare", "setns", "clone_newuser",
                          "socket_vsock", "socket_packet", "ptrace", "pivot_root", "chroot", "perf_event_open"]
            for name in denied {
                #expect(results[name] == EPERM, "\(name) should fail with EPERM from seccomp, got \(results[name].map(String.init) ?? "nothing")")
            }
            #expect(results["getpid"] == 0)
            #expect(results["socket_inet"] == 0)
        }
    }

    @Test(arguments: RootKind.allCases) func agentRunsAsNonRootInItsOwnHostUIDRange(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root) else { return }
            let agent = try await s.startAgent(ProcessParams(argv: ["/bin/sleep", "30"], env: sandboxEnv))
            close(agent.stdout); close(agent.stderr)
            let hostPIDs = s.cgroup.processes()
            #expect(hostPIDs.count == 2)
            for pid in hostPIDs {
                let st = try Files.read("/proc/\(pid)/status")
                let uids = Self.status(st, "Uid")!.split(separator: "\t").compactMap { UInt32($0) }
                let expected = pid == s.initPID ? s.uidRange.hostBase : s.uidRange.host(1000)
                #expect(uids == [expected, expected, expected, expected])
                #expect(uids.allSatisfy { $0 != 0 })
            }
            let map = try Files.read("/proc/\(s.initPID)/uid_map").split(whereSeparator: { $0 == " " || $0 == "\n" })
            #expect(map == ["0", Substring(String(s.uidRange.hostBase)), "65536"])
        }
    }

    /// With network namespaces made ahead of time (as cubicled runs) and without (each clone makes one).
    static let pools = [0, 2]

    @Test(arguments: pools, RootKind.allCases) func everyNamespaceIsNew(pool: Int, root: RootKind) async throws {
        try await withHost({ try TestHost(networkNamespacePool: pool) }) { host in
            guard let s = try await host.launch(root) else { return }
            for ns in ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"] {
                let mine = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/\(ns)")
                let theirs = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(s.initPID)/ns/\(ns)")
                #expect(mine != theirs, "\(ns) namespace is shared with the host")
            }
        }
    }

    /// The user namespace belongs to the session's own host uid (the base of its range), so the kernel
    /// charges the session's per-user quotas there and not to root (HostLimitTests shows the effect).
    @Test(arguments: [false, true], RootKind.allCases) func theUserNamespaceIsOwnedByTheSessionsHostUID(forkServer: Bool, root: RootKind) async throws {
        try await withHost({ try TestHost(forkServer: forkServer) }) { host in
            guard let s = try await host.launch(root) else { return }
            let fd = open("/proc/\(s.initPID)/ns/user", O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0)
            defer { close(fd) }
            var owner: uid_t = 0
            let nsGetOwnerUID: UInt = 0xb704  // _IO(0xb7, 0x4)
            #expect(ioctl(fd, nsGetOwnerUID, &owner) == 0)
            #expect(owner == s.uidRange.hostBase)
        }
    }

    @Test(arguments: [false, true], RootKind.allCases) func ownPIDView(forkServer: Bool, root: RootKind) async throws {
        try await withHost({ try TestHost(forkServer: forkServer) }) { host in
            guard let s = try await host.launch(root) else { return }
            let r = try await s.sh("ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; cat /proc/1/cmdline | tr '\\0' ' '")
            let pids = r.stdout.split(separator: " ").compactMap { Int($0) }
            #expect(pids.first == 1)
            // init, sh and the pipeline's own four commands; a host PID view would show hundreds.
            #expect(pids.count <= 6, "sees processes beyond its own: \(pids)")
            // argv[0] only: cubicle-init's host path is not the sandbox's to read.
            #expect(r.stdout.split(separator: "\n").last == "cubicle-init ", "\(r.stdout)")
        }
    }

    @Test(arguments: RootKind.allCases) func filesystemIsPrivateAndHostDirectoriesAreReadOnly(root kind: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(kind) else { return }
            let r = try await s.sh("""
                for d in /usr /app / /etc; do touch $d/cubicle-write 2>/dev/null && echo "wrote $d"; done
                touch /tmp/ok /home/agent/ok /dev/shm/ok && echo writable
                ls -a / | tr '\\n' ' '; echo
                for p in \(host.stateDirectory) /root /work \(Paths.repo) /sys/fs/cgroup /run; do test -e $p && echo "visible $p"; done
                cat /proc/kcore | wc -c; echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo "wrote /proc/sys"
                grep -c . /proc/self/mountinfo
                """)
            #expect(!r.stdout.contains("wrote"), "\(r.stdout)")
            #expect(r.stdout.contains("writable"))
            #expect(!r.stdout.contains("visible"), "\(r.stdout)")
            let root = Set(r.stdout.split(separator: "\n")[1].split(separator: " ").map(String.init))
            // A host root: the host's /usr and its links, Cubicle's own parts. An image root: the image's own
            // top level (the test image's bin, etc, srv, usr), Cubicle's parts and its upper layer's mount point.
            let allowed: Set<String> = kind == .host
                ? [".", "..", "app", "bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"]
                : [".", "..", "app", "bin", "dev", "etc", "home", "proc", "srv", "tmp", "usr", InitConfig.imageUpper.dropFirst().description]
            #expect(root.isSubset(of: allowed), "unexpected entries in /: \(root.subtracting(allowed))")
            #expect(root.isSuperset(of: ["app", "usr", "tmp", "proc", "dev", "etc", "home"]))
            #expect(r.stdout.split(separator: "\n")[2] == "0", "/proc/kcore is not masked")
        }
    }

    /// A host directory with a writable mount inside it (here a mode-1777 tmpfs) stays read-only all the way down.
    @Test(arguments: RootKind.allCases) func mountsUnderAHostBindAreReadOnlyToo(root: RootKind) async throws {
        try await withHost { host in
            let sub = host.codeDirectory + "/writable-submount"
            try Files.makeDirectories(sub)
            try sys("mount tmpfs on \(sub)") { mount("tmpfs", sub, "tmpfs", 0, "size=1m,mode=1777") }
            defer { umount2(sub, Int32(MNT_DETACH)) }
            guard let s = try await host.launch(root) else { return }
            let r = try await s.sh("touch /app/writable-submount/x && echo wrote; touch /app/writable-submount/x 2>&1 | grep -c 'Read-only'")
            #expect(!r.stdout.contains("wrote"), "\(r.stdout)")
            #expect(r.stdout.hasPrefix("1"), "\(r.stdout)")
            #expect(!Files.exists(sub + "/x"))
        }
    }

    @Test(arguments: pools, RootKind.allCases) func loopbackOnlyNetworkAndOwnHostname(pool: Int, root: RootKind) async throws {
        try await withHost({ try TestHost(networkNamespacePool: pool) }) { host in
            guard let s = try await host.launch(root, { $0.hostname = "session-box" }) else { return }
            // The host's Python, or the image's busybox nc: a listener and a connection to it on loopback.
            let loopback = root == .host
                ? try await s.run(["/usr/bin/python3", "-c", "import socket; s = socket.create_server(('127.0.0.1', 0)); "
                                   + "socket.create_connection(s.getsockname()); print('loopback up')"])
                // The client tries until the listener is up (it is refused until then), then both exit.
                : try await s.sh("nc -l -p 7777 > /tmp/got & i=0; until echo loopback up | nc 127.0.0.1 7777 2>/dev/null || [ $i -ge 100 ]; "
                                 + "do i=$((i+1)); sleep 0.05; done; wait; cat /tmp/got")
            #expect(loopback.stdout == "loopback up\n", "\(loopback.stderr)")
            let r = try await s.sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo; hostname; grep -c . /proc/net/route")
            let lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
            #expect(lines.first == "lo")
            #expect(lines.contains("session-box"))
            #expect(lines.dropLast().last.map { $0 == "0" || $0 == "1" } == true)  // header only: no routes
            var uts = utsname()
            uname(&uts)
            let hostName = withUnsafePointer(to: uts.nodename) { $0.withMemoryRebound(to: CChar.self, capacity: 65) { String(cString: $0) } }
            #expect(hostName != "session-box")
        }
    }

    /// The sandbox's loopback does not pace: BBR (this host's default) would make every hop between
    /// cubicled and the agent cost timers. Pooled namespaces and ones made at the clone, by either init.
    /// Tells nothing on a host whose default is already CUBIC (it says so).
    @Test(arguments: [(0, false), (0, true), (2, false), (2, true)])
    func loopbackDoesNotPace(pool: Int, forkServer: Bool) async throws {
        let hostDefault = try Files.read("/proc/sys/net/ipv4/tcp_congestion_control").trimmingCharacters(in: .whitespacesAndNewlines)
        let allowed = try Files.read("/proc/sys/net/ipv4/tcp_allowed_congestion_control").split(separator: " ")
            .map { $0.trimmingCharacters(in: .whitespacesAndNewlines) }
        let wanted = allowed.contains("cubic") ? "cubic" : "reno"
        if hostDefault == wanted { print("loopbackDoesNotPace: the host's default is \(wanted) already; this run cannot tell") }
        try await withHost({ try TestHost(networkNamespacePool: pool, forkServer: forkServer) }) { host in
            if let pool = host.launcher.networkNamespaces {
                for _ in 0..<100 where pool.readyCount < 1 { try await Task.sleep(for: .milliseconds(10)) }
                try #require(pool.readyCount >= 1, "the pool made no namespace")
            }
            let s = try await host.launch()
            let r = try await s.run(["/bin/cat", "/proc/sys/net/ipv4/tcp_congestion_control"])
            #expect(r.stdout == wanted + "\n", "host default \(hostDefault); \(r.stderr)")
        }
    }

    /// Listens for kernel uevents (NETLINK_KOBJECT_UEVENT, which needs no privilege) for `seconds` after
    /// saying "listening"; prints "got ACTION@DEVPATH" for the first, or "none".
    static let ueventListener = """
        import socket, sys
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)
        s.bind((0, 1))
        s.settimeout(float(sys.argv[1]))
        print("listening", flush=True)
        try:
            print("got", s.recv(65536).split(b"\\0")[0].decode(), flush=True)
        except socket.timeout:
            print("none", flush=True)
        """

    /// The kernel broadcasts untagged uevents (host device activity) to every network namespace owned by
    /// the host's user namespace. A sandbox's namespace, pooled or its own, is not one of them: a uevent
    /// the host triggers (a "change" on /dev/null's device, which does nothing else) reaches a listener on
    /// the host and none in the sandbox.
    @Test(arguments: pools) func hostUeventsDoNotReachTheSandbox(pool: Int) async throws {
        try await withHost({ try TestHost(networkNamespacePool: pool) }) { host in
            if let pool = host.launcher.networkNamespaces {
                for _ in 0..<100 where pool.readyCount < 1 { try await Task.sleep(for: .milliseconds(10)) }
                try #require(pool.readyCount >= 1, "the pool made no namespace")
            }
            let s = try await host.launch()
            let inside = try await s.startAgent(ProcessParams(argv: ["/usr/bin/python3", "-c", Self.ueventListener, "3"], env: sandboxEnv))
            close(inside.stderr)
            let outside = Process()
            outside.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
            outside.arguments = ["-c", Self.ueventListener, "3"]
            let outsideOut = Pipe()
            outside.standardOutput = outsideOut
            try outside.run()
            func firstLine(_ fd: Int32) -> String {
                var line = [UInt8](), byte: UInt8 = 0
                while read(fd, &byte, 1) == 1 && byte != 10 { line.append(byte) }
                return String(decoding: line, as: UTF8.self)
            }
            #expect(firstLine(inside.stdout) == "listening")
            #expect(firstLine(outsideOut.fileHandleForReading.fileDescriptor) == "listening")
            try Files.write("/sys/devices/virtual/mem/null/uevent", "change")
            let hostSaw = firstLine(outsideOut.fileHandleForReading.fileDescriptor)
            outside.waitUntilExit()
            #expect(hostSaw.hasPrefix("got "), "the host's own listener heard nothing, so this run cannot tell: \(hostSaw)")
            let sandboxSaw = firstLine(inside.stdout)
            close(inside.stdout)
            #expect(sandboxSaw == "none", "a host uevent reached the sandbox: \(sandboxSaw)")
        }
    }

    @Test(arguments: pools, RootKind.allCases) func twoSandboxesShareNothing(pool: Int, root: RootKind) async throws {
        try await withHost({ try TestHost(networkNamespacePool: pool) }) { host in
            guard let a = try await host.launch(root), let b = try await host.launch(root) else { return }
            // A holds a process, an abstract socket, a file and a shared memory segment.
            let agent = try await a.startAgent(ProcessParams(argv: ["/app/cubicle-probe", "abstract", "cubicle-a", "cubicle-a", "hold"], env: sandboxEnv))
            var buf = [UInt8](repeating: 0, count: 64)
            let n = read(agent.stdout, &buf, buf.count)
            #expect(String(decoding: buf[0..<max(0, n)], as: UTF8.self).contains("connect 0"))
            close(agent.stdout); close(agent.stderr)
            // A shared memory segment where the root has util-linux's ipcmk (the host's; the test image has none).
            let shm = root == .host
            let setup = try await a.sh("echo secret > /tmp/a-file" + (shm ? " && ipcmk -M 4096 >/dev/null && ipcs -m | grep -c 0x" : " && echo 1"))
            #expect(setup.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1")
            let r = try await b.run(["/app/cubicle-probe", "abstract", "cubicle-b", "cubicle-a"])
            #expect(r.stdout.contains("connect \(ECONNREFUSED)"), "B reached A's abstract socket: \(r.stdout)")
            let look = try await b.sh("test -e /tmp/a-file && echo sees-file; " + (shm ? "ipcs -m | grep -c 0x" : "grep -c . /proc/sysvipc/shm | sed 's/^1$/0/'")
                                      + "; ps \(shm ? "-e" : "-o comm") | grep -c cubicle-probe; cat /proc/net/unix | grep -c cubicle-a")
            let counts = look.stdout.split(separator: "\n")
            #expect(!look.stdout.contains("sees-file"))
            #expect(counts == ["0", "0", "0"], "B sees A's shm, processes or sockets: \(look.stdout)")
            let aNet = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(a.initPID)/ns/net")
            let bNet = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(b.initPID)/ns/net")
            #expect(aNet != bNet)
        }
    }

    /// A pooled namespace goes to one sandbox only, the pool fills again behind it, and a sandbox cannot
    /// reconfigure a namespace the host made (it has no CAP_NET_ADMIN over it).
    @Test func pooledNetworkNamespacesAreUsedOnceAndRefilled() async throws {
        try await withHost({ try TestHost(networkNamespacePool: 2) }) { host in
            let pool = try #require(host.launcher.networkNamespaces)
            for _ in 0..<100 where pool.readyCount < 2 { try await Task.sleep(for: .milliseconds(10)) }
            #expect(pool.readyCount == 2)
            var seen = Set<String>()
            for _ in 0..<3 {
                let s = try await host.launch()
                seen.insert(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(s.initPID)/ns/net"))
            }
            #expect(seen.count == 3, "two sandboxes got one network namespace: \(seen)")
            #expect(!seen.contains(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/net")))
            for _ in 0..<100 where pool.readyCount < 2 { try await Task.sleep(for: .milliseconds(10)) }
            #expect(pool.readyCount == 2, "the pool fills again after launches take from it")
            let down = try await host.sandboxes[0].run(["/usr/bin/python3", "-c", """
                import fcntl, socket, struct
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    fcntl.ioctl(s, 0x8914, struct.pack('16sH14x', b'lo', 0))  # SIOCSIFFLAGS: lo down
                    print('changed')
                except OSError as e:
                    print('refused', e.errno)
                """])
            #expect(down.stdout == "refused \(EPERM)\n", "\(down.stdout) \(down.stderr)")
        }
    }
}
