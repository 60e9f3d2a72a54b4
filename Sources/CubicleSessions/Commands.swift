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
/// stream has ended, or until this is dropped unstreamed (the client went away before its response began;
/// the command then runs on inside the sandbox to its timeout).
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
    /// in the caller's task. When `each` throws (the client went away) the readers end with it, closing the
    /// command's output pipes; the call returns once the command has exited, which a writing command does at
    /// once (SIGPIPE) and its timeout bounds otherwise. Once only.
    public func stream(_ each: (CommandEvent) async throws -> Void) async throws {
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
            do {
                for try await event in events { try await each(event) }
            } catch {
                // Sends to a channel nobody reads would wait for ever: the producer is cancelled instead.
                work.cancelAll()
                throw error
            }
        }
    }

    deinit { if !streamed.load(ordering: .relaxed) { session.commandEnded() } }
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
