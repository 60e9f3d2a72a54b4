/// The egress policy in the kernel: one nftables table per daemon, whose chains are fixed and whose sets
/// hold each session's part of the policy, keyed by the session's address. Adding a session is adding set
/// elements; ending one is removing them. Nothing per packet runs in cubicled.
///
/// A packet from a session's link is judged in this order (the order of `EgressPolicy.decide`):
/// its source must be the link's own address; the host itself answers only DNS and the metadata endpoint
/// on the gateway; forwarded traffic must leave through the egress interface; then the always-refused
/// ranges (with every session's), the session's deny ranges, private ranges only through its allow
/// entries inside them, and last its allow ranges, or any address when it allows all, or what its DNS
/// answered (for the answer's TTL). What is refused is reset (TCP) or answered with an ICMP
/// administratively-prohibited (the rest), so it fails at once, and logged to NFLOG for `egress_denied`.
public struct EgressFirewall: Sendable {
    public let table: String
    public let linkPattern: String
    public let egressInterface: String
    public let sessionNetwork: CIDR
    public let gateway: IPAddress
    public let dnsPort: Int
    public let metadataPort: Int
    public let logGroup: UInt16

    public init(table: String, linkPattern: String, egressInterface: String, sessionNetwork: CIDR, gateway: IPAddress,
                dnsPort: Int, metadataPort: Int, logGroup: UInt16) {
        self.table = table
        self.linkPattern = linkPattern
        self.egressInterface = egressInterface
        self.sessionNetwork = sessionNetwork
        self.gateway = gateway
        self.dnsPort = dnsPort
        self.metadataPort = metadataPort
        self.logGroup = logGroup
    }

    /// Replaces the table whole, in one transaction: no moment without rules, and nothing of an earlier
    /// daemon's elements left to a new session that gets an old address. `sessions` are re-added with it.
    public func install(sessions: [SessionRules]) -> String {
        let refused = EgressPolicy.alwaysRefused.compactMap { $0.0.v4 } + [sessionNetwork]
        let privates = EgressPolicy.privateRanges.compactMap { $0.v4 }
        let quotedEgress = Self.quote(egressInterface), links = Self.quote(linkPattern)
        var text = """
        table inet \(table) {}
        delete table inet \(table)
        table inet \(table) {
          set links { type ifname . ipv4_addr; }
          set refused { type ipv4_addr; flags interval; auto-merge; elements = { \(refused.map(\.description).joined(separator: ", ")) } }
          set private { type ipv4_addr; flags interval; auto-merge; elements = { \(privates.map(\.description).joined(separator: ", ")) } }
          set open { type ipv4_addr; }
          set allow { type ipv4_addr . ipv4_addr; flags interval; }
          set allow_private { type ipv4_addr . ipv4_addr; flags interval; }
          set deny { type ipv4_addr . ipv4_addr; flags interval; }
          set resolved { type ipv4_addr . ipv4_addr; flags timeout; }
          set host_connections { type ipv4_addr; size 65535; flags dynamic; }
          chain prerouting {
            type nat hook prerouting priority dstnat; policy accept;
            iifname \(links) ip daddr \(EgressPolicy.metadataEndpoint) tcp dport 80 dnat ip to \(gateway):\(metadataPort)
          }
          chain postrouting {
            type nat hook postrouting priority srcnat; policy accept;
            iifname \(links) oifname \(quotedEgress) masquerade
          }
          chain input {
            type filter hook input priority filter; policy accept;
            iifname \(links) jump from_session_to_host
          }
          chain forward {
            type filter hook forward priority filter; policy accept;
            iifname \(links) jump from_session
            oifname \(links) ct state established,related accept
            oifname \(links) drop
          }
          chain from_session_to_host {
            meta nfproto ipv6 goto refuse
            iifname . ip saddr != @links drop
            ip daddr \(gateway) udp dport \(dnsPort) accept
            ip daddr \(gateway) tcp dport \(metadataPort) ct state new add @host_connections { ip saddr ct count over 16 } goto refuse
            ip daddr \(gateway) tcp dport \(metadataPort) accept
            goto refuse
          }
          chain from_session {
            meta nfproto ipv6 goto refuse
            iifname . ip saddr != @links drop
            ct state established,related accept
            oifname != \(quotedEgress) goto refuse
            ip daddr @refused goto refuse
            ip saddr . ip daddr @deny goto refuse
            ip daddr @private ip saddr . ip daddr @allow_private accept
            ip daddr @private goto refuse
            ip saddr @open accept
            ip saddr . ip daddr @allow accept
            ip saddr . ip daddr @resolved accept
            goto refuse
          }
          chain refuse {
            limit rate 100/second burst 200 packets log group \(logGroup)
            meta l4proto tcp reject with tcp reset
            reject with icmpx type admin-prohibited
          }
        }

        """
        for s in sessions { text += s.elements(table: table, adding: true) }
        return text
    }

