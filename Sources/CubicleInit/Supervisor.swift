#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC

/// Starts the agent and commands with their final identity, and keeps the table that reaping fans out to.
struct Supervisor {
    enum Role: Equatable {
        case agent
        case command(deadline: Int64?)
    }

    struct Child {
        var role: Role
        var timedOut = false
    }

    let config: InitConfig
    var children: [pid_t: Child] = [:]
    var agentPID: pid_t?

    init(config: InitConfig) {
        self.config = config
    }

    struct SpawnError: Error {
        var step: String
        var errno: Int32
    }

    /// Finds argv[0] on the sandbox's PATH, as execvp would, but before fork so the child stays simple.
    static func resolve(_ program: String, env: [String]) -> String {
        if program.contains("/") { return program }
        let path = env.first { $0.hasPrefix("PATH=") }.map { String($0.dropFirst(5)) } ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(program)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return program
    }

    /// Returns the pid and the read ends of stdout and stderr.
    mutating func spawn(_ params: ProcessParams, role: Role) throws(SpawnError) -> (pid_t, Int32, Int32) {
        let out: (read: Int32, write: Int32), err: (read: Int32, write: Int32)
        do {
            out = try Descriptors.pipe()
            err = try Descriptors.pipe()
        } catch {
            throw SpawnError(step: error.step, errno: error.errno)
        }
        let devnull = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer {
            close(out.write); close(err.write)
            if devnull >= 0 { close(devnull) }
        }
        do {
            let pid = try run(params, role: role, stdio: (devnull, out.write, err.write), terminal: false)
            return (pid, out.read, err.read)
        } catch {
            close(out.read); close(err.read)
            throw error
        }
    }

    /// A process on a new terminal: returns its pid and the terminal's master.
    mutating func spawnOnTerminal(_ params: ProcessParams, rows: Int, cols: Int) throws(SpawnError) -> (pid_t, Int32) {
        var master: Int32 = -1, peer: Int32 = -1
        guard cubicle_open_pty(UInt16(rows), UInt16(cols), config.agentUID, config.agentGID, &master, &peer) == 0 else {
            throw SpawnError(step: "open a terminal", errno: errno)
        }
        defer { close(peer) }
        do {
            return (try run(params, role: .command(deadline: nil), stdio: (peer, peer, peer), terminal: true), master)
        } catch {
            close(master)
            throw error
        }
    }

    private mutating func run(_ params: ProcessParams, role: Role, stdio: (Int32, Int32, Int32), terminal: Bool) throws(SpawnError) -> pid_t {
        let path = Self.resolve(params.argv[0], env: params.env)
        var failure = cubicle_spawn_error()
        let limits = [
            cubicle_rlimit(resource: Int32(RLIMIT_NOFILE.rawValue), soft: config.maxOpenFiles, hard: config.maxOpenFiles),
            cubicle_rlimit(resource: 6 /* RLIMIT_NPROC */, soft: config.maxProcesses, hard: config.maxProcesses),
            cubicle_rlimit(resource: Int32(RLIMIT_CORE.rawValue), soft: 0, hard: 0),
        ]
        let pid: pid_t = withCStrings(params.argv) { argv in
            withCStrings(params.env) { envp in
                config.seccompProgram.withUnsafeBytes { filter in
                    limits.withUnsafeBufferPointer { rl in
                        path.withCString { cpath in
                            params.cwd.withCString { cwd in
                                var spawn = cubicle_process_spawn(
                                    path: cpath, argv: argv, envp: envp, cwd: cwd,
                                    stdin_fd: stdio.0, stdout_fd: stdio.1, stderr_fd: stdio.2,
                                    uid: config.agentUID, gid: config.agentGID,
                                    rlimits: rl.baseAddress, nrlimits: Int32(rl.count),
                                    seccomp_filter: filter.isEmpty ? nil : filter.baseAddress,
                                    seccomp_len: UInt16(filter.count / 8),
                                    new_session: 1, controlling_tty: terminal ? 1 : 0)
                                return cubicle_process_spawn_run(&spawn, &failure)
                            }
                        }
                    }
                }
            }
        }
        if pid < 0 { throw SpawnError(step: SpawnStep.name(failure.step), errno: failure.err) }
        if failure.step != 0 {
            var status: Int32 = 0
            _ = waitpid(pid, &status, 0)
            throw SpawnError(step: SpawnStep.name(failure.step), errno: failure.err)
        }
        children[pid] = Child(role: role)
        if role == .agent { agentPID = pid }
        return pid
    }
}

