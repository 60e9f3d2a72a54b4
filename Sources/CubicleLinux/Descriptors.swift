#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim

/// What a descriptor that arrived over SCM_RIGHTS really is; the sender is not trusted to say.
public enum DescriptorKind: Equatable, Sendable {
    case streamSocket(domain: Int32)
    case readablePipe
    /// The master side of a pseudo-terminal (a descriptor of devpts' ptmx, character device 5:2).
    case terminalMaster
    case other(mode: UInt32)

    public static func of(_ fd: Int32) -> DescriptorKind {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return .other(mode: 0) }
        switch st.st_mode & S_IFMT {
        case S_IFSOCK:
            var type: Int32 = 0, domain: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0, type == Int32(SOCK_STREAM.rawValue) else {
                return .other(mode: st.st_mode)
            }
            len = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 else { return .other(mode: st.st_mode) }
            return .streamSocket(domain: domain)
        case S_IFCHR:
            return st.st_rdev == makeDevice(major: 5, minor: 2) ? .terminalMaster : .other(mode: st.st_mode)
        case S_IFIFO:
            let flags = fcntl(fd, F_GETFL)
            return flags >= 0 && (flags & O_ACCMODE) == O_RDONLY ? .readablePipe : .other(mode: st.st_mode)
        default:
            return .other(mode: st.st_mode)
        }
    }
}

/// Linux's dev_t encoding (glibc's makedev).
func makeDevice(major: UInt64, minor: UInt64) -> UInt64 {
    ((major & 0xfff) << 8) | ((major & ~0xfff) << 32) | (minor & 0xff) | ((minor & ~0xff) << 12)
}

public enum Descriptors {
    /// O_PATH, which Swift's Glibc leaves out with the other _GNU_SOURCE flags.
    public static let openPathOnly: Int32 = 0o10000000

    public static func setNonBlocking(_ fd: Int32) throws(SystemError) {
        let flags = try sys("fcntl F_GETFL") { fcntl(fd, F_GETFL) }
        try sys("fcntl F_SETFL") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
    }

    /// A connected pair of Unix stream sockets, both CLOEXEC.
    public static func socketPair() throws(SystemError) -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        try sys("socketpair") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (fds[0], fds[1])
    }

    /// A Unix stream socket listening at `name` inside `directory`. The address goes through
    /// /proc/self/fd/N, so a deep state directory never meets sockaddr_un's 108-byte limit.
    public static func listenUnix(directory: String, name: String, backlog: Int32 = 4) throws(SystemError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError.lastError("socket") }
        do throws(SystemError) {
            try withUnixAddress(directory: directory, name: name) { addr, len throws(SystemError) in
                guard bind(fd, addr, len) == 0 else { throw SystemError.lastError("bind \(directory)/\(name)") }
            }
            guard listen(fd, backlog) == 0 else { throw SystemError.lastError("listen") }
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    /// Connects to the Unix socket at `name` inside `directory` (see `listenUnix`).
    public static func connectUnix(directory: String, name: String) throws(SystemError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError.lastError("socket") }
        do throws(SystemError) {
            try withUnixAddress(directory: directory, name: name) { addr, len throws(SystemError) in
                guard Glibc.connect(fd, addr, len) == 0 else { throw SystemError.lastError("connect \(directory)/\(name)") }
            }
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    private static func withUnixAddress(directory: String, name: String,
                                        _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> Void) throws(SystemError) {
        let dirfd = open(directory, openPathOnly | O_DIRECTORY | O_CLOEXEC)
        guard dirfd >= 0 else { throw .lastError("open \(directory)") }
        defer { close(dirfd) }
        try withUnixAddress(Array("/proc/self/fd/\(dirfd)/\(name)".utf8), naming: "socket \(name)", body)
    }

    /// A sockaddr_un for `path` (a leading NUL makes it abstract), with the length that covers the path.
    public static func withUnixAddress(_ path: [UInt8], naming what: String,
                                       _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> Void) throws(SystemError) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        guard path.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw SystemError("\(what) longer than sun_path", errno: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: path) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + path.count)
        var failure: SystemError?
        withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                do throws(SystemError) { try body(sa, length) } catch { failure = error }
            }
        }
        if let failure { throw failure }
    }

    public static func pipe() throws(SystemError) -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        try sys("pipe2") { cubicle_pipe_cloexec(&fds) }
        return (fds[0], fds[1])
    }

    /// Sends `bytes` with `fds` attached to its first byte; the rest of the bytes may follow in later writes.
    public static func send(_ sock: Int32, _ bytes: ArraySlice<UInt8>, fds: [Int32], flags: Int32 = 0) throws(SystemError) -> Int {
        try sys("sendmsg") {
            bytes.withUnsafeBytes { buf in
                fds.withUnsafeBufferPointer { f in
                    cubicle_send_with_fds(sock, buf.baseAddress, buf.count, f.baseAddress, Int32(f.count), flags)
                }
            }
        }
    }

    /// Receives into `buffer`; received fds are appended to `fds`. Returns 0 at end of stream.
    public static func receive(_ sock: Int32, into buffer: inout [UInt8], fds: inout [Int32], flags: Int32 = 0) throws(SystemError) -> (count: Int, truncated: Bool) {
        var incoming = [Int32](repeating: -1, count: 16)
        var nfds: Int32 = 16
        var ctrunc: Int32 = 0
        let n = try sys("recvmsg") {
            buffer.withUnsafeMutableBytes { buf in
                cubicle_recv_with_fds(sock, buf.baseAddress, buf.count, &incoming, &nfds, &ctrunc, flags)
            }
        }
        fds.append(contentsOf: incoming[0..<Int(nfds)])
        return (n, ctrunc != 0)
    }
}
