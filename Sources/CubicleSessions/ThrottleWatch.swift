import CubicleSandbox
import Dispatch
import Synchronization

/// When sessions go below the host's processes for the CPU under `SessionsCPUYield.whileThrottled`: as
/// soon as any session's count of throttled periods grows, and back to equal weight once none has grown
/// for `calmSeconds`, so a hog that spins in bursts does not flip the setting every period.
public struct ThrottleWatch: Sendable {
    public let calmSeconds: Double
    public private(set) var sessionsBelowHost = false
    private var counts: [String: Int64] = [:]
    private var lastGrowth: Double?

    public init(calmSeconds: Double = 5) { self.calmSeconds = calmSeconds }

    /// `throttled`: every live session's throttled periods so far, by its cgroup. Returns the new setting
    /// when it changes, nil when it stays.
    public mutating func observe(_ throttled: [String: Int64], at now: Double) -> Bool? {
        // A session seen for the first time has been throttled since it started if its count is above 0.
        if throttled.contains(where: { $0.value > (counts[$0.key] ?? 0) }) { lastGrowth = now }
        counts = throttled
        let below = lastGrowth.map { now - $0 < calmSeconds } ?? false
        guard below != sessionsBelowHost else { return nil }
        sessionsBelowHost = below
        return below
    }
}

extension SessionManager {
    /// How often the sessions' throttling is read: one `cpu.stat` per live session each time.
    static let throttlePollSeconds = 0.5

    /// Under `whileThrottled`, watches the live sessions' CPU throttling for as long as this manager
    /// exists and moves them below the host's processes while any is held at its quota. The reads are
    /// file reads, so they run on a queue of their own, never on the event loops that serve requests.
    public nonisolated func watchCPUThrottling() {
        guard config.sessionsYieldCPUToHost == .whileThrottled else { return }
        let queue = DispatchQueue(label: "cubicle.throttle-watch")
        let watch = Mutex(ThrottleWatch())
        @Sendable func tick(_ manager: SessionManager?) {
            guard let manager else { return }
            let throttled = Dictionary(manager.liveIndexSessions.map { ($0.sandbox.cgroup.path, $0.sandbox.cgroup.cpuThrottledPeriods()) },
                                       uniquingKeysWith: max)
            let now = manager.clock()
            if let below = watch.withLock({ $0.observe(throttled, at: now) }) {
                do {
                    try manager.launcher.setSessionsBelowHost(below)
                    manager.logger.info(below ? "sessions' CPU below the host's: a session is held at its CPU quota"
                                              : "sessions' CPU back beside the host's: no session throttled lately")
                } catch {
                    manager.logger.warning("could not change the sessions' CPU weight", metadata: ["error": "\(error)"])
                }
            }
            queue.asyncAfter(deadline: .now() + Self.throttlePollSeconds) { [weak manager] in tick(manager) }
        }
        queue.async { [weak self] in tick(self) }
    }
}
