#if canImport(Glibc)
import Glibc
#endif
import AsyncAlgorithms
import CubicleAgentCore
import CubicleRPC
import CubicleSandbox
import NIOCore
import Synchronization

extension Session {
    /// Starts `sh -c command` in the session with the agent's identity, environment and filesystem. Its
    /// output is streamed by the caller (`RunningCommand.stream`), in the caller's task.
    public func runCommand(_ request: CommandRequest, group: any EventLoopGroup) async throws(SessionError) -> RunningCommand {
        commandStarted()
        let process: StartedProcess
        do {
            process = try await sandbox.runCommand(
                ProcessParams(argv: ["/bin/sh", "-c", request.command], env: environment, cwd: InitConfig.agentHome),
                timeoutSeconds: request.timeoutSeconds)
        } catch {
            commandEnded()
            throw .couldNotStart("Command could not start: \(error)")
        }
        return RunningCommand(session: self, process: process, group: group)
    }
}

/// A command started in a session, its output not yet streamed. The session counts as busy until the
/// stream has ended, or until this is dropped unstreamed. A command whose client goes away is ended (init
/// kills its process group), whether it went before the response began or during it.
public final class RunningCommand: Sendable {
    private let session: Session
    private let process: StartedProcess
    private let group: any EventLoopGroup
    private let streamed = Atomic<Bool>(false)

    init(session: Session, process: StartedProcess, group: any EventLoopGroup) {
        self.session = session
        self.process = process
        self.group = group
    }

    /// Hands the command's events to `each` as InvokeAgentRuntimeCommand orders them (start, deltas, stop),
    /// in the caller's task. When `each` throws, or `clientLeft` says so (checked a few times a second: a
    /// command that prints nothing would otherwise never learn), the command is ended and the readers with
    /// it; the call returns once init has reaped it. Once only.
    public func stream(clientLeft: (@Sendable () -> Bool)? = nil, _ each: (CommandEvent) async throws -> Void) async throws {
        guard !streamed.exchange(true, ordering: .relaxed) else { throw SessionError.unexpected("a command's output is streamed once") }
        defer { session.commandEnded() }
        let process = self.process, group = self.group, sandbox = session.sandbox
        try await withThrowingTaskGroup(of: Void.self) { work in
            let events = AsyncThrowingChannel<CommandEvent, any Error>()
            work.addTask {
                await events.send(.start)
                let exit = await withTaskGroup(of: Bool.self) { readers -> CommandExit in
                    readers.addTask { await Session.pump(fd: process.stdout, group: group) { await events.send(.stdout($0)) }; return true }
                    readers.addTask { await Session.pump(fd: process.stderr, group: group) { await events.send(.stderr($0)) }; return true }
                    let exit = await sandbox.waitForCommand(pid: process.pid)
                    // Output still in the pipes is read; a background child holding them open is not waited for.
                    readers.addTask { try? await Task.sleep(nanoseconds: 200_000_000); return false }
                    var finished = 0
                    while let readerDone = await readers.next(), readerDone {
                        finished += 1
                        if finished == 2 { break }
                    }
                    readers.cancelAll()
                    return exit
                }
                let code = exit.exitCode.map(Int.init) ?? (128 + Int(exit.signal ?? 9))
                await events.send(.stop(exitCode: code, timedOut: exit.timedOut))
                events.finish()
            }
            if let clientLeft {
                work.addTask {
                    while !Task.isCancelled {
                        if clientLeft() {
                            try? await sandbox.endCommand(pid: process.pid)
                            return
                        }
                        try? await Task.sleep(nanoseconds: 250_000_000)
                    }
                }
            }
            do {
                for try await event in events { try await each(event) }
                work.cancelAll()  // the watch; the producer has finished
            } catch {
                // Nobody is left to read what it does: it ends now rather than at its timeout. Sends to a
                // channel nobody reads would wait for ever: the producer is cancelled too.
                try? await sandbox.endCommand(pid: process.pid)
                work.cancelAll()
                throw error
            }
        }
    }

    deinit {
        guard !streamed.load(ordering: .relaxed) else { return }
        // Dropped unstreamed: the client went before its response began. Nothing will read the output
        // pipes, so they close here; the command is ended and its exit collected by a task that ends with
        // it (deinit cannot wait), and only then is the session idle again.
        let session = self.session, pid = process.pid
        close(process.stdout)
        close(process.stderr)
        Task {
            try? await session.sandbox.endCommand(pid: pid)
            _ = await session.sandbox.waitForCommand(pid: pid)
            session.commandEnded()
        }
    }
}

extension Session {
    /// Reads a pipe from inside the sandbox as UTF-8 text chunks until EOF or cancellation.
    static func pump(fd: Int32, group: any EventLoopGroup, _ deliver: @escaping @Sendable (String) async -> Void) async {
        var text = UTF8Chunker()
        await readSandboxPipe(fd: fd, group: group) { bytes in
            let chunk = text.feed(bytes)
            if !chunk.isEmpty { await deliver(chunk) }
        }
        let rest = text.finish()
        if !rest.isEmpty { await deliver(rest) }
    }
}
