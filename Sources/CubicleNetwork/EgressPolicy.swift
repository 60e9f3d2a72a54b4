#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 or IPv6 address, as a value: v4 in the low 32 bits of a v4 case, v6 as 128 bits.
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt128)

    /// Dotted quad or RFC 4291 text (with `::` and an embedded dotted quad), as libc's inet_pton reads it:
    /// the parser every other tool on the host uses, which refuses leading zeros ("010" is octal to some
    /// resolvers) and anything around the address.
    public init?(_ text: some StringProtocol) {
        let string = String(text)
        var v4 = in_addr()
        if inet_pton(AF_INET, string, &v4) == 1 {
            self = .v4(UInt32(bigEndian: v4.s_addr))
            return
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, string, &v6) == 1 else { return nil }
        self = .v6(withUnsafeBytes(of: &v6) { $0.reduce(UInt128(0)) { $0 << 8 | UInt128($1) } })
    }

    public var description: String {
        switch self {
        case .v4(let v): return "\(v >> 24).\(v >> 16 & 255).\(v >> 8 & 255).\(v & 255)"
        case .v6(let v): return (0..<8).map { String(UInt16(truncatingIfNeeded: v >> (112 - 16 * $0)), radix: 16) }.joined(separator: ":")
        }
    }
}

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one address).
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public let base: IPAddress
    public let prefix: Int

    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(parts[0]) else { return nil }
        let bits: Int
        switch address { case .v4: bits = 32; case .v6: bits = 128 }
        var prefix = bits
        if parts.count == 2 {
            guard (1...3).contains(parts[1].count), parts[1].allSatisfy { $0.isASCII && $0.isNumber }, let p = Int(parts[1]), p <= bits else { return nil }
            prefix = p
        }
        // The base with its host bits set is refused rather than silently widened: 10.1.2.3/8 is a typo.
        guard Self.masked(address, prefix) == address else { return nil }
        (self.base, self.prefix) = (address, prefix)
    }

    static func masked(_ a: IPAddress, _ prefix: Int) -> IPAddress {
        switch a {
        case .v4(let v): return .v4(prefix == 0 ? 0 : v & ~UInt32(0) << (32 - prefix))
        case .v6(let v): return .v6(prefix == 0 ? 0 : v & ~UInt128(0) << (128 - prefix))
        }
    }

    public func contains(_ a: IPAddress) -> Bool {
        switch (base, a) {
        case (.v4, .v4), (.v6, .v6): return Self.masked(a, prefix) == base
        default: return false
        }
    }

    /// Whether every address of `other` is in this range.
    public func covers(_ other: CIDR) -> Bool { other.prefix >= prefix && contains(other.base) }

    public var description: String { "\(base)/\(prefix)" }
}

/// A DNS name in a policy: exact (`api.example.com`), or `*.example.com` for every name below it (not the
/// name itself, as Cilium's `matchPattern` and E2B's domain filters read it).
public struct NamePattern: Hashable, Sendable, CustomStringConvertible {
    public let suffix: String
    public let wildcard: Bool

    public init?(_ text: String) {
        var name = text.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        let wildcard = name.hasPrefix("*.")
        if wildcard { name.removeFirst(2) }
        guard Self.isValidName(name), name.contains(".") || !wildcard else { return nil }
        (self.suffix, self.wildcard) = (name, wildcard)
    }

    /// RFC 1035 with underscores allowed (service names): labels of 1–63 letters, digits, `-`, `_`, not
    /// starting or ending with `-`; 253 bytes at most.
    static func isValidName(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 253 else { return false }
        return name.split(separator: ".", omittingEmptySubsequences: false).allSatisfy { label in
            (1...63).contains(label.utf8.count) && label.first != "-" && label.last != "-"
                && label.unicodeScalars.allSatisfy { $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || $0 == "-" || $0 == "_") }
        }
    }

    /// `name` as the session asked for it (any case, with or without the trailing dot).
    public func matches(_ name: String) -> Bool {
        var n = name.lowercased()
        if n.hasSuffix(".") { n.removeLast() }
        return wildcard ? n.hasSuffix("." + suffix) : n == suffix
    }

    public var description: String { wildcard ? "*." + suffix : suffix }
}

