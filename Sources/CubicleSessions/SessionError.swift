/// What the session registry and a session refuse, in their own words. The gateway turns each into
/// AgentCore's wire error (`AgentCoreError(_: SessionError)` in CubicleGateway); the admin API into its own.
public enum SessionError: Error, Equatable, Sendable, CustomStringConvertible {
    case runtimeNotFound(String)
    /// The runtime exists, but not the endpoint or version asked for, or it has no READY version behind it.
    case endpointNotFound(String)
    case sessionNotFound(String)
    /// cubicled is stopping and starts no session.
    case shuttingDown
    /// `maxSessions` live sessions already.
    case quotaReached(Int)
    /// The sandbox, the agent or a command could not start, or the agent or sandbox ended while the
    /// session was starting.
    case couldNotStart(String)
    /// The agent did not answer /ping with 200 within `seconds`; `isAWSDefault` when that is AWS's own limit.
    case initializationTimedOut(seconds: Int, isAWSDefault: Bool)
    case unexpected(String)

    public var description: String {
        switch self {
        case .runtimeNotFound(let name): "Runtime \(name) not found"
        case .endpointNotFound(let why): why
        case .sessionNotFound(let id): "Session \(id) not found or already ended"
        case .shuttingDown: "cubicled is shutting down"
        case .quotaReached(let n): "Live session quota of \(n) reached; stop a session or wait for one to end"
        case .couldNotStart(let why): why
        case .initializationTimedOut(let seconds, _):
            "Runtime initialization time exceeded. Please make sure that initialization completes in \(seconds)s."
        case .unexpected(let why): why
        }
    }
}
