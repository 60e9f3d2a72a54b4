#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux

/// One session's storage as a file system of its own: an ext4 image file on cubicled's data directory,
/// attached to a loop device and mounted while a sandbox of that session lives.
///
/// Why an image rather than a directory with project quotas: the image's size is a hard cap on bytes and
/// its inode table a hard cap on files, whatever the data directory's file system is and however it is
/// mounted (project quotas need ext4 or XFS mounted with `prjquota`, which a host rarely is); filling it
/// gives ENOSPC inside and touches nothing outside; and no path inside it can name anything outside it
/// (symlinks, hard links and renames stop at the mount). The costs: a loop device per live session with
/// storage, and the journal and inode table's share of the cap.
public enum StorageVolume {
    /// The caps one volume is made with.
    public struct Limits: Equatable, Sendable {
        public var bytes: Int64
        public var inodes: Int
        public init(bytes: Int64, inodes: Int) { self.bytes = bytes; self.inodes = inodes }

        /// AgentCore's 1 GiB per session; an inode per 16 KiB, ext4's default ratio.
        public static let `default` = Limits(bytes: 1 << 30, inodes: 65_536)

        public static func forBytes(_ bytes: Int64) -> Limits { Limits(bytes: bytes, inodes: Int(max(1024, bytes / 16_384))) }
    }

    /// The owner of the volume's root directory, as the sandbox sees it: the agent's uid and gid.
    public static let agentID = 1000

    /// Makes a new image at `path` (mode 0600; refused if anything is there) holding an empty ext4 file
    /// system of `limits`, whose root the agent owns. The file is sparse: it takes what is written.
    public static func create(at path: String, limits: Limits) throws(SystemError) {
        let fd = try sys("create \(path)") { open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
        var made = false
        defer { if !made { unlink(path) } }
        do {
            try sys("size \(path)") { ftruncate(fd, off_t(limits.bytes)) }
            try sys("sync \(path)") { fsync(fd) }
        } catch {
            close(fd)
            throw error
        }
        close(fd)
        // No discard at mkfs (the file is new and sparse); the root is the agent's; no reserved blocks, so
        // the whole cap is the session's.
        try run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-m", "0", "-N", String(limits.inodes), "-b", "4096",
                 "-E", "root_owner=\(agentID):\(agentID),nodiscard", "-L", "cubicle-session", path])
        made = true
    }

    /// Mounts the image at `target` (which must exist): a loop device made for it, ext4 without setuid
    /// or device files, and errors making it read-only rather than panicking. The loop device goes away by
    /// itself when the volume is unmounted.
    public static func mount(image: String, at target: String) throws(SystemError) {
        let backing = try sys("open \(image)") { open(image, O_RDWR | O_CLOEXEC | O_NOFOLLOW) }
        defer { close(backing) }
        var index: Int32 = -1
        let loop = cubicle_loop_attach(backing, &index)
        guard loop >= 0 else { throw SystemError.lastError("attach \(image) to a loop device") }
        // The mount holds the device from here; closing our descriptor lets AUTOCLEAR detach it at unmount.
        defer { close(loop) }
        try sys("mount /dev/loop\(index) at \(target)") {
            Glibc.mount("/dev/loop\(index)", target, "ext4", UInt(MS_NOSUID | MS_NODEV), "errors=remount-ro")
        }
    }

    /// Flushes what the session wrote to the image and unmounts it: after this returns, the image holds
    /// it even if the host loses power, and its loop device has let go of it, so mounting it again is
    /// not a second writer.
    ///
    /// A plain unmount can find the mount busy for a moment with nothing of ours using it: a child forked
    /// elsewhere in the process while we held a descriptor on the volume (the syncfs below, a file the
    /// caller wrote) keeps that descriptor until it execs. Then the volume is detached instead and the
    /// file system goes with that last reference; the loop device is waited out either way, for up to
    /// `patience` seconds.
    public static func unmount(_ target: String, patience: Double = 5) async throws(SystemError) {
        let loop = loopDevice(mountedAt: target)
        let fd = try sys("open \(target)") { open(target, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        _ = cubicle_syncfs(fd)
        close(fd)
        if umount2(target, Int32(UMOUNT_NOFOLLOW)) != 0 {
            guard errno == EBUSY else { throw SystemError.lastError("unmount \(target)") }
            try sys("detach \(target)") { umount2(target, Int32(MNT_DETACH | UMOUNT_NOFOLLOW)) }
        }
        guard let loop else { return }
        let polls = max(1, Int(patience * 100))
        for _ in 0..<polls {
            if !Files.exists("/sys/block/\(loop)/loop/backing_file") { return }
            try? await Task.sleep(nanoseconds: 10_000_000)
        }
        throw SystemError("wait for \(loop) to let go of the volume unmounted from \(target)", errno: EBUSY)
    }

    /// The loop device mounted at `path`, from the host's mount table (nil: not a volume's mount point).
    public static func loopDevice(mountedAt path: String) -> String? {
        guard let table = try? Files.read("/proc/self/mountinfo") else { return nil }
        for line in table.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 9, fields[4] == path, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { continue }
            let source = fields[dash + 2]
            if source.hasPrefix("/dev/loop") { return String(source.dropFirst("/dev/".count)) }
        }
        return nil
    }

    /// Bytes and inodes in use on a mounted volume.
    public static func usage(_ target: String) throws(SystemError) -> (bytes: Int64, inodes: Int64, bytesLimit: Int64, inodesLimit: Int64) {
        var s = statvfs()
        try sys("statvfs \(target)") { statvfs(target, &s) }
        let block = Int64(s.f_frsize)
        return (Int64(s.f_blocks - s.f_bfree) * block, Int64(s.f_files - s.f_ffree), Int64(s.f_blocks) * block, Int64(s.f_files))
    }

    /// Removes an unmounted image so nothing of it stays readable on the host: every block it holds is
    /// given back to the data directory's file system (punched out) before the name goes, so the data is
    /// no longer reachable through the file, and on file systems that discard freed blocks, not on the
    /// disk either.
    public static func destroy(image: String) throws(SystemError) {
        let fd = open(image, O_RDWR | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 {
            if errno == ENOENT { return }
            throw SystemError.lastError("open \(image)")
        }
        var st = stat()
        if fstat(fd, &st) == 0, st.st_size > 0 {
            // FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            _ = cubicle_punch_hole(fd, Int64(st.st_size))
            _ = fsync(fd)
        }
        close(fd)
        try sys("remove \(image)") { unlink(image) }
    }

    /// Bytes of the image file the data directory's file system holds (its allocated blocks).
    public static func allocatedBytes(_ image: String) -> Int64 {
        var st = stat()
        guard stat(image, &st) == 0 else { return 0 }
        return Int64(st.st_blocks) * 512
    }

    /// Runs a tool to completion, its output discarded; fails with its exit status.
    static func run(_ argv: [String]) throws(SystemError) {
        var pid: pid_t = 0
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        let environment = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        let rc = withCStrings(argv) { args in
            withCStrings(environment) { env in
                posix_spawnp(&pid, args[0]!, &actions, nil, args, env)
            }
        }
        guard rc == 0 else { throw SystemError("run \(argv[0])", errno: rc) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw SystemError.lastError("wait for \(argv[0])") }
        }
        guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else { throw SystemError("\(argv[0]) exited \(status >> 8 & 0xff)", errno: EIO) }
    }
}
