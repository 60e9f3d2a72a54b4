#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleRPC
import Foundation
import Testing
@testable import CubicleSandbox

@Suite(.enabled(if: isRoot, rootReason))
struct LimitsTests {
    @Test(arguments: RootKind.allCases) func forkBombStopsAtThePidsLimit(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root, { $0.limits.pids = 32 }) else { return }
            // The bomb runs in a subshell forked before it; what follows it in this shell is builtins only
            // (no fork), so its report does not depend on whether the bomb or a reader got the last pids. The
            // sleeps hold no pipe of the command, so it ends while they still count.
            let r = try await s.sh("(i=0; while [ $i -lt 100 ]; do sleep 5 & i=$((i+1)); done) >/dev/null 2>/tmp/err; read -r first < /tmp/err; echo \"$first\"", timeoutSeconds: 20)
            #expect(r.stdout.contains("fork") || r.stdout.contains("Resource temporarily unavailable"), "\(r.stdout) \(r.stderr)")
            let usage = s.cgroup.usage()
            #expect(usage.pids <= 32)
            #expect(usage.pids > 20, "the bomb never reached the limit: \(usage.pids)")
        }
    }

    @Test(arguments: RootKind.allCases) func memoryHogIsOOMKilledAndReported(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root, { $0.limits.memoryBytes = 48 << 20 }) else { return }
            let r = try await s.sh("exec tail /dev/zero", timeoutSeconds: 30)
            #expect(r.exit.signal == SIGKILL)
            #expect(s.cgroup.usage().oomKills >= 1)
            let after = try await s.sh("echo alive")
            #expect(after.stdout == "alive\n", "the sandbox itself should survive its hog")
        }
    }

    @Test(arguments: RootKind.allCases) func cpuHogIsThrottled(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root, { $0.limits.cpuQuotaMicros = 10_000 }) else { return }  // a tenth of one CPU
            let before = s.cgroup.usage().cpuNanoseconds
            let start = DispatchTime.now().uptimeNanoseconds
            _ = try await s.sh("timeout 1 sh -c 'while :; do :; done'", timeoutSeconds: 10)
            let wall = DispatchTime.now().uptimeNanoseconds - start
            let used = s.cgroup.usage().cpuNanoseconds - before
            #expect(Double(used) < Double(wall) * 0.5, "used \(used) ns of CPU in \(wall) ns with a 10% quota")
        }
    }

    @Test func aSandboxRunsOnlyOnTheCPUsItWasGiven() async throws {
        guard CPUPlacer.allowedCPUs().count > 1 else {
            print("skipped: one CPU, nothing to confine to")
            return
        }
        try await withHost { host in
            let s = try await host.launch { $0.cpuCount = 1 }
            #expect(s.cpus.count == 1)
            let inside = try await s.sh("grep Cpus_allowed_list /proc/self/status; sh -c 'grep Cpus_allowed_list /proc/self/status'", timeoutSeconds: 10)
            let lists = inside.stdout.split(separator: "\n").map { $0.split(separator: ":").last!.trimmingCharacters(in: .whitespaces) }
            #expect(lists == [String(s.cpus[0]), String(s.cpus[0])], "init's children and theirs are confined: \(inside.stdout)")
        }
    }

    /// With `sessionsYieldCPUToHost: true` (or while a session is throttled) the sessions' parent is idle for the CPU scheduler: a session spinning
    /// on its CPU gets almost none of it while a host process wants that CPU (equal weights would split it
    /// in half). Measured as the session's CPU time against the host spinner's over the same window, so
    /// other tests' load, which slows both, cannot make it pass or fail.
    @Test func aBusySessionGivesWayToTheHostOnItsCPU() async throws {
        guard CPUPlacer.allowedCPUs().count > 1 else {
            print("aBusySessionGivesWayToTheHostOnItsCPU: skipped, one CPU: a session is confined to a CPU of its own only when the host has more")
            return
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/taskset") else {
            print("aBusySessionGivesWayToTheHostOnItsCPU: skipped, no /usr/bin/taskset (util-linux) to pin the host's spinner")
            return
        }
        try await withHost({ try TestHost(yieldCPUToHost: .always) }) { host in
            let s = try await host.launch { $0.cpuCount = 1 }
            let cpu = try #require(s.cpus.first)
            guard let idle = host.sessionsCPUIdlePath(test: "aBusySessionGivesWayToTheHostOnItsCPU") else { return }
            #expect(try Files.read(idle).trimmingSpaces == "1")
            // Output goes nowhere: nothing may block this process's few cooperative threads on reads.
            let hog = try await s.runCommand(ProcessParams(argv: ["/bin/sh", "-c", "exec timeout 4 sh -c 'while :; do :; done'"],
                                                           env: sandboxEnv, cwd: "/home/agent"), timeoutSeconds: 10)
            close(hog.stdout)
            close(hog.stderr)
            let started = s.cgroup.usage().cpuNanoseconds
            for _ in 0..<100 where s.cgroup.usage().cpuNanoseconds - started < 50_000_000 { try await Task.sleep(for: .milliseconds(20)) }

            let spinner = Process()
            spinner.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
            spinner.arguments = ["-c", String(cpu), "sh", "-c", "while :; do :; done"]
            try spinner.run()
            // SIGKILL: the spinner inherits this process's handling of SIGTERM.
            defer { kill(spinner.processIdentifier, SIGKILL); spinner.waitUntilExit() }
            func hostNanoseconds() throws -> Int64 {
                Int64(try Files.read("/proc/\(spinner.processIdentifier)/schedstat").split(separator: " ")[0])!
            }
            try await Task.sleep(for: .milliseconds(200))
            let (session0, host0) = (s.cgroup.usage().cpuNanoseconds, try hostNanoseconds())
            try await Task.sleep(for: .milliseconds(1000))
            let (session1, host1) = (s.cgroup.usage().cpuNanoseconds, try hostNanoseconds())
            kill(spinner.processIdentifier, SIGKILL)
            _ = await s.waitForCommand(pid: hog.pid)
            let (sessionUsed, hostUsed) = (session1 - session0, host1 - host0)
            #expect(hostUsed > 200_000_000, "the host spinner ran \(hostUsed) ns in 1 s")
            #expect(Double(sessionUsed) < Double(hostUsed) * 0.25, "session \(sessionUsed) ns against the host's \(hostUsed) ns on CPU \(cpu)")
        }
    }

    /// `sessionsYieldCPUToHost: false`, and `whileThrottled` until cubicled sees a session throttled:
    /// sessions' parent is at normal weight.
    @Test(arguments: [SessionsCPUYield.never, .whileThrottled])
    func sessionsCompeteWithTheHostAsEquals(_ mode: SessionsCPUYield) async throws {
        try await withHost({ try TestHost(yieldCPUToHost: mode) }) { host in
            _ = try await host.launch()
            guard let idle = host.sessionsCPUIdlePath(test: "sessionsCompeteWithTheHostAsEquals") else { return }
            #expect(try Files.read(idle).trimmingSpaces == "0")
        }
    }

    /// What `whileThrottled` watches: a session spinning past a quarter-CPU quota is throttled, an idle one
    /// is not.
    @Test func aSessionAtItsCPUQuotaCountsThrottledPeriods() async throws {
        try await withHost { host in
            let busy = try await host.launch { $0.limits.cpuQuotaMicros = 2_500; $0.limits.cpuPeriodMicros = 10_000 }
            let quiet = try await host.launch()
            #expect(busy.cgroup.cpuThrottledPeriods() == 0)
            _ = try await busy.sh("timeout 0.5 sh -c 'while :; do :; done'; true")
            let throttled = busy.cgroup.cpuThrottledPeriods()
            #expect(throttled > 5, "a spinner at a quarter of a CPU for 0.5 s: \(throttled) periods throttled")
            #expect(quiet.cgroup.cpuThrottledPeriods() == 0)
        }
    }

    @Test(arguments: RootKind.allCases) func fillingTmpGivesENOSPCOnlyInside(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root, { $0.tmpBytes = 8 << 20 }) else { return }
            let r = try await s.sh("dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1; df -k /tmp | tail -1")
            #expect(r.stdout.contains("No space left on device"))
            guard let other = try await host.launch(root) else { return }
            let ok = try await other.sh("dd if=/dev/zero of=/tmp/fill bs=1M count=4 2>/dev/null && echo wrote")
            #expect(ok.stdout == "wrote\n")
        }
    }

    /// `command.end` (a command's client went away) kills the command's process group, as its timeout does,
    /// and nothing else: init refuses the agent's pid, its own, and a pid that is no command of its.
    @Test func endingACommandKillsItsProcessGroupAndOnlyACommand() async throws {
        try await withHost { host in
            let s = try await host.launch()
            let agent = try await s.startAgent(ProcessParams(argv: ["/bin/sh", "-c", "exec sleep 100"], env: sandboxEnv, cwd: "/home/agent"))
            let p = try await s.runCommand(ProcessParams(argv: ["/bin/sh", "-c", "sleep 200 & sleep 200"], env: sandboxEnv, cwd: "/home/agent"), timeoutSeconds: 600)
            defer { [agent.stdout, agent.stderr, p.stdout, p.stderr].forEach { close($0) } }
            for pid in [agent.pid, 1, p.pid + 1000] {
                await #expect(throws: SandboxError.self, "pid \(pid) is no command") { try await s.endCommand(pid: pid) }
            }
            try await s.endCommand(pid: p.pid)
            let exit = await s.waitForCommand(pid: p.pid)
            #expect(exit.signal == SIGKILL && !exit.timedOut)
            let left = try await s.sh("ps -eo args | grep -c '^sleep 200'; true")
            #expect(left.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0", "the command's whole process group ended")
            let agentLives = try await s.sh("ps -eo args | grep -c '^sleep 100'; true")
            #expect(agentLives.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1", "the agent was not touched")
        }
    }

    @Test func commandTimeoutKillsItsWholeProcessGroup() async throws {
        try await withHost { host in
            let s = try await host.launch()
            let r = try await s.sh("sleep 100 & sleep 100", timeoutSeconds: 1)
            #expect(r.exit.timedOut)
            let left = try await s.sh("ps -e | grep -c 'sleep'; true")
            #expect(left.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
        }
    }
}

