#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC

/// PID 1 of a sandbox: builds the filesystem, then serves the control channel, reaps every child,
/// forwards termination to the agent, and reports exits. One thread, one poll loop.
public struct InitServer {
    var channel: BlockingChannel
    var supervisor: Supervisor?
    var signalFD: Int32 = -1
    var terminating = false
    /// Where a restarted daemon connects; -1 when the host gave none or reconnecting is off.
    var reconnectFD: Int32 = -1
    var reconnectMilliseconds: Int64 = 0
    /// Set while no daemon is connected: the time by which one must be, or the sandbox ends.
    var orphanedUntil: Int64?
    /// init's own copies of the agent's stdout and stderr read ends: the pipes stay open (no SIGPIPE for the
    /// agent) while no daemon is connected, and a new daemon gets them again.
    var agentLogs: (Int32, Int32)?
    static let handledSignals: [Int32] = [SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT]

    /// As the daemon starts it: one sandbox's init, or (`CUBICLE_INIT_FORK_SERVER` set) the fork server
    /// that clones a new init for each sandbox.
    public static func main() -> Never {
        if getenv(ForkReply.environmentKey) != nil { ForkServer.serve() }
        serveSandbox()
    }

    /// `config`: given by the fork server, already parsed; nil: the first frame on the control socket.
    /// `fromTemplate`: the clone starts in a copy of a template namespace (see `Template`).
    static func serveSandbox(config: InitConfig? = nil, fromTemplate: Bool = false) -> Never {
        var server = InitServer()
        server.run(given: config, fromTemplate: fromTemplate)
    }

    init() {
        channel = BlockingChannel(fd: InitConfig.controlFD)
    }

    /// CLOCK_MONOTONIC is not namespaced here, so the host can set these beside its own marks.
    static func monotonicNanoseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    /// The first frame: the host queues configure before we exist; a large one may take more than one read.
    mutating func receiveConfiguration() -> InitConfig {
        do {
            var first = try channel.receive()
            while first == nil { first = try channel.receive() }
            guard case (.notification(RPCMethod.configure, let params, _), _)? = first else {
                fail(SystemError("first message is not \(RPCMethod.configure)", errno: EPROTO))
            }
            return try InitConfig(json: params)
        } catch let e as RPCError {
            fail(SystemError("configure: \(e.message)", errno: EINVAL))
        } catch {
            fail(SystemError("configure: \(error)", errno: EPROTO))
        }
    }

    /// The second frame of an image sandbox: exactly `count` mount descriptors, nothing else.
    mutating func receiveLayers(count: Int) -> [Int32] {
        do {
            var next = try channel.receive()
            while next == nil { next = try channel.receive() }
            guard case (.notification(RPCMethod.imageLayers, _, _), let fds)? = next, fds.count == count else {
                fail(SystemError("second message is not \(count) image layers", errno: EPROTO))
            }
            return fds
        } catch {
            fail(SystemError("image layers: \(error)", errno: EPROTO))
        }
    }

    mutating func run(given: InitConfig?, fromTemplate: Bool) -> Never {
        let started = Self.monotonicNanoseconds()
        let config = given ?? receiveConfiguration()
        let configured = Self.monotonicNanoseconds()
        do {
            let filesystem = RootFilesystem(config: config)
            if config.imageLayers > 0 {
                let layers = receiveLayers(count: config.imageLayers)
                try filesystem.buildImage(layers: layers)
                layers.forEach { _ = close($0) }
            } else if fromTemplate {
                try filesystem.buildFromTemplate()
            } else {
                try filesystem.build()
            }
        } catch {
            fail(error)
        }
        // Bind sources were only needed to build the tree; nothing inside may keep a handle on the host.
        cubicle_close_from(InitConfig.firstSourceFD)
        // Made after the sources are closed, or close_from would take it with them.
        var sigs = Self.handledSignals
        signalFD = cubicle_signalfd(&sigs, Int32(sigs.count))
        guard signalFD >= 0 else { fail(SystemError.lastError("signalfd")) }
        supervisor = Supervisor(config: config)
        reconnectMilliseconds = config.reconnectSeconds * 1000
        if reconnectMilliseconds > 0 && fcntl(InitConfig.reconnectFD, F_GETFD) >= 0 {
            reconnectFD = InitConfig.reconnectFD
            _ = fcntl(reconnectFD, F_SETFD, FD_CLOEXEC)
        } else {
            close(InitConfig.reconnectFD)
        }
        let built = Self.monotonicNanoseconds()
        notify(.ready(timings: [started, configured, built].map { UInt64(clamping: $0) }))
        loop()
    }

