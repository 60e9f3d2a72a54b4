#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC
import Synchronization

/// The daemon's end of init's fork server (`Sources/CubicleInit/ForkServer.swift`): cubicle-init started
/// once, which clones a new init for each sandbox instead of the daemon exec'ing one. Started on first use
/// and again if it dies; one request at a time (a fork takes a fraction of a millisecond).
///
/// When the init binary does not answer as a fork server (a stand-in init, a server that cannot start),
/// `fork` returns nil and the launcher execs init itself, as it does with the fork server turned off.
public final class InitForkServer: @unchecked Sendable {
    private struct Server {
        var pid: pid_t
        var socket: Int32
    }
    private struct State {
        var server: Server?
        var unavailable: String?
    }
    /// Held across a whole request: the socket carries one exchange at a time.
    private let state = Mutex(State())
    let initPath: String
    let timeoutMilliseconds: Int32

    init(initPath: String, timeoutMilliseconds: Int) {
        self.initPath = initPath
        self.timeoutMilliseconds = Int32(clamping: timeoutMilliseconds)
    }

    deinit {
        state.withLock { if let server = $0.server { Self.stop(server) } }
    }

    /// The running server's pid, if one runs.
    public var serverPID: pid_t? { state.withLock { $0.server?.pid } }

    /// Why the fork server is not used, once it has failed to start; nil while it is (or may yet be).
    public var unavailableReason: String? { state.withLock { $0.unavailable } }

    /// Starts the server now rather than at the first launch. False if it cannot start.
    @discardableResult
    public func start() -> Bool {
        state.withLock { s in
            if s.server == nil && s.unavailable == nil { s.server = startServer(&s) }
            return s.server != nil
        }
    }

    /// Ends the server (no more launches will use it; the next one would start it again).
    public func stop() {
        state.withLock { s in
            if let server = s.server { Self.stop(server) }
            s.server = nil
        }
    }

    /// One init, made from `request` and init's `configuration` (its JSON) with `fds` (see `ForkRequest`).
    /// nil: no fork server, exec instead.
    func fork(_ request: ForkRequest, configuration: [UInt8], fds: [Int32]) throws(SandboxError) -> pid_t? {
        let payload = ForkRequest.message(request: Array(request.json.text.utf8), configuration: configuration)
        return try state.withLock { (s: inout State) throws(SandboxError) -> pid_t? in
            // A server that died since the last request gets one restart for this one.
            for attempt in 0..<2 {
                if s.server == nil, s.unavailable == nil { s.server = startServer(&s) }
                guard let server = s.server else { return nil }
                switch exchange(server, payload, fds: fds) {
                case .reply(let reply):
                    if reply.unreaped > 0 { Self.reap(reply.unreaped) }
                    if reply.pid > 0 { return reply.pid }
                    if reply.step == Int32(CUBICLE_STEP_PREPARE.rawValue) {
                        throw .spawn(step: "write id maps or join cgroup", errno: reply.errno)
                    }
                    throw .childFailed(step: reply.step, errno: reply.errno, index: reply.index, sources: request.sources)
                case .broken(let why):
                    Self.stop(server)
                    s.server = nil
                    if attempt == 1 { throw .spawn(step: "fork server: \(why)", errno: EPIPE) }
                }
            }
            return nil
        }
    }

    private enum Outcome {
        case reply(ForkReply)
        case broken(String)
    }

    private func exchange(_ server: Server, _ payload: [UInt8], fds: [Int32]) -> Outcome {
        do {
            let sent = try Descriptors.send(server.socket, payload[...], fds: fds)
            guard sent == payload.count else { return .broken("request cut short") }
        } catch {
            return .broken("\(error)")
        }
        guard Self.waitReadable(server.socket, timeoutMilliseconds) else { return .broken("no answer in \(timeoutMilliseconds) ms") }
        var buffer = [UInt8](repeating: 0, count: 64)
        var stray: [Int32] = []
        defer { stray.forEach { _ = close($0) } }
        guard let n = try? Descriptors.receive(server.socket, into: &buffer, fds: &stray).count else { return .broken("receive failed") }
        guard n > 0 else { return .broken("it exited") }
        guard let reply = ForkReply(bytes: buffer[0..<n]) else { return .broken("malformed answer") }
        return .reply(reply)
    }

    /// posix_spawn, not the sandbox clone: the server runs in the daemon's own namespaces, as root, with
    /// only its socket (fd 3) and /dev/null for stdio.
    private func startServer(_ s: inout State) -> Server? {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            s.unavailable = "socketpair: \(SystemError.lastError("socketpair"))"
            return nil
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd: Int32 in 0...2 { posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", O_RDWR, 0) }
        posix_spawn_file_actions_adddup2(&actions, pair[1], ForkRequest.serverFD)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var pid: pid_t = 0
        let rc = withCStrings(SandboxLauncher.initArguments) { argv in
            withCStrings(SandboxLauncher.initEnvironment + ["\(ForkReply.environmentKey)=1"]) { envp in
                posix_spawn(&pid, initPath, &actions, &attributes, argv, envp)
            }
        }
        close(pair[1])
        guard rc == 0 else {
            close(pair[0])
            s.unavailable = "spawn \(initPath): \(SystemError("posix_spawn", errno: rc))"
            return nil
        }
        let server = Server(pid: pid, socket: pair[0])
        var hello = [UInt8](repeating: 0, count: 64)
        var stray: [Int32] = []
        defer { stray.forEach { _ = close($0) } }
        // It says hello within a few milliseconds; a stand-in init may never say anything.
        guard Self.waitReadable(pair[0], min(timeoutMilliseconds, 2000)),
              let n = try? Descriptors.receive(pair[0], into: &hello, fds: &stray).count,
              Array(hello[0..<n]) == ForkReply.hello else {
            Self.stop(server)
            s.unavailable = "\(initPath) did not answer as a fork server"
            return nil
        }
        return server
    }

    private static func waitReadable(_ fd: Int32, _ timeoutMilliseconds: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while true {
            let r = poll(&p, 1, timeoutMilliseconds)
            if r < 0 && errno == EINTR { continue }
            return r > 0
        }
    }

    /// Its socket closed, the server exits; a hung one is killed.
    private static func stop(_ server: Server) {
        close(server.socket)
        kill(server.pid, SIGKILL)
        reap(server.pid)
    }

    private static func reap(_ pid: pid_t) {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }
}
