#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC

final class MadeDirectories {
    var paths: Set<String> = []
}

/// Builds the sandbox's filesystem inside the new mount namespace, then pivots into it.
/// Runs before any thread exists and before the agent starts; every failure names its step.
///
/// The tree has two parts. The read-only part (host binds, the generated /etc files, /dev's nodes and
/// links, the empty mount points) is the same for every sandbox of a runtime; the per-sandbox part (/proc,
/// /dev/pts, /dev/shm, /tmp, the agent's home) is not. An exec'd init builds both. Under the fork server
/// the read-only part is built once per runtime into a template mount namespace (`Template`), and each
/// clone starts in a copy of it and adds only the per-sandbox mounts.
struct RootFilesystem {
    let config: InitConfig
    /// Directories known to exist, so a deep tree costs one mkdir per directory rather than one per ancestor.
    private let made = MadeDirectories()
    /// Where the new root is assembled. Its host contents are shadowed only inside this namespace, and
    /// no bind source is looked up by path, so any existing world-traversable directory will do.
    let staging = "/tmp"

    init(config: InitConfig) {
        self.config = config
    }

    /// runc's masked and read-only /proc paths.
    static let maskedPaths = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                              "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/proc/interrupts"]
    static let readOnlyPaths = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
    static let devices = ["null", "zero", "full", "random", "urandom", "tty"]

    /// The whole tree, for an exec'd init: sources are the descriptors the launch placed for it.
    func build() throws(SystemError) {
        try sys("make / private") { mount(nil, "/", nil, UInt(MS_REC | MS_PRIVATE), nil) }
        try mountTmpfs(staging, bytes: config.rootBytes, mode: "0755")
        let oneCall = try buildReadOnlyPart(at: staging) { InitConfig.firstSourceFD + Int32($0) }
        try mountPerSandboxPart(at: staging)
        try pivot(into: staging, rootIsReadOnly: oneCall)
        try nameAndNetwork()
    }

    /// For a clone started in a copy of a template namespace: the template's tree bound to a new root (a
    /// bind of our own, which pivot_root accepts where the template's locked copy is refused), then the
    /// per-sandbox part, then the pivot, which drops the template's scaffolding with the old root.
    func buildFromTemplate() throws(SystemError) {
        let root = Template.newRoot
        try sys("bind template root") { mount(Template.tree, root, nil, UInt(MS_BIND | MS_REC), nil) }
        try mountPerSandboxPart(at: root)
        try pivot(into: root, rootIsReadOnly: true)
        try nameAndNetwork()
    }

    /// An image root: the layers (top first, idmapped mounts from the host) under an overlay whose upper
    /// layer is this sandbox's root tmpfs, so writes anywhere the image allows land there and go with the
    /// sandbox; then Cubicle's own parts over it as for any sandbox (/proc, /dev, /tmp, the agent's home,
    /// hostname, resolv.conf), the read-only binds the runtime names, and the pivot. No host path is
    /// visible but those binds.
    func buildImage(layers: [Int32]) throws(SystemError) {
        try sys("make / private") { mount(nil, "/", nil, UInt(MS_REC | MS_PRIVATE), nil) }
        try mountTmpfs(staging, bytes: config.rootBytes, mode: "0700")
        var lower: [String] = []
        for (i, fd) in layers.enumerated() {
            let point = "\(staging)/layers/\(i)"
            try mkdirs(point)
            try sys("attach layer \(i)") { cubicle_move_mount_to(fd, point) }
            lower.append(point)
        }
        let root = staging + "/root"
        for dir in ["/upper", "/work", "/root"] { try mkdirs(staging + dir) }
        // userxattr: an overlay in a user namespace keeps its own markers in user.overlay.* (the store
        // writes opaque directories both ways).
        let options = "lowerdir=\(lower.joined(separator: ":")),upperdir=\(staging)/upper,workdir=\(staging)/work,userxattr"
        try sys("mount overlay") { mount("overlay", root, "overlay", UInt(MS_NOSUID | MS_NODEV), options) }
        // The image's tree is the image's: until the pivot, a symlink in it would resolve against the host's
        // root. Every path Cubicle mounts on or writes is first made a real directory or file, component by
        // component without following a symlink (one in the way is replaced), so the path calls after it
        // stay in the image.
        for dir in ["/proc", "/tmp", InitConfig.agentHome, "/dev", "/etc", InitConfig.imageUpper] + config.mountPoints { try realPath(root, dir, directory: true) }
        try mountImageHostBinds(at: root)
        try writeInImage(root, "/etc/hostname", config.hostname + "\n")
        if let nameserver = config.nameserver { try writeInImage(root, "/etc/resolv.conf", "nameserver \(nameserver)\noptions timeout:2 attempts:2\n") }
        try mountDevNodes(at: root + "/dev")
        try makeReadOnly(root + "/dev", nodev: false)
        try mountPerSandboxPart(at: root)
        // The upper layer's tmpfs, where the host's wipe finds it; root-only (0700) inside.
        try sys("bind upper") { mount(staging, root + InitConfig.imageUpper, nil, UInt(MS_BIND), nil) }
        try pivot(into: root, rootIsReadOnly: true)
        try nameAndNetwork()
    }

    /// The runtime's read-only binds (code directory, readOnlyMounts, and the host's resolv.conf and hosts
    /// where no session DNS writes its own) over the image, each made read-only on its own.
    private func mountImageHostBinds(at root: String) throws(SystemError) {
        for m in config.mounts {
            guard case .bindReadOnly(let index, let directory) = m.kind else { continue }
            let target = root + m.target
            try realPath(root, m.target, directory: directory)
            try bind("/proc/self/fd/\(InitConfig.firstSourceFD + Int32(index))", target, directory: directory, step: "bind \(m.target)")
            try makeReadOnly(target)
        }
    }

    /// Makes `path` under `root` a real directory (or, with `directory` false, a real file, and its parents
    /// real directories), never following a symlink: whatever is in the way (a symlink, a file where a
    /// directory belongs) is removed from the image's tree (an overlay whiteout) and made anew.
    private func realPath(_ root: String, _ path: String, directory: Bool) throws(SystemError) {
        let parts = path.split(separator: "/").map(String.init)
        var fd = try sys("open image root") { open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        defer { close(fd) }
        for (i, part) in parts.enumerated() {
            let last = i == parts.count - 1
            if last && !directory {
                let f = openat(fd, part, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644)
                if f >= 0 { close(f); return }
                _ = unlinkat(fd, part, 0)
                _ = unlinkat(fd, part, AT_REMOVEDIR)
                let again = try sys("create \(path)") { openat(fd, part, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644) }
                close(again)
                return
            }
            var next = openat(fd, part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if next < 0 {
                _ = unlinkat(fd, part, 0)
                _ = mkdirat(fd, part, 0o755)
                next = try sys("make \(path)") { openat(fd, part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
            }
            close(fd)
            fd = next
        }
    }

    /// Writes a file of the image's /etc through a real file `realPath` made, not through a path.
    private func writeInImage(_ root: String, _ path: String, _ contents: String) throws(SystemError) {
        try realPath(root, path, directory: false)
        let dir = try sys("open \(Files.parent(path))") { open(root + Files.parent(path), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        defer { close(dir) }
        let name = String(path.split(separator: "/").last!)
        let fd = try sys("open \(path)") { openat(dir, name, O_WRONLY | O_TRUNC | O_NOFOLLOW | O_CLOEXEC) }
        defer { close(fd) }
        try Files.writeAll(fd, Array(contents.utf8), step: "write \(path)")
    }

    /// The read-only part under `root` (a fresh tmpfs): host binds from `sourceFD(index)`, identity files,
    /// /dev's nodes and links, mount points. Returns whether it is read-only already (mount_setattr exists);
    /// before Linux 5.12 each bind is remounted read-only on its own and the root at the pivot.
    func buildReadOnlyPart(at root: String, sourceFD: (Int) -> Int32) throws(SystemError) -> Bool {
        let oneCall = try mountFromHost(at: root, sourceFD: sourceFD)
        try writeIdentityFiles(at: root)
        // Where the per-sandbox part mounts (/dev's own pts and shm come with its tmpfs below).
        for dir in ["/proc", "/tmp", InitConfig.agentHome, "/dev"] + config.mountPoints { try mkdirs(root + dir) }
        // One call makes the root and every bind under it read-only, nosuid and nodev, recursively; /dev,
        // mounted after it, keeps its devices usable.
        if oneCall { try makeReadOnly(root) }
        try mountDevNodes(at: root + "/dev")
        if oneCall { try makeReadOnly(root + "/dev", nodev: false) } else { try remountReadOnly(root + "/dev", extra: UInt(MS_NOSUID | MS_NOEXEC)) }
        return oneCall
    }

    /// What each sandbox gets of its own: /proc of its pid namespace, a devpts instance, and writable tmpfs
    /// for /dev/shm, /tmp and the agent's home. The mount points exist already (the tree may be read-only).
    func mountPerSandboxPart(at root: String) throws(SystemError) {
        // Files in /proc are masked with the tree's own /dev/null, read-only like the rest of it.
        try mountProc(at: root + "/proc", devNull: root + "/dev/null")
        try sys("mount devpts") {
            mount("devpts", root + "/dev/pts", "devpts", UInt(MS_NOSUID | MS_NOEXEC), "newinstance,ptmxmode=0666,mode=0620")
        }
        try mountTmpfs(root + "/dev/shm", bytes: config.tmpBytes, mode: "1777", flags: Int(MS_NOEXEC))
        try mountTmpfs(root + "/tmp", bytes: config.tmpBytes, mode: "1777")
        try mountTmpfs(root + InitConfig.agentHome, bytes: config.homeBytes, mode: "0700",
                       extra: ",uid=\(config.agentUID),gid=\(config.agentGID)")
    }

    private func nameAndNetwork() throws(SystemError) {
        try sys("sethostname") { config.hostname.withCString { sethostname($0, strlen($0)) } }
        try sys("loopback up") { cubicle_loopback_up() }
    }

    private func mkdirs(_ path: String) throws(SystemError) {
        guard !made.paths.contains(path) else { return }
        var current = ""
        for part in path.split(separator: "/") {
            current += "/" + part
            guard !made.paths.contains(current) else { continue }
            if mkdir(current, 0o755) != 0 && errno != EEXIST && !(errno == EROFS && Files.isDirectory(current)) {
                throw SystemError.lastError("mkdir \(current)")
            }
            made.paths.insert(current)
        }
    }

    func mountTmpfs(_ target: String, bytes: Int64, mode: String, extra: String = "", flags: Int = 0) throws(SystemError) {
        try mkdirs(target)
        let options = "size=\(bytes),mode=\(mode)\(extra)"
        try sys("mount tmpfs \(target)") {
            mount("tmpfs", target, "tmpfs", UInt(Int(MS_NOSUID | MS_NODEV) | flags), options)
        }
    }

    /// Read-only, nosuid and nodev for the bind and every mount under it: a host /usr with /usr/local
    /// mounted apart must not bring a writable mount in with it.
    func makeReadOnly(_ target: String, nodev: Bool = true) throws(SystemError) {
        if cubicle_mount_setattr_readonly(target, nodev ? 1 : 0) == 0 { return }
        guard errno == ENOSYS else { throw SystemError.lastError("make read-only \(target)") }
        try remountReadOnly(target, extra: UInt(MS_NOSUID | (nodev ? MS_NODEV : 0)))
    }

    /// Before Linux 5.12: a remount, which reaches only the top mount and must repeat the flags the kernel
    /// has locked on the source mount (nosuid, nodev, noexec, atime) or it fails with EPERM in a user namespace.
    private func remountReadOnly(_ target: String, extra: UInt = 0) throws(SystemError) {
        var st = statvfs()
        try sys("statvfs \(target)") { statvfs(target, &st) }
        var flags = UInt(MS_REMOUNT | MS_BIND | MS_RDONLY) | extra
        // ST_* values from <sys/statvfs.h>; Glibc's Swift module leaves the GNU ones out.
        let keep: [(UInt, UInt)] = [(2, UInt(MS_NOSUID)), (4, UInt(MS_NODEV)), (8, UInt(MS_NOEXEC)),
                                    (1024, UInt(MS_NOATIME)), (2048, UInt(MS_NODIRATIME)), (4096, UInt(MS_RELATIME))]
        for (st_flag, ms_flag) in keep where st.f_flag & st_flag != 0 { flags |= ms_flag }
        try sys("remount read-only \(target)") { mount(nil, target, nil, flags, nil) }
    }

    private func bind(_ source: String, _ target: String, directory: Bool, step: String) throws(SystemError) {
        if directory {
            try mkdirs(target)
        } else {
            try mkdirs(Files.parent(target))
            let fd = try sys("create \(target)") { open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0o644) }
            close(fd)
        }
        try sys(step) { mount(source, target, nil, UInt(MS_BIND | MS_REC), nil) }
    }

    /// Binds the host paths. Returns whether mount_setattr exists, so the caller can make them all
    /// read-only at once; without it (before 5.12) each bind is remounted read-only here.
    private func mountFromHost(at root: String, sourceFD: (Int) -> Int32) throws(SystemError) -> Bool {
        let hasSetattr = cubicle_mount_setattr_available() != 0
        for m in config.mounts {
            let target = root + m.target
            switch m.kind {
            case .bindReadOnly(let index, let directory):
                let source = "/proc/self/fd/\(sourceFD(index))"
                try bind(source, target, directory: directory, step: "bind \(m.target)")
                if !hasSetattr { try remountReadOnly(target, extra: UInt(MS_NOSUID | MS_NODEV)) }
            case .symlink(let destination):
                try mkdirs(Files.parent(target))
                try sys("symlink \(m.target)") { symlink(destination, target) }
            }
        }
        return hasSetattr
    }

    private func mountProc(at proc: String, devNull: String) throws(SystemError) {
        try sys("mount proc") { mount("proc", proc, "proc", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), nil) }
        for path in Self.maskedPaths {
            let target = proc + path.dropFirst("/proc".count)
            var st = stat()
            guard lstat(target, &st) == 0 else { continue }
            if (st.st_mode & S_IFMT) == S_IFDIR {
                try sys("mask \(path)") { mount("tmpfs", target, "tmpfs", UInt(MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC), "size=0") }
            } else {
                try sys("mask \(path)") { mount(devNull, target, nil, UInt(MS_BIND), nil) }
            }
        }
        for path in Self.readOnlyPaths {
            let target = proc + path.dropFirst("/proc".count)
            guard access(target, F_OK) == 0 else { continue }
            try sys("bind \(path)") { mount(target, target, nil, UInt(MS_BIND | MS_REC), nil) }
            try makeReadOnly(target)
        }
    }

    /// /dev's own tmpfs with the few safe host devices bound in (a user namespace cannot mknod) and its
    /// links; devpts and shm are per sandbox.
    private func mountDevNodes(at dev: String) throws(SystemError) {
        try mountTmpfs(dev, bytes: 65536, mode: "0755", flags: Int(MS_NOEXEC))
        for name in Self.devices {
            try bind("/dev/" + name, dev + "/" + name, directory: false, step: "bind /dev/\(name)")
        }
        for dir in ["pts", "shm"] { try mkdirs(dev + "/" + dir) }
        try sys("symlink /dev/ptmx") { symlink("pts/ptmx", dev + "/ptmx") }
        for (name, destination) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
            try sys("symlink /dev/\(name)") { symlink(destination, dev + "/" + name) }
        }
    }

    private func writeIdentityFiles(at root: String) throws(SystemError) {
        let etc = root + "/etc"
        try mkdirs(etc)
        let u = config.agentUID, g = config.agentGID
        let user = InitConfig.agentUser, home = InitConfig.agentHome
        try Files.write(etc + "/passwd", "root:x:0:0:root:/root:/bin/sh\n\(user):x:\(u):\(g):\(user):\(home):/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", flags: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC)
        try Files.write(etc + "/group", "root:x:0:\n\(user):x:\(g):\nnogroup:x:65534:\n", flags: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC)
        try Files.write(etc + "/hostname", config.hostname + "\n", flags: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC)
        if let nameserver = config.nameserver {
            try Files.write(etc + "/resolv.conf", "nameserver \(nameserver)\noptions timeout:2 attempts:2\n", flags: O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC)
        }
    }

    /// pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no host path reachable.
    func pivot(into root: String, rootIsReadOnly: Bool) throws(SystemError) {
        try sys("chdir new root") { chdir(root) }
        try sys("pivot_root") { cubicle_pivot_root(".", ".") }
        try sys("detach old root") { umount2(".", Int32(MNT_DETACH)) }
        try sys("chdir /") { chdir("/") }
        if rootIsReadOnly { return }
        try sys("remount / read-only") { mount(nil, "/", nil, UInt(MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV), nil) }
    }
}
