import AsyncAlgorithms
import CubicleAgentCore
import CubicleRPC
import CubicleSandbox
import NIOCore

extension Session {
    /// Runs `sh -c command` in the session with the agent's identity, environment and filesystem, and
    /// streams its output as InvokeAgentRuntimeCommand events: start, deltas, stop.
    public func runCommand(_ request: CommandRequest, group: any EventLoopGroup) async throws(SessionError) -> AsyncThrowingChannel<CommandEvent, any Error> {
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
        let events = AsyncThrowingChannel<CommandEvent, any Error>()
        let sandbox = self.sandbox
        Task {
            defer { self.commandEnded() }
            await events.send(.start)
            let exit = await withTaskGroup(of: Bool.self) { readers -> CommandExit in
                readers.addTask { await Self.pump(fd: process.stdout, group: group) { await events.send(.stdout($0)) }; return true }
                readers.addTask { await Self.pump(fd: process.stderr, group: group) { await events.send(.stderr($0)) }; return true }
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
        return events
    }

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
