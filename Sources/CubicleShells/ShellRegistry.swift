import CubicleAgentCore
import CubicleRPC
import CubicleSandbox
import CubicleSessions
import NIOCore
import Synchronization

/// Every live shell, by session and shellId: a client that reconnects with a shellId finds its shell; a
/// session holds at most `maxPerSession`; a shell leaves when it ends (exit, hang-up, or its session's
/// end, which ends everything in the sandbox).
public final class ShellRegistry: Sendable {
    public static let maxPerSession = 10
    let group: any EventLoopGroup
    /// How long a data-plane shell waits for its client to come back (AgentCore keeps them ~15 minutes).
    public let graceSeconds: Double
    private struct Key: Hashable {
        var session: ObjectIdentifier
        var shellID: String
    }
    private let shells = Mutex<[Key: Shell]>([:])

    public init(group: any EventLoopGroup, graceSeconds: Double = 900) {
        self.group = group
        self.graceSeconds = graceSeconds
    }

    public enum OpenError: Error, Sendable, CustomStringConvertible {
        case tooMany
        case couldNotStart(String)
        public var description: String {
            switch self {
            case .tooMany: "The session has \(ShellRegistry.maxPerSession) shells already"
            case .couldNotStart(let why): "The shell could not start: \(why)"
            }
        }
    }

    /// The session's shell `shellID` if it lives (reconnected), else a new one running `command` on a
    /// terminal of rows x cols. `grace`: how long it outlives a client that left (0: it ends with it).
    public func open(in session: Session, shellID: String, command: [String], rows: Int, cols: Int, term: String,
                     graceSeconds: Double? = nil) async throws(OpenError) -> (Shell, reconnected: Bool) {
        let key = Key(session: ObjectIdentifier(session), shellID: shellID)
        if let live = shells.withLock({ $0[key] }), !live.isOver { return (live, true) }
        // Every shell with a process counts toward the cap, a hung-up one too until it exits (at most
        // `Shell.hangUpSeconds`): the cap bounds processes, where `count(in:)` tells operators what is usable.
        guard shells.withLock({ s in s.keys.filter { $0.session == key.session }.count }) < Self.maxPerSession else { throw .tooMany }
        session.commandStarted()
        let started: (pid: Int32, master: Int32)
        do {
            started = try await session.sandbox.openShell(
                ProcessParams(argv: command, env: session.environment + ["TERM=\(term)"], cwd: InitConfig.agentHome), rows: rows, cols: cols)
        } catch {
            session.commandEnded()
            throw .couldNotStart("\(error)")
        }
        let shell = Shell(id: shellID, session: session, pid: started.pid, master: started.master, graceSeconds: graceSeconds ?? self.graceSeconds)
        shells.withLock { $0[key] = shell }
        shell.start(master: started.master, group: group) { [weak self] ended in
            self?.shells.withLock { s in if s[key] === ended { s[key] = nil } }
        }
        return (shell, false)
    }

    /// Shells of `session` a client can still use (operators): not hung up, not exited.
    public func count(in session: Session) -> Int {
        let id = ObjectIdentifier(session)
        return shells.withLock { s in s.filter { $0.key.session == id && !$0.value.isOver }.count }
    }

    /// What a data-plane shell runs: bash where the sandbox has it, else sh, interactive.
    public static let defaultCommand = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi"]
}
