#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux

/// Overwrites a sandbox's writable tmpfs contents with zeros before its namespaces die, so the pages the
/// kernel frees hold no session data. Reaches them through /proc/<init>/root while the cgroup is frozen;
/// never follows a symlink and never leaves the tmpfs it started in.
enum TmpfsWiper {
    struct Report { var files = 0; var bytes: Int64 = 0 }

    static func wipe(initPID: pid_t) -> Report {
        var report = Report()
        guard let info = try? Files.read("/proc/\(initPID)/mountinfo") else { return report }
        for line in info.split(separator: "\n") {
            let halves = line.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2 else { continue }
            let left = halves[0].split(separator: " "), right = halves[1].split(separator: " ")
            guard left.count >= 6, right.count >= 1, right[0] == "tmpfs" else { continue }
            guard left[5].split(separator: ",").contains("rw") else { continue }
            let mountPoint = String(left[4]).replacingOctalEscapes()
            let path = "/proc/\(initPID)/root" + (mountPoint == "/" ? "" : mountPoint)
            let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { continue }
            var st = stat()
            guard fstat(fd, &st) == 0 else { close(fd); continue }
            wipeDirectory(fd, device: st.st_dev, depth: 0, report: &report)  // closes fd
        }
        return report
    }

    private static func wipeDirectory(_ dirfd: Int32, device: dev_t, depth: Int, report: inout Report) {
        guard let dir = fdopendir(dirfd) else { close(dirfd); return }
        defer { closedir(dir) }
        guard depth < 64 else { return }
        let zeros = [UInt8](repeating: 0, count: 65536)
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            var st = stat()
            guard fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_dev == device else { continue }
            switch st.st_mode & S_IFMT {
            case S_IFDIR:
                let child = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                if child >= 0 { wipeDirectory(child, device: device, depth: depth + 1, report: &report) }
            case S_IFREG:
                let f = openat(dirfd, name, O_WRONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
                guard f >= 0 else { continue }
                var offset: Int64 = 0
                while offset < Int64(st.st_size) {
                    let n = zeros.withUnsafeBytes { pwrite(f, $0.baseAddress, min($0.count, Int(Int64(st.st_size) - offset)), off_t(offset)) }
                    if n <= 0 { break }
                    offset += Int64(n)
                }
                _ = ftruncate(f, 0)
                close(f)
                report.files += 1
                report.bytes += offset
            default:
                continue
            }
        }
    }
}

extension String {
    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    func replacingOctalEscapes() -> String {
        guard contains("\\") else { return self }
        var out: [UInt8] = []
        let u = Array(utf8)
        var i = 0
        while i < u.count {
            if u[i] == 0x5C, i + 3 < u.count, let v = UInt8(String(decoding: u[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(u[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
