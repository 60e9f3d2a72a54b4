import Metrics

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

    static func spawned(nanoseconds: UInt64) {
        Metrics.Timer(label: "cubicle_sandbox_spawn_seconds").recordNanoseconds(Int64(clamping: nanoseconds))
    }

    static func tornDown(nanoseconds: UInt64) {
        Metrics.Timer(label: "cubicle_sandbox_teardown_seconds").recordNanoseconds(Int64(clamping: nanoseconds))
    }

    /// One InvokeAgentRuntime, from request to the end of its response body.
    public static func invocation(runtime: String, status: Int, nanoseconds: UInt64, bytesIn: Int, bytesOut: Int) {
        Metrics.Timer(label: "cubicle_invocation_duration_seconds", dimensions: [("runtime", runtime), ("status", String(status))])
            .recordNanoseconds(Int64(clamping: nanoseconds))
        Counter(label: "cubicle_invocation_bytes_received_total", dimensions: [("runtime", runtime)]).increment(by: bytesIn)
        Counter(label: "cubicle_invocation_bytes_sent_total", dimensions: [("runtime", runtime)]).increment(by: bytesOut)
    }

    /// Live sessions by state, set just before each scrape.
    public static func liveSessions(_ counts: [String: Int]) {
        for state in ["starting", "ready", "stopping"] {
            Gauge(label: "cubicle_sessions_live", dimensions: [("state", state)]).record(counts[state] ?? 0)
        }
    }
}
