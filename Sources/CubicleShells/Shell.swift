#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleRPC
import CubicleSandbox
import CubicleSessions
import NIOCore
import NIOPosix
import Synchronization

/// An interactive shell in a session: a process on a terminal of its own inside the sandbox (init opens
/// it, the agent's identity, capabilities, seccomp and environment, as commands get), its master here. The
/// terminal's output waits in a bounded buffer until a client takes it, so a client that drops and comes
/// back within the grace period gets what it missed; while the buffer is full the shell's writes block,
/// so nothing is lost and nothing grows. One client at a time: a new one takes the shell over.
public final class Shell: Sendable {
    public let id: String
    public let session: Session
    let pid: Int32
    /// How long a shell whose client left (without asking to end it) waits for another.
    let graceSeconds: Double

    /// AgentCore replays up to 256 KB of output to a client that reconnects.
    public static let replayBytes = 256 << 10

    /// How long a shell that was hung up has to exit before it is killed (one that ignores SIGHUP).
    static let hangUpSeconds: Double = 5

    /// What a client waiting on the shell is told.
    public enum Event: Sendable {
        case output([UInt8])
        case exited(CommandExit)
        /// Another client took the shell over.
        case kicked
    }

    private struct State {
        /// Output no client has had yet (at most `replayBytes`).
        var pending: [UInt8] = []
        var pumpWaiting: CheckedContinuation<Void, Never>?
        var generation = 0
        var attached = false
        var consumerWaiting: (generation: Int, continuation: CheckedContinuation<Event, Never>)?
        var exit: CommandExit?
        var input: NIOAsyncChannelOutboundWriter<ByteBuffer>?
        /// Keystrokes that came before the terminal's channel was up wait for it.
        var inputWaiting: [CheckedContinuation<NIOAsyncChannelOutboundWriter<ByteBuffer>?, Never>] = []
        var inputClosed = false
        var terminal: (any Channel)?
        /// A descriptor of the master kept for resizes; closed with the terminal (the last one hangs it up).
        var sizeFD: Int32
        var grace: Task<Void, Never>?
        var hungUp = false
        var hangUpWaiter: CheckedContinuation<Void, Never>?
    }
    private let state: Mutex<State>

    init(id: String, session: Session, pid: Int32, master: Int32, graceSeconds: Double) {
        self.id = id
        self.session = session
        self.pid = pid
        self.graceSeconds = graceSeconds
        self.state = Mutex(State(sizeFD: fcntl(master, F_DUPFD_CLOEXEC, 0)))
    }

    /// Hung up or exited: no client can use it any more (one that ignores SIGHUP is killed `hangUpSeconds`
    /// after; a job it left running in another process group is the session's, as a background process is).
    var isOver: Bool { state.withLock { $0.exit != nil || $0.hungUp } }

    /// Runs the shell's life in a task of its own: output pumped from the terminal, the exit awaited. It
    /// needs no owner to end it: the shell's exit ends it, and a hang-up (the client's close, the grace
    /// period, the session's end) brings the exit, by SIGHUP or, for a shell that ignores it, by init's
    /// SIGKILL `hangUpSeconds` later. `ended` is called once, after the exit and the output that came
    /// before it.
    func start(master: Int32, group: any EventLoopGroup, ended: @escaping @Sendable (Shell) -> Void) {
        enum Part { case pump, drained, enforcer }
        Task {
            let exit = await withTaskGroup(of: Part.self) { work -> CommandExit in
                work.addTask { await self.pump(master: master, group: group); return .pump }
                work.addTask {
                    await self.untilHungUp()
                    try? await Task.sleep(nanoseconds: UInt64(Self.hangUpSeconds * 1e9))
                    if !Task.isCancelled { try? await self.session.sandbox.endCommand(pid: self.pid) }
                    return .enforcer
                }
                let exit = await self.session.sandbox.waitForCommand(pid: self.pid)
                // Output still in the terminal is read; a background process holding it open is not waited for.
                work.addTask { try? await Task.sleep(nanoseconds: 200_000_000); return .drained }
                while let part = await work.next(), part == .enforcer {}
                work.cancelAll()
                self.closeTerminal()
                return exit
            }
            self.finish(exit)
            ended(self)
        }
    }