/// Where a PUBLIC session may connect: what it always may not, then the runtime's deny and allow lists.
/// A pure value; the network room compiles it into nftables rules and asks it for each DNS answer.
public struct EgressPolicy: Hashable, Sendable {
    public enum Entry: Hashable, Sendable {
        case range(CIDR)
        case name(NamePattern)

        /// A CIDR or a DNS name, as the runtime's YAML gives it.
        public init?(_ text: String) {
            if let r = CIDR(text) { self = .range(r) } else if let n = NamePattern(text) { self = .name(n) } else { return nil }
        }
    }

    public var allow: [Entry]
    public var deny: [Entry]

    public init(allow: [Entry] = [], deny: [Entry] = []) {
        self.allow = allow
        self.deny = deny
    }

    /// Where the metadata endpoint answers: the one link-local address a session may reach.
    public static let metadataEndpoint = IPAddress("169.254.169.254")!

    /// Never reachable, whatever the lists say.
    static let alwaysRefused: [(CIDR, String)] = [
        ("0.0.0.0/8", "unspecified"), ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"), ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"), ("::1/128", "loopback"), ("fe80::/10", "link-local"), ("ff00::/8", "multicast"),
    ].map { (CIDR($0.0)!, $0.1) }

    /// Reachable only through an allow entry inside them.
    static let privateRanges: [CIDR] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"].map { CIDR($0)! }

    public enum Decision: Hashable, Sendable {
        case allowed
        case refused(String)
    }

    /// Whether a session may connect to `address`.
    /// - Parameters:
    ///   - names: the names the session's DNS answered with this address (their TTL still running).
    ///   - host: every address of the host itself, and other sessions' ranges: always refused.
    public func decide(_ address: IPAddress, names: Set<String> = [], host: [CIDR] = []) -> Decision {
        if address == Self.metadataEndpoint { return .allowed }
        // An IPv4-mapped IPv6 address is judged as the IPv4 address it is.
        if case .v6(let v) = address, v >> 32 == 0xFFFF { return decide(.v4(UInt32(truncatingIfNeeded: v)), names: names, host: host) }
        if let (_, why) = Self.alwaysRefused.first(where: { $0.0.contains(address) }) { return .refused(why) }
        if host.contains(where: { $0.contains(address) }) { return .refused("the host or another session") }
        for entry in deny {
            switch entry {
            case .range(let r) where r.contains(address): return .refused("denied by \(r)")
            case .name(let n) where names.contains(where: n.matches): return .refused("denied by \(n)")
            default: continue
            }
        }
        let ranges = allow.compactMap { if case .range(let r) = $0 { r } else { nil } }
        if let privateRange = Self.privateRanges.first(where: { $0.contains(address) }) {
            // Named explicitly: an allow entry inside the private range, not one that merely spans it.
            return ranges.contains { privateRange.covers($0) && $0.contains(address) } ? .allowed : .refused("private range \(privateRange)")
        }
        if allow.isEmpty { return .allowed }
        if ranges.contains(where: { $0.contains(address) }) { return .allowed }
        let patterns = allow.compactMap { if case .name(let n) = $0 { n } else { nil } }
        if names.contains(where: { name in patterns.contains { $0.matches(name) } }) { return .allowed }
        return .refused("not in the allow list")
    }

    /// Whether the session's DNS answers `name` (others get NXDOMAIN): not when a deny entry names it, nor
    /// when the allow list names names and none of them is this one. An allow list of ranges only leaves
    /// names alone: the ranges police the connections.
    public func answers(_ name: String) -> Bool {
        if deny.contains(where: { if case .name(let n) = $0 { n.matches(name) } else { false } }) { return false }
        let patterns = allow.compactMap { if case .name(let n) = $0 { n } else { nil } }
        return patterns.isEmpty || patterns.contains { $0.matches(name) }
    }
}