@Suite(.enabled(if: isRoot, rootReason))
struct TeardownTests {
    /// memchr for the first byte, memcmp for the rest: fast enough for every process's memory in a debug build.
    static func contains(_ hay: [UInt8], count: Int, _ needle: [UInt8]) -> Bool {
        hay.withUnsafeBytes { h in
            needle.withUnsafeBytes { nd in
                var offset = 0
                while offset + nd.count <= count {
                    guard let p = memchr(h.baseAddress! + offset, Int32(nd[0]), count - offset - nd.count + 1) else { return false }
                    if memcmp(p, nd.baseAddress!, nd.count) == 0 { return true }
                    offset = h.baseAddress!.distance(to: UnsafeRawPointer(p)) + 1
                }
                return false
            }
        }
    }

    /// Regular files under `dir` (small ones; not following symlinks) that contain `needle`.
    static func filesHolding(_ needle: [UInt8], under dir: String, depth: Int) -> [String] {
        guard depth < 12, let names = try? Files.listDirectory(dir) else { return [] }
        var hits: [String] = []
        for name in names {
            let path = dir + "/" + name
            var st = stat()
            guard lstat(path, &st) == 0 else { continue }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                hits += filesHolding(needle, under: path, depth: depth + 1)
            } else if (st.st_mode & S_IFMT) == S_IFREG, st.st_size < 64 << 20, let bytes = try? Files.readBytes(path, limit: 64 << 20),
                      contains(bytes, count: bytes.count, needle) {
                hits.append(path)
            }
        }
        return hits
    }

    /// Every readable mapping of every process but this one, searched for `needle`.
    static func processesHolding(_ needle: [UInt8]) -> [Int32] {
        var found: [Int32] = []
        for name in (try? Files.listDirectory("/proc")) ?? [] {
            guard let pid = Int32(name), pid != getpid() else { continue }
            guard let maps = try? Files.read("/proc/\(pid)/maps", limit: 8 << 20) else { continue }
            let mem = open("/proc/\(pid)/mem", O_RDONLY)
            guard mem >= 0 else { continue }
            defer { close(mem) }
            scan: for line in maps.split(separator: "\n") {
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                guard f.count >= 2, f[1].hasPrefix("r"), !line.hasSuffix("[vvar]"), !line.hasSuffix("[vsyscall]") else { continue }
                let range = f[0].split(separator: "-").compactMap { UInt64($0, radix: 16) }
                guard range.count == 2, range[1] - range[0] <= 256 << 20 else { continue }
                var buf = [UInt8](repeating: 0, count: Int(range[1] - range[0]))
                let n = buf.withUnsafeMutableBytes { pread(mem, $0.baseAddress, $0.count, off_t(range[0])) }
                guard n > 0 else { continue }
                if Self.contains(buf, count: n, needle) { found.append(pid); break scan }
            }
        }
        return found
    }

    @Test(arguments: RootKind.allCases) func teardownLeavesNothingAndTheCanaryIsGone(root: RootKind) async throws {
        try await withHost { host in
            guard let s = try await host.launch(root) else { return }
            // The canary is built inside the sandbox from two halves, so this process never holds it whole.
            let left = "cubicle-canary-\(UInt64.random(in: 0...UInt64.max))"
            let right = "-\(UInt64.random(in: 0...UInt64.max))-end"
            let agent = try await s.startAgent(ProcessParams(argv: ["/bin/sh", "-c", "CANARY=\"$L$R\" exec /app/cubicle-probe hold 60"],
                                                             env: sandboxEnv + ["L=\(left)", "R=\(right)"]))
            var buf = [UInt8](repeating: 0, count: 16)
            _ = read(agent.stdout, &buf, buf.count)
            close(agent.stdout); close(agent.stderr)
            // In an image root, also into the image itself (its writable upper layer): /srv is uid 1000's there.
            let upper = root == .image ? "; echo \"$L$R\" > /srv/canary" : ""
            _ = try await s.sh(("echo \"$L$R\" > /tmp/canary; echo \"$L$R\" > /home/agent/canary; echo \"$L$R\" > /dev/shm/canary" + upper)
                .replacingOccurrences(of: "$L$R", with: left + right))
            let canary = Array((left + right).utf8)
            #expect(!Self.processesHolding(canary).isEmpty, "the canary should be findable while the sandbox lives")
            let hostPIDs = s.cgroup.processes()
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
            #expect(report.wipedFiles >= (root == .image ? 4 : 3))
            #expect(!s.cgroup.exists)
            #expect(!Files.exists(s.stateDirectory))
            #expect(!host.config.uidAllocator.allocated().contains(s.uidRange.slot))
            for pid in hostPIDs { #expect(kill(pid, 0) != 0, "process \(pid) survived teardown") }
            #expect(Self.processesHolding(canary).isEmpty, "the canary is still in some process's memory")
            let hits = ["/tmp", "/run", "/dev/shm", "/var/tmp"].flatMap { Self.filesHolding(canary, under: $0, depth: 0) }
            #expect(hits.isEmpty, "canary found in host file \(hits)")
        }
    }

    @Test func teardownWorksWithAForkBombRunning() async throws {
        try await withHost { host in
            let s = try await host.launch { $0.limits.pids = 64 }
            _ = try await s.runCommand(ProcessParams(argv: ["/bin/sh", "-c", "b() { b | b & }; b"], env: sandboxEnv), timeoutSeconds: 60)
            try await Task.sleep(for: .milliseconds(300))
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
            #expect(!s.cgroup.exists)
        }
    }

    @Test func initKilledEndsTheSandboxAndCleansUp() async throws {
        try await withHost { host in
            let s = try await host.launch()
            kill(s.initPID, SIGKILL)
            var reason: SandboxEndReason?
            for await event in s.events { if case .ended(let r) = event { reason = r } }
            if case .initExited? = reason {} else if case .controlChannelClosed? = reason {} else {
                Issue.record("unexpected end reason \(String(describing: reason))")
            }
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
        }
    }

    @Test func hungAgentIsKilled() async throws {
        try await withHost { host in
            let s = try await host.launch()
            let agent = try await s.startAgent(ProcessParams(argv: ["/bin/sh", "-c", "trap '' TERM; kill -STOP $$"], env: sandboxEnv))
            close(agent.stdout); close(agent.stderr)
            let report = await s.teardown()
            #expect(report.leftovers.isEmpty, "\(report.leftovers)")
        }
    }
}

