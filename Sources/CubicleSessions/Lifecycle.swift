/// Why a session ended: stopped by a client or an operator, a lifecycle rule, the agent or its sandbox, or the daemon.
public enum EndReason: Equatable, Sendable, CustomStringConvertible {
    case stopped
    case idleTimeout
    case maxLifetime
    case unhealthy(String)
    case agentExited(code: Int32?, signal: Int32?)
    case outOfMemory
    case startFailed(String)
    case sandboxFailed(String)
    case daemonShutdown
    /// DeleteAgentRuntime (or the runtime's removal from the YAML file) ended it.
    case runtimeDeleted

    /// A short stable name for metrics, logs and `--json`.
    public var name: String {
        switch self {
        case .stopped: "stopped"
        case .idleTimeout: "idle_timeout"
        case .maxLifetime: "max_lifetime"
        case .unhealthy: "unhealthy"
        case .agentExited: "agent_exited"
        case .outOfMemory: "out_of_memory"
        case .startFailed: "start_failed"
        case .sandboxFailed: "sandbox_failed"
        case .daemonShutdown: "daemon_shutdown"
        case .runtimeDeleted: "runtime_deleted"
        }
    }

    public var description: String {
        switch self {
        case .unhealthy(let why): "unhealthy: \(why)"
        case .agentExited(let code, let signal):
            signal.map { "agent exited (signal \($0))" } ?? "agent exited (code \(code.map(String.init) ?? "?"))"
        case .startFailed(let why): "start failed: \(why)"
        case .sandboxFailed(let why): "sandbox failed: \(why)"
        default: name.replacing("_", with: " ")
        }
    }
}

/// The lifecycle rules of one session as a pure value over a monotonic clock in seconds, so the rules
/// are tested on a test clock and the daemon only feeds it events.
///
/// Idle means: no request in flight, no command running, and the agent's last /ping was not
/// HealthyBusy. The idle timeout counts from the moment the session last stopped being busy.
public struct Lifecycle: Equatable, Sendable {
    public enum State: Equatable, Sendable {
        case starting
        case ready
        case stopping(EndReason)
        case ended(EndReason)

        public var name: String {
            switch self {
            case .starting: "starting"
            case .ready: "ready"
            case .stopping: "stopping"
            case .ended: "ended"
            }
        }
    }

    public private(set) var state: State = .starting
    public let createdAt: Double
    public let idleTimeout: Double
    public let maxLifetime: Double
    public private(set) var lastActivity: Double
    public private(set) var requestsInFlight = 0
    public private(set) var commandsRunning = 0
    public private(set) var agentBusy = false
    public private(set) var invocations = 0

    public init(now: Double, idleTimeout: Double, maxLifetime: Double) {
        createdAt = now
        lastActivity = now
        self.idleTimeout = idleTimeout
        self.maxLifetime = maxLifetime
    }

    public var isBusy: Bool { requestsInFlight > 0 || commandsRunning > 0 || agentBusy }
    public var isLive: Bool { if case .starting = state { true } else if case .ready = state { true } else { false } }
    public var endReason: EndReason? {
        switch state {
        case .stopping(let r), .ended(let r): r
        default: nil
        }
    }

    public mutating func ready(now: Double) {
        guard case .starting = state else { return }
        state = .ready
        lastActivity = now
    }

    public mutating func requestStarted(now: Double) {
        requestsInFlight += 1
        invocations += 1
        lastActivity = now
    }

    public mutating func requestEnded(now: Double) {
        requestsInFlight = max(0, requestsInFlight - 1)
        lastActivity = now
    }

    public mutating func commandStarted(now: Double) {
        commandsRunning += 1
        lastActivity = now
    }

    public mutating func commandEnded(now: Double) {
        commandsRunning = max(0, commandsRunning - 1)
        lastActivity = now
    }

    /// The agent's /ping said HealthyBusy (`busy`) or Healthy.
    public mutating func pinged(busy: Bool, now: Double) {
        if busy || agentBusy { lastActivity = now }
        agentBusy = busy
    }

    /// Begins ending for `reason`; the first reason wins.
    @discardableResult
    public mutating func stop(_ reason: EndReason) -> Bool {
        guard isLive else { return false }
        state = .stopping(reason)
        return true
    }

    public mutating func ended() {
        if case .stopping(let r) = state { state = .ended(r) }
        else if isLive { state = .ended(.stopped) }
    }

    public var maxLifetimeDeadline: Double { createdAt + maxLifetime }
    /// When the session ends if nothing happens; nil while busy (it cannot go idle).
    public var idleDeadline: Double? { isBusy ? nil : lastActivity + idleTimeout }

    /// The rule that ends the session at `now`, if one does. Max lifetime ends even a busy session.
    public func expiry(now: Double) -> EndReason? {
        guard case .ready = state else {
            if case .starting = state, now >= maxLifetimeDeadline { return .maxLifetime }
            return nil
        }
        if now >= maxLifetimeDeadline { return .maxLifetime }
        if let idle = idleDeadline, now >= idle { return .idleTimeout }
        return nil
    }

    /// The earliest time `expiry` can change its answer without a new event.
    public var nextDeadline: Double { min(maxLifetimeDeadline, idleDeadline ?? .infinity) }
}
