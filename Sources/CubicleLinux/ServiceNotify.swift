#if canImport(Glibc)
import Glibc
#endif

/// systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per state change to the
/// socket named by `$NOTIFY_SOCKET`, which may be a path or, with a leading `@`, an abstract name.
/// Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does nothing.
public struct ServiceNotify: Sendable {
    public let socketPath: String?

    public init(environment value: String? = getenv("NOTIFY_SOCKET").map { String(cString: $0) }) {
        socketPath = value.flatMap { $0.isEmpty ? nil : $0 }
    }

    public func ready(status: String) throws(SystemError) { try send("READY=1\nSTATUS=\(status)") }
    public func stopping() throws(SystemError) { try send("STOPPING=1") }

    public func send(_ state: String) throws(SystemError) {
        guard let socketPath else { return }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var path = Array(socketPath.utf8)
        if path.first == UInt8(ascii: "@") { path[0] = 0 }
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.count < capacity else { throw SystemError("NOTIFY_SOCKET longer than sun_path", errno: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + path.count)
        let fd = try sys("socket NOTIFY_SOCKET") { socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        defer { close(fd) }
        let bytes = Array(state.utf8)
        _ = try sys("sendto \(socketPath)") {
            withUnsafePointer(to: &address) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sockaddr in
                    bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sockaddr, length) }
                }
            }
        }
    }
}