@Suite(.enabled(if: isRoot, rootReason))
struct FailureTests {
    static func nothingLeft(_ host: TestHost) -> Bool {
        let sandboxes = (try? Files.listDirectory(host.stateDirectory + "/sandboxes")) ?? []
        let cg = Cgroup(version: host.config.cgroupVersion, root: host.config.cgroupRoot, path: host.cgroupParent)
        let children = cg.directories.flatMap { d in ((try? Files.listDirectory(d)) ?? []).filter { $0.hasPrefix("sb-") } }
        return sandboxes.isEmpty && children.isEmpty && host.config.uidAllocator.allocated().isEmpty
    }

    @Test func missingCodeDirectory() async throws {
        try await withHost { host in
            await #expect(throws: SandboxError.self) { _ = try await host.launch { $0.codeDirectory = "/nonexistent/code" } }
            do { _ = try await host.launcher.launch(host.spec { $0.codeDirectory = "/nonexistent/code" }) } catch {
                #expect("\(error)".contains("/nonexistent/code"))
            }
            #expect(Self.nothingLeft(host))
        }
    }

    @Test func missingCommandIsAClearErrorAndTheSandboxLives() async throws {
        try await withHost { host in
            let s = try await host.launch()
            do {
                _ = try await s.startAgent(ProcessParams(argv: ["/app/no-such-agent"], env: sandboxEnv))
                Issue.record("starting a missing command succeeded")
            } catch SandboxError.rpc(let e) {
                #expect(e.step == "exec")
                #expect(e.errno == ENOENT)
            }
            let r = try await s.sh("echo still-here")
            #expect(r.stdout == "still-here\n")
        }
    }

