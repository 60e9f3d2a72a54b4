#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux

/// The host's file table (`fs.file-max`) is one count for every process. A session's processes may each
/// hold `openFiles` descriptors and, through mappings of closed files, up to `vm.max_map_count` more, so
/// what the kernel enforces per session is its memory: every open file's `struct file` is charged to the
/// session's memory cgroup (the filp cache is accounted, v1 and v2). That bound is far above the kernel's
/// default file-max (about one file per 10 KiB of RAM), so one session could fill the table and leave the
/// host unable to open anything (ENFILE) long before its memory limit.
///
/// The budget: each session may hold what its memory can back, at `bytesPerFile` each, or what its pids
/// and descriptor limits allow, whichever is less; the host keeps what it uses now plus `hostReserve`.
/// cubicled raises file-max to cover the host's use and `maxSessions` sessions of the largest runtime (as
/// systemd since v240 raises it at boot to its maximum), so every session hits its own limits first.
public struct FileBudget: Equatable, Sendable {
    /// A `struct file` is 232-256 bytes in the slab, charged to the opener's memory cgroup.
    public static let bytesPerFile: Int64 = 256
    /// Files the host may open beyond what it holds when cubicled starts.
    public static let hostReserve: Int64 = 1 << 20

    public struct Session: Equatable, Sendable {
        public var memoryBytes: Int64
        public var pids: Int64
        public var openFiles: Int64
        public init(memoryBytes: Int64, pids: Int64, openFiles: Int64) {
            (self.memoryBytes, self.pids, self.openFiles) = (memoryBytes, pids, openFiles)
        }
    }

    /// The most files one session can hold: its memory's worth, or its processes' descriptors and mappings.
    public static func ceiling(_ s: Session, maxMapCount: Int64) -> Int64 {
        let byMemory = s.memoryBytes / bytesPerFile
        let (perProcess, o1) = s.openFiles.addingReportingOverflow(maxMapCount)
        let (byLimits, o2) = s.pids.multipliedReportingOverflow(by: perProcess)
        return (o1 || o2) ? byMemory : min(byMemory, byLimits)
    }

    /// What file-max must be at least: the host's files now, its reserve, and `maxSessions` of the largest.
    public static func required(hostFiles: Int64, maxSessions: Int, sessions: [Session], maxMapCount: Int64) -> Int64 {
        let largest = sessions.map { ceiling($0, maxMapCount: maxMapCount) }.max() ?? 0
        let (all, o1) = largest.multipliedReportingOverflow(by: Int64(maxSessions))
        let (total, o2) = all.addingReportingOverflow(hostFiles + hostReserve)
        return (o1 || o2) ? Int64.max : total
    }

    public struct Raised: Equatable, Sendable {
        public var from: Int64
        public var to: Int64
        public init(from: Int64, to: Int64) { (self.from, self.to) = (from, to) }
    }

    /// Raises `fs.file-max` (under `procSys`, /proc/sys; a test may point it at a fake tree) to what the
    /// sessions need. nil when it is high enough already. Throws when it is too low and cannot be written:
    /// the daemon must not serve sessions that can starve the host.
    public static func ensure(maxSessions: Int, sessions: [Session], procSys: String = "/proc/sys") throws(SystemError) -> Raised? {
        let fileMax = try number(procSys + "/fs/file-max")
        let hostFiles = try number(procSys + "/fs/file-nr")  // first field: allocated file handles
        let maxMapCount = try number(procSys + "/vm/max_map_count")
        let needed = required(hostFiles: hostFiles, maxSessions: maxSessions, sessions: sessions, maxMapCount: maxMapCount)
        guard fileMax < needed else { return nil }
        try Files.write(procSys + "/fs/file-max", String(needed))
        return Raised(from: fileMax, to: needed)
    }

    private static func number(_ path: String) throws(SystemError) -> Int64 {
        let text = try Files.read(path)
        guard let first = text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first, let n = Int64(first) else {
            throw SystemError("read \(path)", errno: EINVAL)
        }
        return n
    }
}
