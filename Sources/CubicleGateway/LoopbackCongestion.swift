import Glibc
import NIOCore

/// A common host default, BBR, paces every connection; on loopback, where there is no link to share, that
/// pacing only costs the sender CPU (timers and smaller segments) — in a 100 MB echo it doubled cubicled's
/// CPU time. So a client connection from this host uses CUBIC: the socket is in the host's namespace, where
/// cubicled holds CAP_NET_ADMIN, so the kernel grants any available algorithm, allowed or not. Reno, which
/// every kernel has, only where CUBIC is not built. The sandbox's loopback does the same within what a
/// namespace may default to (`cubicle_netns_loopback_congestion_control`). Remote clients keep the host's
/// choice.
public enum LoopbackCongestion {
    /// A numeric loopback address (127/8, ::1, or 127/8 mapped into IPv6) or `localhost`; a wildcard, any
    /// other address or any other name is not, since a name may resolve to anything. For `--listen`.
    public static func isLoopback(host: String) -> Bool {
        host == "localhost" || isLoopback(try? SocketAddress(ipAddress: host, port: 0))
    }

    static func isLoopback(_ address: SocketAddress?) -> Bool {
        switch address {
        case .v4(let a):
            return UInt32(bigEndian: a.address.sin_addr.s_addr) >> 24 == 127
        case .v6(let a):
            let b = withUnsafeBytes(of: a.address.sin6_addr) { Array($0) }
            let zeros = b[0..<10].allSatisfy { $0 == 0 }
            return (zeros && b[10..<15].allSatisfy { $0 == 0 } && b[15] == 1)
                || (zeros && b[10] == 0xff && b[11] == 0xff && b[12] == 127)
        default:
            return false
        }
    }

    /// On the channel's event loop, so the option is set before its first read.
    static func apply(to channel: any Channel) {
        guard isLoopback(channel.remoteAddress), let provider = channel as? SocketOptionProvider else { return }
        let level = NIOBSDSocket.OptionLevel(rawValue: Int32(IPPROTO_TCP))
        let name = NIOBSDSocket.Option(rawValue: TCP_CONGESTION)
        let cubic = (UInt8(ascii: "c"), UInt8(ascii: "u"), UInt8(ascii: "b"), UInt8(ascii: "i"), UInt8(ascii: "c"))
        let reno = (UInt8(ascii: "r"), UInt8(ascii: "e"), UInt8(ascii: "n"), UInt8(ascii: "o"))
        provider.unsafeSetSocketOption(level: level, name: name, value: cubic).whenFailure { _ in
            _ = provider.unsafeSetSocketOption(level: level, name: name, value: reno)
        }
    }
}
