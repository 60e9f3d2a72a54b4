#if canImport(Glibc)
import Glibc
#endif
import CLibarchive
import CubicleLinux

/// Unpacks one image layer (a tar, plain, gzip or zstd, read by libarchive) into an empty directory of the
/// store, as overlayfs reads a layer: a whiteout `.wh.NAME` becomes a 0/0 character device NAME, an opaque
/// marker `.wh..wh..opq` the `trusted.overlay.opaque` xattr on its directory.
///
/// The archive is hostile until proven otherwise. No entry is ever written through a path the kernel
/// resolves for us: each parent is walked from the layer's root one component at a time with O_NOFOLLOW, so
/// `..`, an absolute name or a symlink placed earlier in the archive cannot lead outside the layer (such an
/// entry fails the whole layer). Device nodes are refused; owners above the sandbox's id range are refused;
/// every file's size, the layer's total and its entry count are bounded, which also bounds a decompression
/// bomb; xattrs (file capabilities among them) are not kept.
public struct LayerUnpacker: Sendable {
    public struct Limits: Sendable {
        public var maxLayerBytes: Int64 = 16 << 30
        public var maxFileBytes: Int64 = 8 << 30
        public var maxEntries = 1_000_000
        /// Owners must fit the sandbox's id range (0..65535 inside).
        public var maxID: Int64 = 65_535
        public init() {}
    }

    public enum Failure: Error, CustomStringConvertible, Sendable, Equatable {
        case archive(String)
        case hostile(entry: String, why: String)
        case tooLarge(String)
        case system(String)

        public var description: String {
            switch self {
            case .archive(let m): return "layer archive unreadable: \(m)"
            case .hostile(let e, let why): return "layer refused: entry \(e): \(why)"
            case .tooLarge(let m): return "layer refused: \(m)"
            case .system(let m): return "layer unpack failed: \(m)"
            }
        }
    }

    public var limits: Limits
    public init(limits: Limits = Limits()) { self.limits = limits }