    @Test func badSeccompProfileIsRefused() throws {
        #expect(throws: SeccompError.self) { try SeccompProfile.parse(Array("{not json".utf8)) }
        #expect(throws: SeccompError.self) { try SeccompProfile.parse(Array(#"{"defaultAction":"SCMP_ACT_MAYBE"}"#.utf8)) }
        #expect(throws: SeccompError.self) {
            try SeccompProfile.parse(Array(#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":9,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#.utf8))
        }
        #expect(throws: SeccompError.self) { try SeccompProfile.load(path: "/nonexistent.json") }
    }

    @Test func exhaustedUIDRanges() async throws {
        try await withHost({ try TestHost(uidRangeCount: 1) }) { host in
            let first = try await host.launch()
            do {
                _ = try await host.launch()
                Issue.record("a second sandbox got a range from a pool of one")
            } catch SandboxError.uidRangesExhausted(let n) {
                #expect(n == 1)
            }
            _ = await first.teardown()
            #expect(Self.nothingLeft(host))
            let again = try await host.launch()  // the released range is usable again
            _ = await again.teardown()
        }
    }

    @Test func initThatCannotExecLeavesNothing() async throws {
        try await withHost({ try TestHost(initPath: "/bin/false-not-there") }) { host in
            await #expect(throws: SandboxError.self) { _ = try await host.launch() }
            #expect(Self.nothingLeft(host))
        }
    }
}

/// A stand-in init that misbehaves must end only its own sandbox.
@Suite(.enabled(if: isRoot, rootReason))
struct HostileInitTests {
    static func hostileInit(_ mode: String) throws -> String {
        let path = "/tmp/cubicle-hostile-\(getpid())-\(mode)"
        if !Files.exists(path) {
            try Files.write(path, "#!/bin/sh\nexec \(Paths.probe) hostile-init \(mode)\n", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o755)
        }
        return path
    }

