#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleLinux
import CubicleRuntimes
import CubicleSandbox
import CubicleSessions
import Foundation
import Logging
import NIOPosix
import Synchronization
import Testing

/// The session registry against real sandboxes and the demo agent: racing first calls make one sandbox,
/// the quota and unknown names are its own typed errors, a new session claims a warm sandbox.
@Suite(.enabled(if: getuid() == 0, "needs root: the registry launches real sandboxes"))
struct RegistryTests {
    /// The built products (cubicle-init, the demo agent) beside the test bundle.
    static let products: String = {
        var dir = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]).deletingLastPathComponent()
        while dir.path != "/" && !FileManager.default.fileExists(atPath: dir.appendingPathComponent("cubicle-init").path) { dir = dir.deletingLastPathComponent() }
        return dir.path
    }()

    /// A registry of its own (state directory, cgroup parent, uid ids), ended and removed afterwards.
    static func withRegistry(maxSessions: Int = 10, warmPool: Int = 0, healthPollSeconds: Double = 0.2, limits: String = "{memory: 256MiB}",
                             _ body: (SessionManager) async throws -> Void) async throws {
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var host = SandboxHostConfig(initPath: products + "/cubicle-init", stateDirectory: "/tmp/cubicle-registry-\(tag)", cgroupParent: "cubicle-registry-\(tag)")
        host.firstHostID = 1_900_000_000 - UInt32.random(in: 0..<1000) * 65536 * 16
        host.uidRangeCount = 16
        let config = try DaemonConfig.parse(yaml: """
            maxSessions: \(maxSessions)
            lifecycleMinimumSeconds: 1
            healthPollSeconds: \(healthPollSeconds)
            runtimes:
              - name: demo
                command: [/app/cubicle-demo-agent]
                codeDirectory: \(products)
                limits: \(limits)
                warmPool: \(warmPool)
            """)
        let launcher = SandboxLauncher(host: host)
        let manager = SessionManager(config: config, launcher: launcher, seccompProgram: try SeccompProfile.embeddedDefault.compile(),
                                     group: MultiThreadedEventLoopGroup.singleton, logger: Logger(label: "registry-test"))
        func cleanUp() async {
            await manager.shutdown()
            launcher.shutdown()
            for d in Cgroup(version: host.cgroupVersion, root: host.cgroupRoot, path: host.cgroupParent).directories { rmdir(d) }
            try? Files.removeTree(host.stateDirectory)
        }
        do { try await body(manager) } catch { await cleanUp(); throw error }
        await cleanUp()
    }

    static func sessionID() -> String { "registry-" + UUID().uuidString }

    @Test func racingFirstCallsMakeOneSandbox() async throws {
        try await Self.withRegistry { manager in
            let id = Self.sessionID()
            let sessions = try await withThrowingTaskGroup(of: Session.self) { group in
                for _ in 0..<8 { group.addTask { try await manager.acquire(runtime: "demo", sessionID: id) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(Set(sessions.map { ObjectIdentifier($0) }).count == 1)
            #expect(manager.launcher.host.state.sandboxIDs() == [sessions[0].sandbox.id])
            #expect(await manager.liveCount == 1)
        }
    }

    /// Every task a session started (log drains, the event watch, the lifecycle with its /ping polls and
    /// sleeps) has ended once the session has: stopped by a client, or its agent gone. The lifecycle sleeps
    /// 60 s between polls here, so only its cancellation ends it within the 40 s allowed. (The session's
    /// teardown is part of what is waited for, and takes seconds in a loaded parallel suite: with 30 s and
    /// 10 s, the suite's own load once outlasted the window.)
    @Test(arguments: ["stop", "agent exit"]) func aSessionsTasksEndWithIt(how: String) async throws {
        try await Self.withRegistry(healthPollSeconds: 60) { manager in
            let id = Self.sessionID()
            let session = try await manager.acquire(runtime: "demo", sessionID: id)
            if how == "stop" {
                try await manager.stop(runtime: "demo", sessionID: id)
            } else {
                // The agent: every process of the sandbox but init.
                for pid in session.sandbox.cgroup.processes() where pid != session.sandbox.initPID { kill(pid, SIGKILL) }
            }
            let ended = await withTaskGroup(of: Bool.self) { group in
                group.addTask { await session.supervisionEnded(); return true }
                group.addTask { try? await Task.sleep(for: .seconds(40)); return false }
                defer { group.cancelAll() }
                return await group.next() ?? false
            }
            #expect(ended, "the session's tasks outlived it")
            #expect(!session.isLive)
        }
    }

    @Test func theQuotaAndUnknownNamesAreTypedErrors() async throws {
        try await Self.withRegistry(maxSessions: 2) { manager in
            _ = try await manager.acquire(runtime: "demo", sessionID: Self.sessionID())
            _ = try await manager.acquire(runtime: "demo", sessionID: Self.sessionID())
            await #expect(throws: SessionError.quotaReached(2)) { try await manager.acquire(runtime: "demo", sessionID: Self.sessionID()) }
            await #expect(throws: SessionError.runtimeNotFound("other")) { try await manager.acquire(runtime: "other", sessionID: Self.sessionID()) }
            let unknown = Self.sessionID()
            await #expect(throws: SessionError.sessionNotFound(unknown)) { try await manager.stop(runtime: "demo", sessionID: unknown) }
            #expect(await manager.liveCount == 2, "refusals start nothing")
        }
    }

    @Test func aNewSessionClaimsAWarmSandboxAndThePoolRefills() async throws {
        try await Self.withRegistry(warmPool: 1) { manager in
            await manager.startWarmPools()
            var warm: [Session] = []
            for _ in 0..<200 {
                warm = await manager.warmSessions
                if !warm.isEmpty { break }
                try await Task.sleep(for: .milliseconds(25))
            }
            let waiting = try #require(warm.first, "no warm sandbox within 5 s")
            // Racing first calls for one id share one claim: one session, the warm sandbox.
            let id = Self.sessionID()
            let sessions = try await withThrowingTaskGroup(of: Session.self) { group in
                for _ in 0..<8 { group.addTask { try await manager.acquire(runtime: "demo", sessionID: id) } }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(Set(sessions.map { ObjectIdentifier($0) }).count == 1)
            let session = sessions[0]
            #expect(session.sandbox.id == waiting.sandbox.id, "the first call took the warm sandbox")
            #expect(session.id == id && !session.isWarm)
            var refilled = false
            for _ in 0..<200 where !refilled {
                refilled = await manager.warmSessions.contains { $0.sandbox.id != waiting.sandbox.id }
                if !refilled { try await Task.sleep(for: .milliseconds(25)) }
            }
            #expect(refilled, "the pool made another")
        }
    }

    /// A runtime's limits reach its sessions as the kernel enforces them: the descriptor and process limits
    /// a command in the session sees are the runtime's, not the host's defaults.
    @Test func aRuntimesLimitsAreTheSessionsRlimits() async throws {
        try await Self.withRegistry(limits: "{memory: 256MiB, openFiles: 777, pids: 99}") { manager in
            let session = try await manager.acquire(runtime: "demo", sessionID: Self.sessionID())
            let running = try await session.runCommand(CommandRequest(command: "cat /proc/self/limits", timeoutSeconds: 10),
                                                       group: MultiThreadedEventLoopGroup.singleton)
            var out = ""
            try await running.stream { if case .stdout(let text) = $0 { out += text } }
            // "Max open files  777  777  files": the soft limit after the name.
            func soft(_ name: String) -> String? {
                out.split(separator: "\n").first { $0.hasPrefix(name) }
                    .map { $0.dropFirst(name.count).split(separator: " ").first.map(String.init) ?? "" }
            }
            #expect(soft("Max open files") == "777", "\(out)")
            #expect(soft("Max processes") == "99", "\(out)")
        }
    }

    /// How many processes in `session` carry `marker` in their arguments (the counting command's own do not).
    static func count(_ marker: String, in session: Session) async throws -> String {
        let running = try await session.runCommand(CommandRequest(command: "ps -eo args | grep -c '[\(marker.first!)]\(marker.dropFirst())'; true", timeoutSeconds: 10),
                                                   group: MultiThreadedEventLoopGroup.singleton)
        var out = ""
        try await running.stream { if case .stdout(let text) = $0 { out += text } }
        return out.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    static func waitUntilGone(_ marker: String, in session: Session) async throws {
        for _ in 0..<100 {
            if try await count(marker, in: session) == "0" { return }
            try await Task.sleep(nanoseconds: 100_000_000)
        }
        Issue.record("\(try await count(marker, in: session)) processes of the command outlived its client")
    }

    /// A command dropped before its output was streamed (its client left before the response began) is
    /// ended, not left to its timeout, and the session is idle again once init has reaped it.
    @Test func aCommandDroppedUnstreamedIsEndedAndTheSessionGoesIdle() async throws {
        try await Self.withRegistry { manager in
            let session = try await manager.acquire(runtime: "demo", sessionID: Self.sessionID())
            let marker = "u" + UUID().uuidString.prefix(8).lowercased()
            var running: RunningCommand? = try await session.runCommand(CommandRequest(command: "sleep 300; : \(marker)", timeoutSeconds: 600),
                                                                        group: MultiThreadedEventLoopGroup.singleton)
            #expect(try await Self.count(marker, in: session) == "1")
            #expect(session.lifecycle.commandsRunning == 1)
            _ = running
            running = nil
            try await Self.waitUntilGone(marker, in: session)
            for _ in 0..<100 where session.lifecycle.commandsRunning != 0 { try await Task.sleep(nanoseconds: 20_000_000) }
            #expect(session.lifecycle.commandsRunning == 0, "the session is idle again")
        }
    }

    /// A quiet command whose client has left (the probe says so) is ended while it streams.
    @Test func aCommandWhoseClientLeftIsEndedWhileItStreams() async throws {
        try await Self.withRegistry { manager in
            let session = try await manager.acquire(runtime: "demo", sessionID: Self.sessionID())
            let marker = "l" + UUID().uuidString.prefix(8).lowercased()
            let running = try await session.runCommand(CommandRequest(command: "echo started; sleep 300; : \(marker)", timeoutSeconds: 600),
                                                       group: MultiThreadedEventLoopGroup.singleton)
            let left = Atomic<Bool>(false)
            var events: [String] = []
            try await running.stream(clientLeft: { left.load(ordering: .relaxed) }) { event in
                switch event {
                case .stdout: left.store(true, ordering: .relaxed); events.append("stdout")
                case .stop(let code, let timedOut): events.append("stop \(code) \(timedOut)")
                default: break
                }
            }
            #expect(events == ["stdout", "stop 137 false"], "killed (128 + 9), not timed out")
            #expect(try await Self.count(marker, in: session) == "0")
        }
    }
}
