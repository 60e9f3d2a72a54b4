#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import Dispatch
import Synchronization

/// Live events for operators (`cubicle events`): session created, ready, ended with its reason, OOM kills
/// and limit hits. A slow follower loses its oldest events rather than holding the daemon back.
public final class SessionEvents: Sendable {
    private let state = Mutex<(followers: [Int: AsyncStream<JSON>.Continuation], next: Int)>(([:], 0))

    public init() {}

    func publish(_ type: String, session: Session, _ extra: [String: JSON] = [:]) {
        var event: [String: JSON] = ["type": .string(type), "session": .string(session.id), "runtime": .string(session.runtime.name),
                                     "sandbox": .string(session.sandbox.id), "time": .double(Self.unixTime())]
        for (k, v) in extra { event[k] = v }
        let json = JSON.object(event)
        for c in state.withLock({ Array($0.followers.values) }) { c.yield(json) }
    }

    /// Events from now on, until the follower stops listening.
    public func follow() -> AsyncStream<JSON> {
        let (stream, continuation) = AsyncStream<JSON>.makeStream(bufferingPolicy: .bufferingNewest(4096))
        let id = state.withLock { s -> Int in
            s.next += 1
            s.followers[s.next] = continuation
            return s.next
        }
        continuation.onTermination = { [weak self] _ in _ = self?.state.withLock { $0.followers.removeValue(forKey: id) } }
        return stream
    }

    func finishAll() {
        for c in state.withLock({ s -> [AsyncStream<JSON>.Continuation] in defer { s.followers.removeAll() }; return Array(s.followers.values) }) {
            c.finish()
        }
    }

    static func unixTime() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