    public func remove() -> String { "table inet \(table) {}\ndelete table inet \(table)\n" }

    /// One session's elements: its link and address, and its policy's CIDRs (IPv4; sessions have no IPv6).
    public struct SessionRules: Sendable, Equatable {
        public var link: String
        public var address: IPAddress
        public var policy: EgressPolicy

        public init(link: String, address: IPAddress, policy: EgressPolicy) {
            self.link = link
            self.address = address
            self.policy = policy
        }

        public func elements(table: String, adding: Bool) -> String {
            let verb = adding ? "add" : "delete"
            var lines = ["\(verb) element inet \(table) links { \(EgressFirewall.quote(link)) . \(address) }"]
            // Without the ranges another one covers: an interval set refuses overlapping elements.
            func ranges(_ entries: [EgressPolicy.Entry]) -> [CIDR] { entries.compactMap { if case .range(let r) = $0 { r.v4 } else { nil } } }
            func outermost(_ all: [CIDR]) -> [CIDR] {
                all.enumerated().filter { i, r in
                    !all.enumerated().contains { j, other in j != i && other.covers(r) && (other != r || j < i) }
                }.map(\.1)
            }
            if policy.allow.isEmpty { lines.append("\(verb) element inet \(table) open { \(address) }") }
            let allow = ranges(policy.allow)
            let privateAllow = outermost(allow.filter { r in EgressPolicy.privateRanges.contains { $0.covers(r) } })
            let publicAllow = outermost(allow.filter { r in !EgressPolicy.privateRanges.contains { $0.covers(r) } })
            for (set, list) in [("allow", publicAllow), ("allow_private", privateAllow), ("deny", outermost(ranges(policy.deny)))] where !list.isEmpty {
                lines.append("\(verb) element inet \(table) \(set) { \(list.map { "\(address) . \($0)" }.joined(separator: ", ")) }")
            }
            return lines.joined(separator: "\n") + "\n"
        }
    }

    /// Lets `session` reach `destination` for `seconds` (what its DNS answered).
    public func resolved(session: IPAddress, destination: IPAddress, seconds: UInt32) -> String {
        "add element inet \(table) resolved { \(session) . \(destination) timeout \(max(seconds, 1))s }\n"
    }

    public func unresolve(session: IPAddress, destination: IPAddress) -> String {
        "delete element inet \(table) resolved { \(session) . \(destination) }\n"
    }

    /// An interface name as nft reads it; names are made by cubicled or checked at start (IFNAMSIZ, no quotes).
    static func quote(_ name: String) -> String { "\"\(name)\"" }
}

extension CIDR {
    /// The same range if it is IPv4 (or IPv4-mapped), else nil.
    public var v4: CIDR? {
        switch base {
        case .v4: return self
        case .v6: return nil
        }
    }
}

extension EgressPolicy.Entry {
    public var description: String {
        switch self {
        case .range(let r): return r.description
        case .name(let n): return n.description
        }
    }
}