    mutating func notify(_ notification: InitNotification) {
        send(.notification(method: notification.method, params: notification.params, fds: 0))
    }

    mutating func send(_ message: RPCMessage, fds: [Int32] = []) {
        guard orphanedUntil == nil else { return }  // nobody to tell; a new daemon asks for the status
        do { try channel.send(message, fds: fds) } catch { disconnected(status: 3) }
    }

    /// The daemon is gone. Without a reconnect socket the sandbox ends; with one it waits for a new daemon.
    mutating func disconnected(status: Int32) {
        guard reconnectFD >= 0, !terminating else { exitAll(status: status) }
        close(channel.fd)
        channel = BlockingChannel(fd: -1)
        orphanedUntil = now() + reconnectMilliseconds
    }

    mutating func acceptDaemon() {
        let fd = accept(reconnectFD, nil, nil)
        guard fd >= 0 else { return }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)  // one thread: nothing can exec in between
        channel = BlockingChannel(fd: fd)
        orphanedUntil = nil
    }

    func fail(_ error: SystemError) -> Never {
        let failed = InitNotification.failed(step: error.step, errno: error.errno)
        try? channel.send(.notification(method: failed.method, params: failed.params, fds: 0))
        exit(2)
    }

    /// Kills everything else in the PID namespace and exits; the kernel would anyway when PID 1 exits.
    func exitAll(status: Int32) -> Never {
        kill(-1, SIGKILL)
        while waitpid(-1, nil, 0) > 0 {}
        exit(status)
    }

    mutating func loop() -> Never {
        while true {
            // While orphaned, the reconnect socket stands where the control channel was.
            let control = orphanedUntil == nil ? channel.fd : reconnectFD
            var fds = [pollfd(fd: control, events: Int16(POLLIN), revents: 0), pollfd(fd: signalFD, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 2, nextTimeout())
            if n < 0 && errno != EINTR { exitAll(status: 4) }
            // An invalid descriptor would make poll return at once forever; stop instead of spinning.
            if (fds[0].revents | fds[1].revents) & Int16(POLLNVAL) != 0 { exitAll(status: 5) }
            if fds[1].revents != 0 { handleSignals() }
            if fds[0].revents != 0 {
                if orphanedUntil == nil { readControl() } else { acceptDaemon() }
            }
            expireCommands()
            if let until = orphanedUntil, now() >= until { exitAll(status: 0) }
            if terminating && supervisor!.children.isEmpty { exit(0) }
        }
    }

    /// Milliseconds, for command deadlines.
    func now() -> Int64 { Self.monotonicNanoseconds() / 1_000_000 }

    func nextTimeout() -> Int32 {
        var deadlines = supervisor!.children.values.compactMap { c -> Int64? in
            if case .command(let d) = c.role, !c.timedOut { return d }
            return nil
        }
        if let until = orphanedUntil { deadlines.append(until) }
        guard let first = deadlines.min() else { return -1 }
        return Int32(clamping: max(0, first - now()))
    }

    mutating func expireCommands() {
        let t = now()
        for (pid, child) in supervisor!.children {
            if case .command(let deadline?) = child.role, !child.timedOut, deadline <= t {
                supervisor!.children[pid]!.timedOut = true
                kill(-pid, SIGKILL)  // its own session and process group
                kill(pid, SIGKILL)
            }
        }
    }

    mutating func handleSignals() {
        while case let signo = cubicle_read_signal(signalFD), signo != 0 {
            if signo == SIGCHLD {
                reap()
            } else {
                terminating = true
                for pid in supervisor!.children.keys { kill(pid, signo) }
            }
        }
    }

    mutating func reap() {
        while true {
            var status: Int32 = 0
            let pid = waitpid(-1, &status, WNOHANG)
            if pid <= 0 { return }
            guard let child = supervisor!.children.removeValue(forKey: pid) else { continue }  // an orphan we adopted
            let exit = ProcessExit(pid: pid, waitStatus: status)
            switch child.role {
            case .agent:
                supervisor!.agentPID = nil
                if let (out, err) = agentLogs { close(out); close(err); agentLogs = nil }
                // With no daemon to tell, a sandbox whose agent is gone has nothing left to keep.
                if orphanedUntil != nil { exitAll(status: 0) }
                notify(.agentExited(exit))
            case .command:
                notify(.commandExited(exit, timedOut: child.timedOut))
            }
        }
    }

    mutating func readControl() {
        do {
            guard var next = try channel.receive(flags: Int32(MSG_DONTWAIT)) else { return }
            while true {
                handle(next.0, fds: next.1)
                guard let more = try channel.nextBuffered() else { break }
                next = more
            }
        } catch .system(let e) where e.errno == EAGAIN {
            return
        } catch {
            // The daemon is gone (or spoke nonsense): wait for a new one, or end.
            disconnected(status: 0)
        }
    }

    mutating func handle(_ message: RPCMessage, fds: [Int32]) {
        for f in fds { close(f) }  // the host never sends descriptors to init after configuration
        guard case .request(let id, let method, let params, _) = message else { return }
        do {
            let (result, out) = try dispatch(method, params)
            send(.result(id: id, value: result, fds: out.count), fds: out)
            for f in out { close(f) }
        } catch {
            send(.error(id: id, error))
        }
    }

    mutating func dispatch(_ method: String, _ params: JSON) throws(RPCError) -> (JSON, [Int32]) {
        switch try InitRequest(method: method, params: params) {
        case .startAgent(let process):
            guard supervisor!.agentPID == nil else { throw RPCError(code: RPCError.failed, message: "agent already running") }
            return try start(process, role: .agent)
        case .runCommand(let process, let timeout):
            return try start(process, role: .command(deadline: now() + Int64(timeout) * 1000))
        case .openShell(let process, let rows, let cols):
            do {
                let (pid, master) = try supervisor!.spawnOnTerminal(process, rows: rows, cols: cols)
                return (InitReply.started(pid: pid).json, [master])
            } catch {
                throw RPCError(code: RPCError.failed, message: "could not start \(process.argv[0]) on a terminal", step: error.step, errno: error.errno)
            }
        case .endCommand(let pid):
            // Only a child of ours in the command role: a pid from the host never reaches the agent, init
            // itself, or a process some command left behind.
            guard let child = supervisor!.children[pid], case .command = child.role else {
                throw RPCError(code: RPCError.failed, message: "no command \(pid) is running")
            }
            kill(-pid, SIGKILL)  // its own session and process group
            kill(pid, SIGKILL)
            return (InitReply.none.json, [])
        case .connect(let port):
            return (InitReply.none.json, [try connect(port: port)])
        case .status:
            return (InitReply.status(agentPID: supervisor!.agentPID).json, [])
        case .agentLogs:
            guard supervisor!.agentPID != nil, let (out, err) = agentLogs else {
                throw RPCError(code: RPCError.failed, message: "no agent running")
            }
            let copies = [fcntl(out, F_DUPFD_CLOEXEC, 0), fcntl(err, F_DUPFD_CLOEXEC, 0)]
            guard copies.allSatisfy({ $0 >= 0 }) else {
                copies.filter { $0 >= 0 }.forEach { close($0) }
                throw RPCError(code: RPCError.failed, message: "dup", step: "dup", errno: errno)
            }
            return (InitReply.none.json, copies)
        }
    }

    mutating func start(_ params: ProcessParams, role: Supervisor.Role) throws(RPCError) -> (JSON, [Int32]) {
        do {
            let (pid, out, err) = try supervisor!.spawn(params, role: role)
            if case .agent = role, reconnectFD >= 0 {
                agentLogs = (fcntl(out, F_DUPFD_CLOEXEC, 0), fcntl(err, F_DUPFD_CLOEXEC, 0))
            }
            return (InitReply.started(pid: pid).json, [out, err])
        } catch {
            throw RPCError(code: RPCError.failed, message: "could not start \(params.argv[0])", step: error.step, errno: error.errno)
        }
    }

    func connect(port: UInt16) throws(RPCError) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw RPCError(code: RPCError.failed, message: "socket", step: "socket", errno: errno) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 {
            let e = errno
            close(fd)
            throw RPCError(code: RPCError.failed, message: "connect to port \(port)", step: "connect", errno: e)
        }
        return fd
    }
}
