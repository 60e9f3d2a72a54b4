#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim

/// What a descriptor that arrived over SCM_RIGHTS really is; the sender is not trusted to say.
public enum DescriptorKind: Equatable, Sendable {
    case streamSocket(domain: Int32)
    case readablePipe
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
        case S_IFIFO:
            let flags = fcntl(fd, F_GETFL)
            return flags >= 0 && (flags & O_ACCMODE) == O_RDONLY ? .readablePipe : .other(mode: st.st_mode)
        default:
            return .other(mode: st.st_mode)
        }
    }
}

public enum Descriptors {
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
