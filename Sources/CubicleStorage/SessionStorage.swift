#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import CubicleLinux
import Crypto

/// Every session's storage under `<data-dir>/storage`, the one owner of that layout:
///
///     volumes/<runtime>/<name>/volume.img   the session's file system (StorageVolume)
///     volumes/<runtime>/<name>/meta.json    runtime, owner, session id, version, created, last use
///     mounts/<name>                         where a live session's volume is mounted on the host
///
/// `<name>` is a digest of (runtime, owner, session id): ids never name a path, and the same id under another
/// owner or runtime is another volume. A volume is mounted while one sandbox of its session lives, and a new
/// sandbox of the same session waits until the last one's volume is unmounted and its loop device gone, so
/// two mounts of one image never exist.
public actor SessionStorage {
    public struct Key: Hashable, Sendable {
        public var runtime: String
        public var owner: String
        public var id: String
        public init(runtime: String, owner: String, id: String) { self.runtime = runtime; self.owner = owner; self.id = id }

        /// The directory name: a digest, so no id, however odd, reaches the file system.
        public var name: String {
            let digest = SHA256.hash(data: Array("\(runtime)\u{0}\(owner)\u{0}\(id)".utf8))
            return digest.map { b in String(b, radix: 16).count == 1 ? "0" + String(b, radix: 16) : String(b, radix: 16) }.joined()
        }
    }

    /// A mounted volume, held by one sandbox.
    public struct Lease: Sendable {
        public let key: Key
        /// Where it is mounted on the host (the sandbox gets an idmapped copy of this mount).
        public let hostPath: String
        public let image: String
    }

    public let root: String
    /// Volumes mounted now, by name; a waiter for each that a new sandbox wants.
    private var mounted: Set<String> = []
    private var waiting: [String: [CheckedContinuation<Void, Never>]] = [:]

    public init(root: String) throws(SystemError) {
        self.root = root
        try Files.makeDirectories(root + "/volumes", mode: 0o700)
        try Files.makeDirectories(root + "/mounts", mode: 0o700)
    }

    func directory(_ key: Key) -> String { "\(root)/volumes/\(key.runtime)/\(key.name)" }

    /// The session's volume mounted on the host: made empty on first use, made anew when the runtime's
    /// version changed since it was last used (AgentCore resets storage on a new version), waiting first
    /// for a sandbox of the same session that is still ending.
    public func attach(_ key: Key, version: Int, limits: StorageVolume.Limits, now: Int) async throws(SystemError) -> Lease {
        let name = key.name
        while mounted.contains(name) {
            await withCheckedContinuation { waiting[name, default: []].append($0) }
        }
        mounted.insert(name)
        do {
            let dir = directory(key), image = directory(key) + "/volume.img", meta = directory(key) + "/meta.json"
            try Files.makeDirectories(dir, mode: 0o700)
            let previous = (try? Files.read(meta)).flatMap { try? JSON.parse($0) }
            var created = previous?["created"]?.intValue.map(Int.init) ?? now
            if let previous, previous["version"]?.intValue.map(Int.init) != version || !Files.exists(image) {
                try StorageVolume.destroy(image: image)
                created = now
            }
            if !Files.exists(image) {
                try StorageVolume.create(at: image, limits: limits)
                created = now
            }
            let record: JSON = ["runtime": .string(key.runtime), "owner": .string(key.owner), "session": .string(key.id),
                                "version": .int(Int64(version)), "created": .int(Int64(created)), "lastUsed": .int(Int64(now)),
                                "bytesLimit": .int(limits.bytes), "inodesLimit": .int(Int64(limits.inodes))]
            try Files.writeAtomically(meta, record.text, durable: true)
            let hostPath = "\(root)/mounts/\(name)"
            if !Files.exists(hostPath) { try sys("mkdir \(hostPath)") { mkdir(hostPath, 0o700) } }
            try StorageVolume.mount(image: image, at: hostPath)
            return Lease(key: key, hostPath: hostPath, image: image)
        } catch {
            free(name)
            throw error
        }
    }

    /// A volume a previous cubicled mounted for a session this one has taken over.
    public func adopt(_ key: Key) -> Lease? {
        let hostPath = "\(root)/mounts/\(key.name)"
        guard Self.isMountPoint(hostPath) else { return nil }
        mounted.insert(key.name)
        return Lease(key: key, hostPath: hostPath, image: directory(key) + "/volume.img")
    }

    /// After its sandbox is gone: what the session wrote flushed to the image, the volume unmounted, its
    /// loop device waited out, and the next sandbox of the session let in.
    public func release(_ lease: Lease, now: Int) async {
        let loop = Self.loopDevice(mountedAt: lease.hostPath)
        do { try StorageVolume.unmount(lease.hostPath) } catch {
            // Still busy: detached, so the file system goes with its last user; the loop device wait below
            // is what keeps the next mount out until then.
            _ = umount2(lease.hostPath, Int32(MNT_DETACH))
        }
        if let loop { await Self.waitUntilDetached(loop) }
        let meta = directory(lease.key) + "/meta.json"
        if let text = try? Files.read(meta), case .object(var o)? = try? JSON.parse(text) {
            o["lastUsed"] = .int(Int64(now))
            try? Files.writeAtomically(meta, JSON.object(o).text, durable: true)
        }
        free(lease.key.name)
    }

    private func free(_ name: String) {
        mounted.remove(name)
        if var queue = waiting[name], !queue.isEmpty {
            let next = queue.removeFirst()
            waiting[name] = queue.isEmpty ? nil : queue
            next.resume()
        }
    }

    /// Host mounts no session holds (their sandboxes died while no cubicled watched): unmounted.
    public func unmountUnheld() async {
        for name in (try? Files.listDirectory(root + "/mounts")) ?? [] where !mounted.contains(name) {
            let path = "\(root)/mounts/\(name)"
            guard Self.isMountPoint(path) else { continue }
            let loop = Self.loopDevice(mountedAt: path)
            if (try? StorageVolume.unmount(path)) == nil { _ = umount2(path, Int32(MNT_DETACH)) }
            if let loop { await Self.waitUntilDetached(loop) }
        }
    }

    static func isMountPoint(_ path: String) -> Bool { loopDevice(mountedAt: path) != nil }

    /// The loop device mounted at `path`, from the host's mount table.
    static func loopDevice(mountedAt path: String) -> String? {
        guard let table = try? Files.read("/proc/self/mountinfo") else { return nil }
        for line in table.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 9, fields[4] == path, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { continue }
            let source = fields[dash + 2]
            if source.hasPrefix("/dev/loop") { return String(source.dropFirst("/dev/".count)) }
        }
        return nil
    }

    /// A loop device with AUTOCLEAR lets go of its image once its file system is gone: until then another
    /// mount of the image would be a second writer.
    static func waitUntilDetached(_ loop: String) async {
        for _ in 0..<500 {
            if !Files.exists("/sys/block/\(loop)/loop/backing_file") { return }
            try? await Task.sleep(nanoseconds: 10_000_000)
        }
    }
}
