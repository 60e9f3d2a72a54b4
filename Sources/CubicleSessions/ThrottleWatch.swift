import CubicleLinux
import CubicleRuntimes
import CubicleSandbox
import Glibc

/// When sessions go below the host's processes for the CPU under `SessionsCPUYield.whileThrottled`: as
/// soon as any session's count of throttled periods grows, and back to equal weight once none has grown
/// for `calmSeconds`, so a hog that spins in bursts does not flip the setting every period.
public struct ThrottleWatch: Sendable {
    public let calmSeconds: Double
    /// nil until the first look, which always sets it: a daemon killed while sessions were below the host
    /// leaves the parent idle for the next one, whose adopted sessions may all be calm.
    public private(set) var sessionsBelowHost: Bool?
    private var counts: [String: Int64] = [:]
    private var lastGrowth: Double?

    public init(calmSeconds: Double = 5) { self.calmSeconds = calmSeconds }

    /// `throttled`: the throttled periods so far of every live session its quota can hold back, by its
    /// cgroup. Returns the setting to write when it changes, nil when it stays.
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
    /// How often the sessions' throttling is read: one `cpu.stat` per live session its quota can hold back.
    static let throttlePollSeconds = 0.5

    /// Under `whileThrottled`, watches the live sessions' CPU throttling for as long as this manager
    /// exists and moves them below the host's processes while any is held at its quota. The reads are
    /// file reads, so they run on a thread of their own, never on the event loops that serve requests; a
    /// session whose quota is all of its CPUs (2 CPUs confined to 2) is never throttled and not read.
    public nonisolated func watchCPUThrottling() throws(SystemError) {
        guard config.sessionsYieldCPUToHost == .whileThrottled else { return }
        let online = launcher.cpuPlacer.online.count
        try startThread("CPU throttle watch") { [weak self] in
            var watch = ThrottleWatch()
            while true {
                do {
                    guard let manager = self else { return }
                    manager.lookAtThrottling(&watch, online: online)
                }
                usleep(UInt32(Self.throttlePollSeconds * 1e6))
            }
        }
    }

    private nonisolated func lookAtThrottling(_ watch: inout ThrottleWatch, online: Int) {
        let throttleable = liveSessions.filter {
            $0.runtime.limits.cpus < Double($0.sandbox.cpus.isEmpty ? online : $0.sandbox.cpus.count)
        }
        let throttled = Dictionary(throttleable.map { ($0.sandbox.cgroup.path, $0.sandbox.cgroup.cpuThrottledPeriods()) },
                                   uniquingKeysWith: max)
        let before = watch.sessionsBelowHost
        guard let below = watch.observe(throttled, at: supervisor.clock()) else { return }
        do {
            try launcher.setSessionsBelowHost(below)
            if below || before != nil {
                supervisor.logger.info(below ? "sessions' CPU below the host's: a session is held at its CPU quota"
                                  : "sessions' CPU back beside the host's: no session throttled lately")
            }
        } catch {
            supervisor.logger.warning("could not change the sessions' CPU weight", metadata: ["error": "\(error)"])
        }
    }
}
