import Synchronization

/// Which runtime, caller and session id a session serves. The owner is part of the key, so the same session
/// id sent by another caller names another session: no caller can reach, or learn of, another's.
public struct SessionKey: Hashable, Sendable {
    public var runtime: String
    public var owner: String
    public var id: String
    public init(runtime: String, owner: String, id: String) { self.runtime = runtime; self.owner = owner; self.id = id }

    /// Everyone's owner while cubicled has no principals file (loopback only).
    public static let anonymousOwner = "anonymous"
}

/// The live sessions by key: the registry's one record of them, written only by the registry actor. It is
/// behind a lock rather than in the actor because the gateway's warm road looks a session up on the event
/// loop, where a hop to an actor would be the very task switch per request that road exists to avoid, and
/// the throttle watch reads it from a thread of its own.
final class LiveIndex: Sendable {
    private let sessions = Mutex<[SessionKey: Session]>([:])

    func session(_ key: SessionKey) -> Session? { sessions.withLock { $0[key] } }

    func insert(_ session: Session, for key: SessionKey) { sessions.withLock { $0[key] = session } }

    /// Removes `session` under `key`, unless another has taken its place.
    func remove(_ session: Session, for key: SessionKey) {
        sessions.withLock { if $0[key] === session { $0[key] = nil } }
    }

    var all: [Session] { sessions.withLock { Array($0.values) } }
    var count: Int { sessions.withLock { $0.count } }
}
