#if canImport(Glibc)
import Glibc
#endif

/// Small whole-file helpers for /proc, cgroupfs and the state directory, without Foundation.
public enum Files {
    public static func write(_ path: String, _ contents: String, flags: Int32 = O_WRONLY | O_TRUNC | O_CLOEXEC, mode: mode_t = 0o644) throws(SystemError) {
        let fd = try sys("open \(path)") { open(path, flags, mode) }
        defer { close(fd) }
        try writeAll(fd, Array(contents.utf8), step: "write \(path)")
    }

    /// Writes to a temp file beside `path`, fsyncs and renames it over `path`: readers see old or new, never half.
    /// `durable: false` skips the fsync: for state that only has to outlive a process, not the machine
    /// (the page cache survives a crash of the daemon), the rename alone is atomic enough.
    public static func writeAtomically(_ path: String, _ contents: String, mode: mode_t = 0o600, durable: Bool = true) throws(SystemError) {
        try writeAtomically(path, Array(contents.utf8), mode: mode, durable: durable)
    }

    public static func writeAtomically(_ path: String, _ contents: [UInt8], mode: mode_t = 0o600, durable: Bool = true) throws(SystemError) {
        let tmp = path + ".tmp"
        let fd = try sys("open \(tmp)") { open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode) }
        do {
            try writeAll(fd, contents, step: "write \(tmp)")
            if durable { try sys("fsync \(tmp)") { fsync(fd) } }
        } catch {
            close(fd)
            unlink(tmp)
            throw error
        }
        close(fd)
        try sys("rename \(tmp)") { rename(tmp, path) }
    }

    public static func writeAll(_ fd: Int32, _ bytes: [UInt8], step: String) throws(SystemError) {
        var offset = 0
        while offset < bytes.count {
            let n = try sys(step) { bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) } }
            offset += n
        }
    }

    /// Reads at most `limit` bytes; files from cgroupfs and /proc are small.
    public static func read(_ path: String, limit: Int = 1 << 20) throws(SystemError) -> String {
        let bytes = try readBytes(path, limit: limit)
        return String(decoding: bytes, as: UTF8.self)
    }

    public static func readBytes(_ path: String, limit: Int = 1 << 20) throws(SystemError) -> [UInt8] {
        let fd = try sys("open \(path)") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let n = try sys("read \(path)") { buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, min($0.count, limit - out.count)) } }
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
        }
        return out
    }

    public static func exists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }

    public static func isSocket(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK
    }

    /// The directory part of a path ("/" for "/x", "." for "x").
    public static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// mkdir -p; existing directories are fine.
    public static func makeDirectories(_ path: String, mode: mode_t = 0o755) throws(SystemError) {
        var current = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            current += "/" + part
            if mkdir(current, mode) != 0 && Glibc.errno != EEXIST {
                throw SystemError.lastError("mkdir \(current)")
            }
        }
    }

    /// rm -rf without following symlinks. Missing paths are fine.
    public static func removeTree(_ path: String) throws(SystemError) {
        var st = stat()
        if lstat(path, &st) != 0 {
            if Glibc.errno == ENOENT { return }
            throw SystemError.lastError("lstat \(path)")
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in try listDirectory(path) { try removeTree(path + "/" + name) }
            if rmdir(path) != 0 && Glibc.errno != ENOENT { throw SystemError.lastError("rmdir \(path)") }
        } else if unlink(path) != 0 && Glibc.errno != ENOENT {
            throw SystemError.lastError("unlink \(path)")
        }
    }

    public static func listDirectory(_ path: String) throws(SystemError) -> [String] {
        guard let dir = opendir(path) else { throw SystemError.lastError("opendir \(path)") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}

/// A child's id maps, written by its parent while it waits (both spawn paths: the daemon's exec'd init and
/// the fork server's clone). The same map for users and groups: the sandbox's 0..size-1 onto its host range.
public enum IDMaps {
    public static func write(_ map: String, to pid: pid_t) throws(SystemError) {
        try Files.write("/proc/\(pid)/uid_map", map)
        try Files.write("/proc/\(pid)/gid_map", map)
    }
}