    /// Unpacks `archivePath` into `directory`, which must exist and be empty. On failure the caller removes
    /// `directory`; nothing outside it has been touched. Returns the bytes written.
    @discardableResult
    public func unpack(archivePath: String, into directory: String) throws(Failure) -> Int64 {
        let root = open(directory, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard root >= 0 else { throw .system("open \(directory): errno \(errno)") }
        defer { close(root) }
        guard let a = archive_read_new() else { throw .system("archive_read_new") }
        defer { archive_read_free(a) }
        archive_read_support_filter_gzip(a)
        archive_read_support_filter_zstd(a)
        archive_read_support_filter_none(a)
        archive_read_support_format_tar(a)
        archive_read_support_format_gnutar(a)
        guard archive_read_open_filename(a, archivePath, 1 << 20) == ARCHIVE_OK else { throw .archive(Self.message(a)) }
        var total: Int64 = 0
        var count = 0
        var entry: OpaquePointer?
        while true {
            let rc = archive_read_next_header(a, &entry)
            if rc == ARCHIVE_EOF { break }
            guard rc == ARCHIVE_OK || rc == ARCHIVE_WARN, let entry else { throw .archive(Self.message(a)) }
            count += 1
            guard count <= limits.maxEntries else { throw .tooLarge("more than \(limits.maxEntries) entries") }
            try place(entry, archive: a, root: root, total: &total)
        }
        return total
    }

    private func place(_ entry: OpaquePointer, archive a: OpaquePointer, root: Int32, total: inout Int64) throws(Failure) {
        let rawName = archive_entry_pathname(entry).map { String(cString: $0) } ?? ""
        let components = try Self.components(rawName)
        if components.isEmpty { return }  // "./": the layer's root itself
        let parent = try walk(root: root, components.dropLast(), entry: rawName)
        let name = components.last!
        defer { if parent != root { close(parent) } }
        let type = archive_entry_filetype(entry)
        let mode = mode_t(archive_entry_perm(entry)) & 0o7777
        let uid = archive_entry_uid(entry), gid = archive_entry_gid(entry)
        guard uid >= 0, gid >= 0, uid <= limits.maxID, gid <= limits.maxID else {
            throw .hostile(entry: rawName, why: "owner \(uid):\(gid) is outside the sandbox's ids (0-\(limits.maxID))")
        }

        // Whiteouts, as overlayfs spells them.
        if name == ".wh..wh..opq" {
            // Both spellings: an overlay mounted by host root reads trusted.*, one mounted in a sandbox's user
            // namespace (userxattr) reads user.*.
            for name in ["trusted.overlay.opaque", "user.overlay.opaque"] {
                guard fsetxattr(parent, name, "y", 1, 0) == 0 else { throw .system("opaque \(rawName): errno \(errno)") }
            }
            return
        }
        if name.hasPrefix(".wh.") {
            let hidden = String(name.dropFirst(4))
            guard !hidden.isEmpty, hidden != ".", hidden != ".." else { throw .hostile(entry: rawName, why: "empty whiteout") }
            try removeExisting(parent, hidden)
            guard mknodat(parent, hidden, S_IFCHR | 0, 0) == 0 else { throw .system("whiteout \(rawName): errno \(errno)") }
            return
        }

        let hardlink = archive_entry_hardlink(entry).map { String(cString: $0) }
        if let hardlink {
            let target = try Self.components(hardlink)
            guard !target.isEmpty else { throw .hostile(entry: rawName, why: "hard link to the layer's root") }
            let targetParent = try walk(root: root, target.dropLast(), entry: rawName, create: false)
            defer { if targetParent != root { close(targetParent) } }
            try removeExisting(parent, name)
            // linkat without AT_SYMLINK_FOLLOW links the name itself, never what a symlink points to.
            guard linkat(targetParent, target.last!, parent, name, 0) == 0 else {
                throw .hostile(entry: rawName, why: "hard link to \(hardlink), not in this layer (errno \(errno))")
            }
            return
        }

        switch type {
        case S_IFDIR:
            var st = stat()
            if fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) == 0 {
                guard st.st_mode & S_IFMT == S_IFDIR else { try removeExisting(parent, name); try mkdir(parent, name, rawName) ; break }
            } else {
                try mkdir(parent, name, rawName)
            }
        case S_IFREG:
            let size = archive_entry_size(entry)
            guard size >= 0, size <= limits.maxFileBytes else { throw .tooLarge("\(rawName) is \(size) bytes (at most \(limits.maxFileBytes) a file)") }
            guard total + size <= limits.maxLayerBytes else { throw .tooLarge("more than \(limits.maxLayerBytes) bytes unpacked") }
            try removeExisting(parent, name)
            let fd = openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw .system("create \(rawName): errno \(errno)") }
            defer { close(fd) }
            total += try copyData(a, to: fd, size: size, entry: rawName)
            guard ftruncate(fd, off_t(size)) == 0 else { throw .system("size \(rawName): errno \(errno)") }
        case S_IFLNK:
            let target = archive_entry_symlink(entry).map { String(cString: $0) } ?? ""
            guard !target.isEmpty, target.utf8.count < 4096 else { throw .hostile(entry: rawName, why: "empty or overlong symlink") }
            try removeExisting(parent, name)
            // Its target is read inside the sandbox's root only; here nothing ever follows it.
            guard symlinkat(target, parent, name) == 0 else { throw .system("symlink \(rawName): errno \(errno)") }
        case S_IFIFO:
            try removeExisting(parent, name)
            guard mknodat(parent, name, S_IFIFO | mode, 0) == 0 else { throw .system("fifo \(rawName): errno \(errno)") }
        case S_IFCHR, S_IFBLK:
            throw .hostile(entry: rawName, why: "device node (a sandbox gets Cubicle's /dev, never an image's)")
        default:
            throw .hostile(entry: rawName, why: "unsupported file type \(type)")
        }
        guard fchownat(parent, name, uid_t(uid), gid_t(gid), AT_SYMLINK_NOFOLLOW) == 0 else { throw .system("chown \(rawName): errno \(errno)") }
        if type != S_IFLNK {
            // After chown, which clears setuid: the image's own bits, setuid included (no_new_privs inside
            // makes them grant nothing; the store is root's alone outside).
            guard fchmodat(parent, name, mode, 0) == 0 else { throw .system("chmod \(rawName): errno \(errno)") }
        }
    }

    private func mkdir(_ parent: Int32, _ name: String, _ raw: String) throws(Failure) {
        guard mkdirat(parent, name, 0o700) == 0 else { throw .system("mkdir \(raw): errno \(errno)") }
    }

    /// Writes an entry's data at its offsets (holes stay holes), never more than its declared size.
    private func copyData(_ a: OpaquePointer, to fd: Int32, size: Int64, entry: String) throws(Failure) -> Int64 {
        var written: Int64 = 0
        while true {
            var block: UnsafeRawPointer?
            var length = 0
            var offset: la_int64_t = 0
            let rc = archive_read_data_block(a, &block, &length, &offset)
            if rc == ARCHIVE_EOF { return written }
            guard rc == ARCHIVE_OK || rc == ARCHIVE_WARN else { throw .archive(Self.message(a)) }
            guard offset >= 0, Int64(offset) + Int64(length) <= size else { throw .hostile(entry: entry, why: "data past its declared size") }
            var done = 0
            while done < length {
                let n = pwrite(fd, block! + done, length - done, off_t(offset) + off_t(done))
                if n < 0 { if errno == EINTR { continue }; throw .system("write \(entry): errno \(errno)") }
                done += n
            }
            written += Int64(length)
        }
    }

    private func removeExisting(_ parent: Int32, _ name: String) throws(Failure) {
        var st = stat()
        guard fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { return }
        if st.st_mode & S_IFMT == S_IFDIR {
            // A later entry replacing a directory: only an empty one (a tar that rewrites trees is refused).
            guard unlinkat(parent, name, AT_REMOVEDIR) == 0 else { throw .hostile(entry: name, why: "replaces a non-empty directory") }
        } else {
            guard unlinkat(parent, name, 0) == 0 else { throw .system("replace \(name): errno \(errno)") }
        }
    }

    /// Opens the directory `path` below `root` one component at a time, never following a symlink, making
    /// missing directories (root-owned, 0755) when `create`.
    private func walk(root: Int32, _ path: ArraySlice<String>, entry: String, create: Bool = true) throws(Failure) -> Int32 {
        var current = root
        for component in path {
            var next = openat(current, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if next < 0 && errno == ENOENT && create {
                guard mkdirat(current, component, 0o755) == 0 || errno == EEXIST else { throw .system("mkdir \(component) of \(entry): errno \(errno)") }
                next = openat(current, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            }
            let e = errno
            if current != root { close(current) }
            guard next >= 0 else {
                throw e == ELOOP || e == ENOTDIR ? .hostile(entry: entry, why: "a parent is a symlink or not a directory") : .hostile(entry: entry, why: "parent \(component): errno \(e)")
            }
            current = next
        }
        return current
    }

    /// An entry's name as components below the layer's root: leading `/` and `./` dropped, `.` skipped,
    /// `..` refused, every component at most 255 bytes.
    static func components(_ name: String) throws(Failure) -> [String] {
        guard !name.utf8.contains(0), name.utf8.count < 4096 else { throw .hostile(entry: name, why: "bad name") }
        var out: [String] = []
        for c in name.split(separator: "/") {
            if c == "." { continue }
            guard c != ".." else { throw .hostile(entry: name, why: "'..' in the path") }
            guard c.utf8.count <= 255 else { throw .hostile(entry: name, why: "component over 255 bytes") }
            out.append(String(c))
        }
        return out
    }

    /// An xattr's value (tests and the store read the overlay markers back).
    public static func xattr(_ path: String, _ name: String) -> String? {
        var value = [UInt8](repeating: 0, count: 256)
        let n = lgetxattr(path, name, &value, value.count)
        return n >= 0 ? String(decoding: value[0..<n], as: UTF8.self) : nil
    }

    static func message(_ a: OpaquePointer) -> String {
        archive_error_string(a).map { String(cString: $0) } ?? "error \(archive_errno(a))"
    }
}
