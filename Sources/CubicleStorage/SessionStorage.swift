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
            Hex.encode(Array(SHA256.hash(data: Array("\(runtime)\u{0}\(owner)\u{0}\(id)".utf8))))
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
    /// Mounted volumes removed meanwhile (their runtime or endpoint deleted): destroyed at release.
    private var doomed: Set<String> = []

    public init(root: String) throws(SystemError) {
        self.root = root
        try Files.makeDirectories(root + "/volumes", mode: 0o700)
        try Files.makeDirectories(root + "/mounts", mode: 0o700)
    }

    func directory(_ key: Key) -> String { "\(root)/volumes/\(key.runtime)/\(key.name)" }

    /// The session's volume mounted on the host: made empty on first use, made anew when the runtime's
    /// version changed since it was last used (AgentCore resets storage on a new version), waiting first
    /// for a sandbox of the same session that is still ending.
    public func attach(_ key: Key, version: Int, endpoint: String, limits: StorageVolume.Limits, now: Int) async throws(SystemError) -> Lease {
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
            doomed.remove(name)
            let record: JSON = ["runtime": .string(key.runtime), "owner": .string(key.owner), "session": .string(key.id), "endpoint": .string(endpoint),
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
        // A volume still held after the wait is left detached, going with its last user; the session's
        // next sandbox mounts the image anew.
        try? await StorageVolume.unmount(lease.hostPath)
        if doomed.remove(lease.key.name) != nil {
            destroy(directory(lease.key))
            free(lease.key.name)
            return
        }
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
            try? await StorageVolume.unmount(path)
        }
    }

    // MARK: - What is kept

    /// One session's volume, as operators see it.
    public struct Entry: Sendable {
        public var name: String
        public var runtime: String
        public var owner: String
        public var session: String
        public var endpoint: String
        public var version: Int
        public var created: Int
        public var lastUsed: Int
        /// What the image holds on the data directory's file system.
        public var bytes: Int64
        public var bytesLimit: Int64
        public var mounted: Bool
    }

    /// Every kept volume, oldest use first.
    public func list() -> [Entry] {
        var out: [Entry] = []
        for runtime in (try? Files.listDirectory(root + "/volumes")) ?? [] {
            for name in (try? Files.listDirectory("\(root)/volumes/\(runtime)")) ?? [] {
                let dir = "\(root)/volumes/\(runtime)/\(name)"
                guard let text = try? Files.read(dir + "/meta.json"), let m = try? JSON.parse(text) else { continue }
                out.append(Entry(name: name, runtime: m["runtime"]?.stringValue ?? runtime, owner: m["owner"]?.stringValue ?? "",
                                 session: m["session"]?.stringValue ?? "", endpoint: m["endpoint"]?.stringValue ?? "DEFAULT",
                                 version: Int(m["version"]?.intValue ?? 0), created: Int(m["created"]?.intValue ?? 0),
                                 lastUsed: Int(m["lastUsed"]?.intValue ?? 0), bytes: StorageVolume.allocatedBytes(dir + "/volume.img"),
                                 bytesLimit: m["bytesLimit"]?.intValue ?? 0, mounted: mounted.contains(name)))
            }
        }
        return out.sorted { $0.lastUsed < $1.lastUsed }
    }

    /// Removes the volumes `which` selects: at once where unmounted, at their sandbox's end where mounted.
    /// Returns how many were selected.
    @discardableResult
    public func remove(where which: (Entry) -> Bool) -> Int {
        var n = 0
        for entry in list() where which(entry) {
            n += 1
            if entry.mounted {
                doomed.insert(entry.name)
            } else {
                destroy("\(root)/volumes/\(entry.runtime)/\(entry.name)")
            }
        }
        return n
    }

    /// A runtime's volumes (all of them, or those its sessions made through `endpoint`), as AgentCore
    /// removes them with the runtime or the endpoint.
    @discardableResult
    public func remove(runtime: String, endpoint: String? = nil) -> Int {
        remove { $0.runtime == runtime && (endpoint == nil || $0.endpoint == endpoint) }
    }

    /// Volumes not used for `seconds` (AgentCore: 14 days), removed; mounted ones are in use, so never.
    @discardableResult
    public func expire(now: Int, after seconds: Int) -> Int {
        remove { !$0.mounted && $0.lastUsed + seconds <= now }
    }

    /// The image given back block by block, then its record and directory.
    private func destroy(_ dir: String) {
        try? StorageVolume.destroy(image: dir + "/volume.img")
        unlink(dir + "/meta.json")
        rmdir(dir)
    }

    static func isMountPoint(_ path: String) -> Bool { StorageVolume.loopDevice(mountedAt: path) != nil }
}
