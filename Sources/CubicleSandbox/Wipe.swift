#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC
import Synchronization

/// Descriptors of the roots of a sandbox's writable tmpfs mounts, opened while its init was known to be
/// alive. They are how teardown reaches the files to wipe: never a pid looked up later, which after init
/// dies (an OOM kill, a crash) may name any process on the host, whose files a root wiper would zero. A
/// held descriptor also keeps its tmpfs alive after every process of the sandbox is gone, so the wipe
/// runs after the kill, when nothing inside can write any more, and still finds everything.
final class PinnedMounts: Sendable {
    private let fds: Mutex<[Int32]>

    init(_ fds: [Int32]) { self.fds = Mutex(fds) }

    deinit { fds.withLock { $0.forEach { _ = close($0) } } }

    /// Hands the descriptors over, once; the caller closes them.
    func take() -> [Int32] { fds.withLock { f in defer { f = [] }; return f } }

    var count: Int { fds.withLock { $0.count } }

    static let tmpfsMagic: Int64 = 0x0102_1994

    /// Opens each of the sandbox's writable tmpfs mounts (`InitConfig.writableMounts`) in init's mount
    /// namespace, then checks through a pidfd that init had not been reaped by then, so its pid named it for
    /// every open. With `cgroup`, also that the process is in it (an adopted init is not our child: a pid
    /// from the state directory may have been reaped and reused before this daemon started). Mount points
    /// are resolved inside init's root and never through a symlink, and each descriptor must be the root
    /// of a mount, on a tmpfs. Empty if any of that fails. (mountinfo is not read: on the launch path its
    /// formatting and parsing cost more than the opens.)
    static func pin(initPID: pid_t, cgroup: Cgroup? = nil) -> PinnedMounts {
        let pidfd = cubicle_pidfd_open(initPID)
        guard pidfd >= 0 else { return PinnedMounts([]) }
        defer { close(pidfd) }
        let root = open("/proc/\(initPID)/root", Descriptors.openPathOnly | O_DIRECTORY | O_CLOEXEC)
        guard root >= 0 else { return PinnedMounts([]) }
        defer { close(root) }
        var fds: [Int32] = []
        // An image root's upper layer too, where its init binds it (absent otherwise).
        for point in InitConfig.writableMounts + [InitConfig.imageUpper] {
            let fd = cubicle_open_in_root(root, point, O_RDONLY | O_DIRECTORY)
            guard fd >= 0 else { continue }
            var identity = cubicle_file_identity()
            var fs = cubicle_fs_usage()
            guard cubicle_file_identity_of(fd, "", &identity) == 0, identity.mount_root != 0,
                  cubicle_fs_usage_of(fd, &fs) == 0, fs.type == tmpfsMagic else {
                close(fd)
                continue
            }
            fds.append(fd)
        }
        let member = cgroup.map { isMember(initPID, of: $0) } ?? true
        guard member, cubicle_pidfd_alive(pidfd) == 0 else {
            fds.forEach { _ = close($0) }
            return PinnedMounts([])
        }
        return PinnedMounts(fds)
    }

    private static func isMember(_ pid: pid_t, of cgroup: Cgroup) -> Bool {
        guard let text = try? Files.read("/proc/\(pid)/cgroup") else { return false }
        return text.split(separator: "\n").contains { $0.hasSuffix(":/" + cgroup.path) }
    }
}

/// Overwrites a sandbox's writable tmpfs contents with zeros before its mounts are let go, so the pages the
/// kernel frees hold no session data. Works through `PinnedMounts`; never follows a symlink and never
/// leaves the tmpfs it started in. Only allocated extents are written (SEEK_DATA/SEEK_HOLE): a sparse
/// file costs what it holds, not its size, and writing zeros over data allocates nothing, so the wipe
/// adds no memory outside the session's cgroup. Each mount's wipe stops at what statfs says it uses, so
/// its cost is bounded by the session's own tmpfs sizes.
enum TmpfsWiper {
    struct Report { var files = 0; var bytes: Int64 = 0; var stoppedAtBudget = false }

    /// Wipes under each descriptor and closes it.
    static func wipe(_ roots: [Int32]) -> Report {
        var report = Report()
        for fd in roots {
            var st = stat()
            var fs = cubicle_fs_usage()
            guard fstat(fd, &st) == 0, cubicle_fs_usage_of(fd, &fs) == 0 else { close(fd); continue }
            // Slack for the root's own pages and rounding; what is wiped is never more than what is held.
            var budget = Budget(bytes: fs.used_bytes + (1 << 20), entries: fs.used_inodes + 64)
            wipeDirectory(fd, device: st.st_dev, depth: 0, budget: &budget, report: &report)  // closes fd
            if budget.exhausted { report.stoppedAtBudget = true }
        }
        return report
    }

    struct Budget {
        var bytes: Int64
        var entries: Int64
        var exhausted: Bool { bytes <= 0 || entries <= 0 }
    }

    private static let zeros = [UInt8](repeating: 0, count: 65536)

    private static func wipeDirectory(_ dirfd: Int32, device: dev_t, depth: Int, budget: inout Budget, report: inout Report) {
        guard let dir = fdopendir(dirfd) else { close(dirfd); return }
        defer { closedir(dir) }
        guard depth < 64 else { return }
        while !budget.exhausted, let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            budget.entries -= 1
            var st = stat()
            guard fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_dev == device else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                let child = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                if child >= 0 { wipeDirectory(child, device: device, depth: depth + 1, budget: &budget, report: &report) }
            case S_IFREG:
                let f = openat(dirfd, name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
                guard f >= 0 else { continue }
                let written = overwriteData(f, budget: &budget.bytes)
                _ = ftruncate(f, 0)
                close(f)
                report.files += 1
                report.bytes += written
            default:
                continue
            }
        }
    }

    /// Zeros over each data extent of `fd`, within `budget` bytes. Returns the bytes written.
    static func overwriteData(_ fd: Int32, budget: inout Int64) -> Int64 {
        var written: Int64 = 0
        var position: Int64 = 0
        while budget > 0 {
            let data = cubicle_seek_data(fd, position)
            guard data >= 0 else { break }  // ENXIO: no data past position
            let hole = cubicle_seek_hole(fd, data)
            guard hole > data else { break }
            var offset = data
            while offset < hole && budget > 0 {
                let length = Int(min(Int64(zeros.count), hole - offset, budget))
                let n = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, length, off_t(offset)) }
                if n <= 0 { return written }
                offset += Int64(n)
                written += Int64(n)
                budget -= Int64(n)
            }
            position = offset
        }
        return written
    }
}