    @Test(arguments: ["garbage", "oversize", "badfd", "nofds"])
    func hostileInitEndsOnlyItsSandbox(mode: String) async throws {
        let script = try Self.hostileInit(mode)
        defer { unlink(script) }
        try await withHost { good in
            let healthy = try await good.launch()
            let hostileHost = try TestHost(initPath: script)
            do {
                let bad = try await hostileHost.launch()
                do {
                    _ = try await bad.connect(port: 8080)
                    Issue.record("a hostile answer was accepted")
                } catch {}
                var reason: SandboxEndReason?
                for await e in bad.events { if case .ended(let r) = e { reason = r } }
                if case .protocolViolation? = reason {} else { Issue.record("ended for \(String(describing: reason))") }
                let report = await bad.teardown()
                #expect(report.leftovers.isEmpty)
            } catch {
                Issue.record("launch failed: \(error)")
            }
            await hostileHost.cleanUp()
            let r = try await healthy.sh("echo fine")
            #expect(r.stdout == "fine\n")
        }
    }

    @Test func initThatNeverSaysReadyTimesOut() async throws {
        let script = try Self.hostileInit("slow")
        defer { unlink(script) }
        try await withHost({ try TestHost(initPath: script) }) { host in
            var spec = host.spec()
            spec.hostname = "slow"
            var config = host.config
            config.readyTimeoutMilliseconds = 300
            let launcher = SandboxLauncher(host: config)
            defer { launcher.shutdown() }
            do {
                _ = try await launcher.launch(spec)
                Issue.record("launch succeeded without ready")
            } catch SandboxError.initTimeout {}
            #expect(FailureTests.nothingLeft(host))
        }
    }
}
