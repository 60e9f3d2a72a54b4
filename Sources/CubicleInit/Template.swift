#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC

/// A runtime's read-only tree (host binds, /etc, /dev's nodes, mount points), built once by the fork
/// server in a mount namespace of its own and kept as that namespace's descriptor. Each clone starts in a
/// copy of it, so a sandbox's filesystem costs the few per-sandbox mounts instead of the whole build
/// (init filesystem 0.9-1.2 ms to 0.4-0.5 ms here).
///
/// Its namespace, after the pivot into its scaffolding:
///
///     /           a small tmpfs, dropped by each clone's pivot
///     /proc       a proc mount: a user namespace may mount proc only where one is fully visible
///     /dev/null   for the clone's stdio before its pivot
///     /root       the tree (`tree`), read-only throughout
///     /new        where a clone binds the tree and pivots (`newRoot`)
///
/// The namespace belongs to the host's user namespace, so a clone's copy has every mount locked: inside, the
/// tree cannot be made writable or unmounted to show what lies beneath. Nothing of it is on the host: it
/// lives as long as the server holds the descriptor.
///
/// A template is used only while its sources still name what it bound (device, inode and mount of each,
/// checked at every launch): a host file replaced by rename, such as resolv.conf, or a directory mounted over
/// a source gets a new template. A mount made later *below* a bound directory is not seen until the
/// template is rebuilt for another reason.
struct Template {
    static let tree = "/root"
    static let newRoot = "/new"

    let namespace: Int32
    let identities: [cubicle_file_identity]

    /// nil when any step fails (a missing source, no mount_setattr): the clone then builds the whole tree
    /// itself, and reports the failing step as an exec'd init would. Runs in the single-threaded server,
    /// which is back in `hostNamespace` on return.
    static func build(config: InitConfig, sources: [String], hostNamespace: Int32) -> Template? {
        guard cubicle_mount_setattr_available() != 0 else { return nil }
        // Identities as the host sees them, which later launches compare with; the descriptors are opened
        // in the new namespace, where a bind must find its source (a mount of the host's namespace is refused).
        var identities: [cubicle_file_identity] = []
        for path in sources {
            var id = cubicle_file_identity()
            guard cubicle_file_identity_of(AT_FDCWD, path, &id) == 0 else { return nil }
            identities.append(id)
        }
        guard cubicle_unshare_mounts() == 0 else { return nil }
        defer {
            _ = cubicle_enter_mounts(hostNamespace)
            _ = chdir("/")
        }
        var fds: [Int32] = []
        defer { fds.forEach { _ = close($0) } }
        for (path, was) in zip(sources, identities) {
            let fd = open(path, Descriptors.openPathOnly | O_CLOEXEC)
            guard fd >= 0 else { return nil }
            fds.append(fd)
            var id = cubicle_file_identity()
            guard cubicle_file_identity_of(fd, "", &id) == 0, id.dev == was.dev, id.ino == was.ino else { return nil }
        }
        let filesystem = RootFilesystem(config: config)
        let scaffold = filesystem.staging
        do throws(SystemError) {
            try sys("make / private") { mount(nil, "/", nil, UInt(MS_REC | MS_PRIVATE), nil) }
            try filesystem.mountTmpfs(scaffold, bytes: 65536, mode: "0755")
            for dir in ["/proc", tree, newRoot, "/dev"] { try sys("mkdir \(dir)") { mkdir(scaffold + dir, 0o755) } }
            close(try sys("create /dev/null") { open(scaffold + "/dev/null", O_WRONLY | O_CREAT | O_CLOEXEC, 0o644) })
            try sys("bind /dev/null") { mount("/dev/null", scaffold + "/dev/null", nil, UInt(MS_BIND), nil) }
            try sys("mount proc") { mount("proc", scaffold + "/proc", "proc", UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), nil) }
            try filesystem.mountTmpfs(scaffold + tree, bytes: config.rootBytes, mode: "0755")
            guard try filesystem.buildReadOnlyPart(at: scaffold + tree, sourceFD: { fds[$0] }) else { return nil }
            try filesystem.pivot(into: scaffold, rootIsReadOnly: true)
        } catch {
            return nil
        }
        let namespace = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC)
        guard namespace >= 0 else { return nil }
        return Template(namespace: namespace, identities: identities)
    }

    /// Whether each source still names what was bound.
    func isCurrent(sources: [String]) -> Bool {
        guard sources.count == identities.count else { return false }
        for (path, was) in zip(sources, identities) {
            var now = cubicle_file_identity()
            guard cubicle_file_identity_of(AT_FDCWD, path, &now) == 0,
                  now.dev == was.dev, now.ino == was.ino, now.mnt_id == was.mnt_id else { return false }
        }
        return true
    }
}

/// What a template's tree is made of: the parts of the configuration the read-only part reads, and the
/// host paths bound. Sandboxes that differ only in limits, seccomp or tmpfs sizes share one.
struct TemplateKey: Equatable {
    var mounts: [InitConfig.Mount]
    var sources: [String]
    var hostname: String
    var rootBytes: Int64
    var agentUID: UInt32
    var agentGID: UInt32
    var mountPoints: [String]

    init(_ config: InitConfig, sources: [String]) {
        (mounts, self.sources, hostname, mountPoints) = (config.mounts, sources, config.hostname, config.mountPoints)
        (rootBytes, agentUID, agentGID) = (config.rootBytes, config.agentUID, config.agentGID)
    }
}

/// The server's templates, one per `TemplateKey` (one per runtime, usually), the least recently used
/// dropped beyond `capacity`.
struct TemplateStore {
    static let capacity = 8
    private var entries: [(key: TemplateKey, template: Template)] = []
    let hostNamespace: Int32

    init(hostNamespace: Int32) {
        self.hostNamespace = hostNamespace
    }

    /// A current template for this configuration, built if there is none; nil: build the whole tree.
    mutating func template(config: InitConfig, sources: [String]) -> Template? {
        let key = TemplateKey(config, sources: sources)
        if let i = entries.firstIndex(where: { $0.key == key }) {
            let entry = entries.remove(at: i)
            if entry.template.isCurrent(sources: sources) {
                entries.append(entry)
                return entry.template
            }
            close(entry.template.namespace)
        }
        guard let template = Template.build(config: config, sources: sources, hostNamespace: hostNamespace) else { return nil }
        entries.append((key, template))
        if entries.count > Self.capacity { close(entries.removeFirst().template.namespace) }
        return template
    }
}
