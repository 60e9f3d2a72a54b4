import Metrics
import Synchronization

/// Every metric cubicled reports, through swift-metrics; cubicled bootstraps the Prometheus backend and
/// serves it on `GET /metrics`. Labels are bounded: runtime names come from the config, reasons and
/// states from closed lists, status codes from HTTP.
public enum Telemetry {
    public static func sessionStarted(runtime: String) {
        Counter(label: "cubicle_sessions_started_total", dimensions: [("runtime", runtime)]).increment()
    }

    static func sessionEnded(runtime: String, reason: String) {
        Counter(label: "cubicle_sessions_ended_total", dimensions: [("runtime", runtime), ("reason", reason)]).increment()
    }

    static func oomKills(runtime: String, count: Int) {
        Counter(label: "cubicle_oom_kills_total", dimensions: [("runtime", runtime)]).increment(by: count)
    }

    static func limitHits(runtime: String, limit: String, count: Int) {
        Counter(label: "cubicle_limit_hits_total", dimensions: [("runtime", runtime), ("limit", limit)]).increment(by: count)
    }

    static func egressDenied(runtime: String) {
        Counter(label: "cubicle_egress_denied_total", dimensions: [("runtime", runtime)]).increment()
    }

    static func spawned(nanoseconds: UInt64) {
        Metrics.Timer(label: "cubicle_sandbox_spawn_seconds").recordNanoseconds(Int64(clamping: nanoseconds))
    }

    static func tornDown(nanoseconds: UInt64) {
        Metrics.Timer(label: "cubicle_sandbox_teardown_seconds").recordNanoseconds(Int64(clamping: nanoseconds))
    }

    /// One InvokeAgentRuntime, from request to the end of its response body. Handles are made once per
    /// (runtime, status) rather than per request: making one goes through the factory's lock, label
    /// sanitizing and registry lookup.
    public static func invocation(runtime: String, status: Int, nanoseconds: UInt64, bytesIn: Int, bytesOut: Int) {
        let h = invocationHandles(runtime: runtime, status: status)
        h.duration.recordNanoseconds(Int64(clamping: nanoseconds))
        if bytesIn > 0 { h.received.increment(by: bytesIn) }
        if bytesOut > 0 { h.sent.increment(by: bytesOut) }
    }

    /// An invocation forwarded on the event loop (a live session with an idle agent link), not through a task.
    public static func forwardedOnEventLoop(runtime: String) {
        let counter = forwardedCounters.withLock { counters in
            if let c = counters[runtime] { return c }
            let c = Counter(label: "cubicle_invocations_forwarded_on_event_loop_total", dimensions: [("runtime", runtime)])
            counters[runtime] = c
            return c
        }
        counter.increment()
    }

    private static let forwardedCounters = Mutex<[String: Counter]>([:])

    struct InvocationHandles: Sendable {
        let duration: Metrics.Timer
        let received: Counter
        let sent: Counter
    }

    private static let handles = Mutex<[String: InvocationHandles]>([:])

    static func invocationHandles(runtime: String, status: Int) -> InvocationHandles {
        let key = "\(status) \(runtime)"
        if let h = handles.withLock({ $0[key] }) { return h }
        let h = InvocationHandles(
            duration: Metrics.Timer(label: "cubicle_invocation_duration_seconds", dimensions: [("runtime", runtime), ("status", String(status))]),
            received: Counter(label: "cubicle_invocation_bytes_received_total", dimensions: [("runtime", runtime)]),
            sent: Counter(label: "cubicle_invocation_bytes_sent_total", dimensions: [("runtime", runtime)]))
        return handles.withLock { stored in
            if let raced = stored[key] { return raced }
            stored[key] = h
            return h
        }
    }

    /// Live sessions by state, set just before each scrape.
    /// Session storage kept on this host: how many volumes and the bytes their images hold.
    public static func sessionStorage(volumes: Int, bytes: Int64) {
        Gauge(label: "cubicle_session_storage_volumes").record(volumes)
        Gauge(label: "cubicle_session_storage_bytes").record(bytes)
    }

    public static func liveSessions(_ counts: [String: Int]) {
        for state in ["starting", "ready", "stopping"] {
            Gauge(label: "cubicle_sessions_live", dimensions: [("state", state)]).record(counts[state] ?? 0)
        }
    }
}
