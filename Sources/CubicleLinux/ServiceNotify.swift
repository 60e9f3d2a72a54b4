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
        var path = Array(socketPath.utf8)
        if path.first == UInt8(ascii: "@") { path[0] = 0 }
        let fd = try sys("socket NOTIFY_SOCKET") { socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        defer { close(fd) }
        let bytes = Array(state.utf8)
        try Descriptors.withUnixAddress(path, naming: "NOTIFY_SOCKET") { address, length throws(SystemError) in
            _ = try sys("sendto \(socketPath)") {
                bytes.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), address, length) }
            }
        }
    }
}