    private func pump(master: Int32, group: any EventLoopGroup) async {
        let copy = fcntl(master, F_DUPFD_CLOEXEC, 0)
        let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
        do {
            channel = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptors(input: master, output: copy) { ch in
                ch.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: ch) }
            }
        } catch {
            close(copy)
            closeInput()
            return
        }
        defer { closeInput() }
        try? await channel.executeThenClose { inbound, outbound in
            let (waiting, hungUp) = state.withLock { s in
                s.input = outbound
                s.terminal = channel.channel
                defer { s.inputWaiting = [] }
                return (s.inputWaiting, s.hungUp)
            }
            waiting.forEach { $0.resume(returning: outbound) }
            // Hung up before the terminal's channel was up: closing it now is the hang-up.
            if hungUp { channel.channel.close(promise: nil) }
            for try await buffer in inbound {
                await roomForOutput()
                let waiter = state.withLock { s -> CheckedContinuation<Event, Never>? in
                    s.pending += buffer.readableBytesView
                    defer { s.consumerWaiting = nil }
                    return s.consumerWaiting?.continuation
                }
                waiter?.resume(returning: .output(takeable()))
                try Task.checkCancellation()
            }
        }
    }

    /// Waits while the buffer is full: the terminal's reads stop, and then the shell's writes.
    private func roomForOutput() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { c in
                let full = state.withLock { s -> Bool in
                    guard s.pending.count >= Self.replayBytes, s.exit == nil else { return false }
                    s.pumpWaiting = c
                    return true
                }
                if !full { c.resume() }
            }
        } onCancel: {
            state.withLock { s in defer { s.pumpWaiting = nil }; return s.pumpWaiting }?.resume()
        }
    }

    /// What a client may take at once: a frame's worth.
    private func takeable() -> [UInt8] { state.withLock { Array($0.pending.prefix(Self.maxChunk)) } }
    static let maxChunk = (64 << 10) - 1

    private func finish(_ exit: CommandExit) {
        let (waiter, pumpWaiter, pending) = state.withLock { s -> (CheckedContinuation<Event, Never>?, CheckedContinuation<Void, Never>?, Bool) in
            s.exit = exit
            s.grace?.cancel()
            defer { s.consumerWaiting = nil; s.pumpWaiting = nil }
            return (s.consumerWaiting?.continuation, s.pumpWaiting, !s.pending.isEmpty)
        }
        pumpWaiter?.resume()
        waiter?.resume(returning: pending ? .output(takeable()) : .exited(exit))
        session.commandEnded()
    }

    // MARK: - For the client attached

    /// Makes the caller the shell's client; the one before it (if any) is told it was taken over.
    func attach() -> Int {
        let (generation, kicked) = state.withLock { s -> (Int, CheckedContinuation<Event, Never>?) in
            s.generation += 1
            s.attached = true
            s.grace?.cancel()
            s.grace = nil
            defer { s.consumerWaiting = nil }
            return (s.generation, s.consumerWaiting?.continuation)
        }
        kicked?.resume(returning: .kicked)
        return generation
    }

    /// The next output (left in the buffer until `delivered`), the exit once all output is delivered, or
    /// `kicked`.
    func next(_ generation: Int) async -> Event {
        await withTaskCancellationHandler {
            await withCheckedContinuation { c in
                let ready = state.withLock { s -> Event? in
                    if s.generation != generation { return .kicked }
                    if !s.pending.isEmpty { return .output(Array(s.pending.prefix(Self.maxChunk))) }
                    if let exit = s.exit { return .exited(exit) }
                    s.consumerWaiting = (generation, c)
                    return nil
                }
                if let ready { c.resume(returning: ready) }
            }
        } onCancel: {
            state.withLock { s -> CheckedContinuation<Event, Never>? in
                guard s.consumerWaiting?.generation == generation else { return nil }
                defer { s.consumerWaiting = nil }
                return s.consumerWaiting?.continuation
            }?.resume(returning: .kicked)
        }
    }

    /// The client has `count` bytes of what `next` gave it: they leave the buffer.
    func delivered(_ count: Int, _ generation: Int) {
        let pump = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard s.generation == generation else { return nil }
            s.pending.removeFirst(min(count, s.pending.count))
            guard s.pending.count < Shell.replayBytes, let waiting = s.pumpWaiting else { return nil }
            s.pumpWaiting = nil
            return waiting
        }
        pump?.resume()
    }

    /// The client left without ending the shell: another may take it within the grace period, after which
    /// the shell is hung up.
    func detach(_ generation: Int) {
        state.withLock { s in
            guard s.generation == generation, s.exit == nil else { return }
            s.attached = false
            let grace = graceSeconds
            s.grace = Task { [weak self] in
                try? await Task.sleep(nanoseconds: UInt64(grace * 1e9))
                guard !Task.isCancelled, let self else { return }
                if self.state.withLock({ $0.generation == generation && !$0.attached }) { self.hangUp() }
            }
        }
    }

    /// Keyboard input; waits while the terminal takes no more (or is not up yet).
    func write(_ bytes: ArraySlice<UInt8>) async throws {
        let input = await withCheckedContinuation { c in
            let ready = state.withLock { s -> NIOAsyncChannelOutboundWriter<ByteBuffer>?? in
                if let input = s.input { return .some(input) }
                if s.inputClosed { return .some(nil) }
                s.inputWaiting.append(c)
                return nil
            }
            if let ready { c.resume(returning: ready) }
        }
        try await input?.write(ByteBuffer(bytes: bytes))
    }

    private func closeInput() {
        let waiting = state.withLock { s in
            s.input = nil
            s.inputClosed = true
            defer { s.inputWaiting = [] }
            return s.inputWaiting
        }
        waiting.forEach { $0.resume(returning: nil) }
    }

    func resize(rows: Int, cols: Int) {
        state.withLock { s in
            if s.sizeFD >= 0 { _ = cubicle_set_window_size(s.sizeFD, UInt16(rows), UInt16(cols)) }
        }
    }

    /// Ends the shell as a terminal's close does: the shell's session gets SIGHUP.
    public func hangUp() { closeTerminal() }

    private func closeTerminal() {
        let (terminal, fd, waiter) = state.withLock { s -> ((any Channel)?, Int32, CheckedContinuation<Void, Never>?) in
            defer { s.sizeFD = -1; s.terminal = nil; s.hungUp = true; s.hangUpWaiter = nil }
            return (s.terminal, s.sizeFD, s.hangUpWaiter)
        }
        if fd >= 0 { close(fd) }
        terminal?.close(promise: nil)
        waiter?.resume()
    }

    /// Returns once the shell is hung up (or the caller is cancelled).
    private func untilHungUp() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { c in
                let now = state.withLock { s -> Bool in
                    if s.hungUp || Task.isCancelled { return true }
                    s.hangUpWaiter = c
                    return false
                }
                if now { c.resume() }
            }
        } onCancel: {
            state.withLock { s in defer { s.hangUpWaiter = nil }; return s.hangUpWaiter }?.resume()
        }
    }
}
