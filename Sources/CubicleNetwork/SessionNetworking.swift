#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleDNSWire
import CubicleJSON
import CubicleLinux
import Dispatch
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// How PUBLIC sessions reach the world: the daemon's side of it.
public struct NetworkSettings: Sendable {
    /// The table's and links' names come from the session network, which is unique per daemon on a host:
    /// five base-36 characters, always five, since links are named `c<tag><index>` and a shorter tag would
    /// run into the index (one network in 36 gave four, and tests looking for the tag in a link name failed).
    public static func tag(forSessionNetwork text: String) -> String {
        let hash = text.utf8.reduce(UInt64(14_695_981_039_346_656_037)) { ($0 ^ UInt64($1)) &* 1_099_511_628_211 }
        let digits = String(hash % 60_466_176, radix: 36)
        return String(repeating: "0", count: 5 - digits.count) + digits
    }

    /// The sessions' IPv4 range. Its first address is the gateway every session routes through, where the
    /// session DNS and the metadata endpoint answer; sessions get the addresses after it.
    public var sessionNetwork: CIDR
    /// The only interface forwarded traffic may leave through.
    public var egressInterface: String
    /// Where the session DNS asks, as IPv4 address and port.
    public var dnsUpstreams: [(IPAddress, Int)]
    /// Names this daemon's table (`cubicle_<tag>`) and links (`c<tag>…`); unique per daemon on a host.
    public var tag: String
    /// Links kept made ahead of time.
    public var linkPool = 2
    /// The region the metadata endpoint reports.
    public var region: String

    public init(sessionNetwork: CIDR, egressInterface: String, dnsUpstreams: [(IPAddress, Int)], tag: String, region: String) {
        self.sessionNetwork = sessionNetwork
        self.egressInterface = egressInterface
        self.dnsUpstreams = dnsUpstreams
        self.tag = tag
        self.region = region
    }

    /// The interface of the host's IPv4 default route (/proc/net/route), as `--egress-interface` defaults.
    public static func defaultRouteInterface() -> String? {
        guard let text = try? Files.read("/proc/net/route") else { return nil }
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if f.count > 2, f[1] == "00000000" { return String(f[0]) }
        }
        return nil
    }

    /// The host's resolvers (/etc/resolv.conf's IPv4 nameservers), as `--dns-upstream` defaults.
    public static func hostResolvers() -> [(IPAddress, Int)] {
        guard let text = try? Files.read("/etc/resolv.conf") else { return [] }
        return text.split(separator: "\n").compactMap { line -> (IPAddress, Int)? in
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 2, f[0] == "nameserver", let a = IPAddress(f[1]), case .v4 = a else { return nil }
            return (a, 53)
        }
    }
}

/// A refused connection, as the kernel reported it.
public struct EgressDenial: Sendable {
    public var sessionID: String?
    public var runtime: String
    public var destination: IPAddress
    public var port: Int
    public var transport: String
}

/// The network room's one entry point: links for PUBLIC sessions, the nftables table that polices them,
/// the session DNS, the metadata endpoint and the NFLOG reader that turns refused packets into events.
public final class SessionNetworking: Sendable {
    struct Entry {
        var sessionID: String?
        var runtime: String
        var policy: EgressPolicy
        var role: RoleCredentialSource?
        var link: SessionLink
        /// Destinations its DNS answered, until when (uptime ns), so they can be taken back at its end.
        var resolved: [IPAddress: UInt64] = [:]
        var tokens: [String: UInt64] = [:]
        var dnsInFlight = 0
    }

    public let settings: NetworkSettings
    public let firewall: EgressFirewall
    let links: SessionLinks
    let nft: Nftables
    let logger: Logger
    private let entries = Mutex<[IPAddress: Entry]>([:])
    private let denialHandler = Mutex<(@Sendable (EgressDenial) -> Void)?>(nil)
    private let channels = Mutex<[Channel]>([])
    private let nflogFD: Int32
    private let resolvers = NIOThreadPool(numberOfThreads: 8)
    /// Where a session's elements are added beside its launch (libnftables blocks for a netlink round trip).
    private let rules = NIOThreadPool(numberOfThreads: 1)
    private let closed = Atomic<Bool>(false)
    /// DNS grants a killed predecessor's table held, by session address, for the sessions adopted again.
    private let inherited = Mutex<[IPAddress: [(IPAddress, UInt32)]]>([:])

    public var gateway: IPAddress { links.gateway }
    public static let dnsPort = 53
    public static let metadataPort = 80

    /// Installs the table, makes the first links, and starts the DNS, the metadata endpoint and the NFLOG reader.
    public init(settings: NetworkSettings, group: EventLoopGroup, logger: Logger) async throws {
        self.settings = settings
        self.logger = logger
        guard settings.tag.utf8.count <= 6, settings.tag.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) }) else {
            throw SystemError("network tag must be 1-6 lowercase letters or digits", errno: EINVAL)
        }
        guard !settings.egressInterface.isEmpty, settings.egressInterface.utf8.count < 16,
              !settings.egressInterface.contains("\""), if_nametoindex(settings.egressInterface) != 0 else {
            throw SystemError("egress interface \(settings.egressInterface) does not exist", errno: ENODEV)
        }
        nft = try Nftables()
        resolvers.start()
        rules.start()
        // An NFLOG group of our own: taken by the first daemon to bind it, so each tries from its tag's.
        var group16 = UInt16(0x4000 + Int(settings.tag.utf8.reduce(UInt32(5381)) { $0 &* 33 &+ UInt32($1) } % 0x3000))
        var fd: Int32 = -1
        for _ in 0..<64 {
            fd = cubicle_nflog_open(group16)
            if fd >= 0 || errno != EBUSY { break }
            group16 &+= 1
        }
        guard fd >= 0 else { throw SystemError.lastError("bind NFLOG group \(group16)") }
        nflogFD = fd
        links = try SessionLinks(network: settings.sessionNetwork, prefix: "c" + settings.tag, poolSize: settings.linkPool)
        firewall = EgressFirewall(table: "cubicle_" + settings.tag, linkPattern: "c\(settings.tag)*", egressInterface: settings.egressInterface,
                                  sessionNetwork: settings.sessionNetwork, gateway: links.gateway,
                                  dnsPort: Self.dnsPort, metadataPort: Self.metadataPort, logGroup: group16)
        // A predecessor's grants, read before its table is replaced, go back to the sessions adopted again.
        inherited.withLock { $0 = Self.grants(in: (try? nft.run("list set inet \(firewall.table) resolved", step: "read grants", json: true)) ?? "") }
        try nft.run(firewall.install(sessions: []), step: "install table \(firewall.table)")
        // Replies to sessions come back through the egress interface and are forwarded to their links.
        _ = try? Files.write("/proc/sys/net/ipv4/conf/\(settings.egressInterface)/forwarding", "1")
        try startThread("egress denials") { [self] in readDenials() }
        do {
            let dns = try await DatagramBootstrap(group: group)
                .channelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .channelOption(ChannelOptions.socket(SocketOptionLevel(IPPROTO_IP), SocketOptionName(IP_FREEBIND)), value: 1)
                .channelInitializer { [self] channel in channel.pipeline.addHandler(SessionDNSHandler(network: self)) }
                .bind(host: links.gateway.description, port: Self.dnsPort).get()
            let imds = try await ServerBootstrap(group: group)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .serverChannelOption(ChannelOptions.socket(SocketOptionLevel(IPPROTO_IP), SocketOptionName(IP_FREEBIND)), value: 1)
                .childChannelInitializer { [self] channel in
                    // A session holds at most 16 connections here (the table's `ct count`), each closed after
                    // 10 s without a request, so it cannot fill cubicled's descriptor table through them.
                    channel.pipeline.addHandler(IdleStateHandler(readTimeout: .seconds(10))).flatMap {
                        channel.pipeline.configureHTTPServerPipeline()
                    }.flatMap { channel.pipeline.addHandler(MetadataHandler(network: self)) }
                }
                .bind(host: links.gateway.description, port: Self.metadataPort).get()
            channels.withLock { $0 = [dns, imds] }
        } catch {
            shutdown()
            throw error
        }
    }

    /// After adoption: the predecessor's links no session was adopted with are deleted, and new ones made.
    public func adoptionDone() { links.begin() }

    public func onDenied(_ handler: @escaping @Sendable (EgressDenial) -> Void) { denialHandler.withLock { $0 = handler } }

    /// A link for a new sandbox of `runtime`. Until `police` has put its policy into the kernel, the link's
    /// address is in none of the table's sets, so everything it sends is refused: the sandbox may be
    /// launched meanwhile, and its agent started once `police` returns.
    public func take(runtime: String, policy: EgressPolicy, role: RoleCredentialSource?) async throws -> SessionLink {
        let link = try await links.take()
        entries.withLock { $0[link.address] = Entry(runtime: runtime, policy: policy, role: role, link: link) }
        return link
    }

    /// Puts the policy of a link's session into the kernel (on the nftables thread, beside the launch).
    public func police(_ link: SessionLink) async throws {
        guard let entry = entry(link.address) else { throw SystemError("link \(link.name) is not attached", errno: ENOENT) }
        let text = EgressFirewall.SessionRules(link: link.name, address: link.address, policy: entry.policy).elements(table: firewall.table, adding: true)
        let nft = self.nft
        try await rules.runIfActive { try nft.run(text, step: "add session \(link.address)") }
    }

    /// Makes up the links taken, once a launch is over: making one beside a spawn would compete with it
    /// for the CPU and the rtnl lock.
    public func refill() { links.refill() }

    /// Names the session a link serves (a warm sandbox's is named when a session claims it).
    public func name(_ address: IPAddress, sessionID: String) {
        entries.withLock { $0[address]?.sessionID = sessionID }
    }

    /// A link a restarted daemon found in a session's state: its policy goes back into the new table.
    public func adopt(index: Int, runtime: String, sessionID: String?, policy: EgressPolicy, role: RoleCredentialSource?) throws {
        guard links.claim(index: index) else { throw SystemError("link \(index) is already in use", errno: EEXIST) }
        let link = SessionLink(index: index, name: links.name(of: index), address: links.address(of: index), namespaceFD: -1)
        let grants = inherited.withLock { $0.removeValue(forKey: link.address) } ?? []
        var text = EgressFirewall.SessionRules(link: link.name, address: link.address, policy: policy).elements(table: firewall.table, adding: true)
        for (destination, seconds) in grants { text += firewall.resolved(session: link.address, destination: destination, seconds: seconds) }
        try nft.run(text, step: "add session \(link.address)")
        let now = DispatchTime.now().uptimeNanoseconds
        var entry = Entry(sessionID: sessionID, runtime: runtime, policy: policy, role: role, link: link)
        for (destination, seconds) in grants { entry.resolved[destination] = now + UInt64(seconds) * 1_000_000_000 }
        entries.withLock { $0[link.address] = entry }
    }

    /// The elements of a `resolved` set as nft lists them in JSON: (session, destination, seconds left).
    static func grants(in json: String) -> [IPAddress: [(IPAddress, UInt32)]] {
        guard let root = try? JSON.parse(json), let items = root["nftables"]?.arrayValue else { return [:] }
        var out: [IPAddress: [(IPAddress, UInt32)]] = [:]
        for item in items {
            for e in item["set"]?["elem"]?.arrayValue ?? [] {
                guard let pair = e["elem"]?["val"]?["concat"]?.arrayValue, pair.count == 2,
                      let session = pair[0].stringValue.flatMap({ IPAddress($0) }), let destination = pair[1].stringValue.flatMap({ IPAddress($0) }),
                      let left = e["elem"]?["expires"]?.intValue, left > 0 else { continue }
                out[session, default: []].append((destination, UInt32(clamping: left)))
            }
        }
        return out
    }

    /// The link once the sandbox's processes hold its namespace: ours is closed, so the namespace (and
    /// with it the veth pair) goes when the sandbox does.
    public func handedOver(_ link: SessionLink) -> SessionLink {
        if link.namespaceFD >= 0 { close(link.namespaceFD) }
        let given = SessionLink(index: link.index, name: link.name, address: link.address, namespaceFD: -1)
        entries.withLock { $0[link.address]?.link = given }
        return given
    }

    public func link(index: Int) -> SessionLink {
        SessionLink(index: index, name: links.name(of: index), address: links.address(of: index), namespaceFD: -1)
    }

    /// Takes a session's elements out of the kernel and deletes its link: nothing of it stays.
    public func detach(_ address: IPAddress) {
        guard let entry = entries.withLock({ $0.removeValue(forKey: address) }) else { return }
        var text = EgressFirewall.SessionRules(link: entry.link.name, address: address, policy: entry.policy).elements(table: firewall.table, adding: false)
        let now = DispatchTime.now().uptimeNanoseconds
        let live = entry.resolved.filter { $0.value > now + 500_000_000 }.keys
        for d in live { text += firewall.unresolve(session: address, destination: d) }
        do { try nft.run(text, step: "remove session \(address)") } catch {
            // An answer's element may have timed out just now: take the rest one by one.
            for d in live { _ = try? nft.run(firewall.unresolve(session: address, destination: d), step: "unresolve") }
            _ = try? nft.run(EgressFirewall.SessionRules(link: entry.link.name, address: address, policy: entry.policy).elements(table: firewall.table, adding: false), step: "remove session \(address)")
        }
        links.release(entry.link)
    }

    /// Closes the listeners and the NFLOG reader, deletes the links not in use and, unless sessions are
    /// left to a successor (`keepTable`), the table.
    public func shutdown(keepTable: Bool = false) {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        channels.withLock { $0.forEach { $0.close(promise: nil) }; $0 = [] }
        links.close()
        resolvers.shutdownGracefully { _ in }
        rules.shutdownGracefully { _ in }
        if !keepTable { _ = try? nft.run(firewall.remove(), step: "remove table") }
    }

    // MARK: - Used by the DNS and metadata handlers

    func entry(_ address: IPAddress) -> Entry? { entries.withLock { $0[address] } }

    /// Resolves `question` for the session at `address` under its policy: NXDOMAIN for a name it may not
    /// resolve; otherwise the upstream's A records that the policy lets it reach, each put into the kernel
    /// for its TTL (60 s at least, so a TTL of 0 does not race the connect) before the answer is sent.
    func resolve(_ question: DNSMessage.Question, from address: IPAddress) async -> [UInt8]? {
        guard let entry = entry(address) else { return nil }
        guard entry.policy.answers(question.name) else { return DNSMessage.response(to: question, rcode: .nameError) }
        // Sessions have IPv4 only: other types get an empty answer, so resolvers fall back at once.
        guard question.type == DNSMessage.typeA else { return DNSMessage.response(to: question, rcode: .noError) }
        let admitted = entries.withLock { e -> Bool in
            guard e[address] != nil, e[address]!.dnsInFlight < 32 else { return false }
            e[address]!.dnsInFlight += 1
            return true
        }
        guard admitted else { return DNSMessage.response(to: question, rcode: .refused) }
        defer { entries.withLock { if $0[address] != nil { $0[address]!.dnsInFlight -= 1 } } }
        let upstreams = settings.dnsUpstreams
        // Upstream questions block a thread for up to two seconds each: on a small pool of their own, so many
        // sessions' lookups queue there instead of starving the host's shared threads.
        let result = (try? await resolvers.runIfActive { Self.ask(upstreams, name: question.name) }) ?? nil
        guard let (rcode, answers) = result else { return DNSMessage.response(to: question, rcode: .serverFailure) }
        guard rcode == 0 else { return DNSMessage.response(to: question, rcode: rcode == 3 ? .nameError : .serverFailure) }
        let reachable = answers.filter { entry.policy.decide(.v4($0.address), names: [question.name], host: [settings.sessionNetwork]) == .allowed }
        let now = DispatchTime.now().uptimeNanoseconds
        var text = ""
        var grants: [(IPAddress, UInt64)] = []
        for a in reachable {
            let seconds = min(max(a.ttl, 60), 86_400)
            text += firewall.resolved(session: address, destination: .v4(a.address), seconds: seconds)
            grants.append((.v4(a.address), now + UInt64(seconds) * 1_000_000_000))
        }
        if !text.isEmpty {
            // An element already there keeps its old timeout with `add`; take it out first so the new TTL holds.
            let refresh = grants.map { firewall.unresolve(session: address, destination: $0.0) }
            let known = entries.withLock { $0[address]?.resolved ?? [:] }
            let again = zip(refresh, grants).filter { (known[$0.1.0] ?? 0) > now + 500_000_000 }.map(\.0).joined()
            do { try nft.run(again + text, step: "resolved \(question.name)") } catch {
                logger.warning("could not admit a DNS answer", metadata: ["name": "\(question.name)", "error": "\(error)"])
                return DNSMessage.response(to: question, rcode: .serverFailure)
            }
            entries.withLock { e in for (d, until) in grants { e[address]?.resolved[d] = until } }
        }
        return DNSMessage.response(to: question, rcode: .noError, answers: reachable.map { DNSMessage.Answer(address: $0.address, ttl: $0.ttl) })
    }

    /// One A query to the upstreams in turn, from a fresh socket with a random id: (rcode, answers), or nil.
    static func ask(_ upstreams: [(IPAddress, Int)], name: String) -> (UInt8, [DNSMessage.Answer])? {
        for (server, port) in upstreams {
            guard case .v4(let a) = server else { continue }
            let id = UInt16.random(in: 0...UInt16.max)
            guard let query = DNSMessage.query(id: id, name: name, type: DNSMessage.typeA) else { return nil }
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { continue }
            defer { Glibc.close(fd) }
            var tv = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = in_port_t(UInt16(port).bigEndian)
            sin.sin_addr.s_addr = a.bigEndian
            let connected = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard connected == 0, send(fd, query, query.count, 0) == query.count else { continue }
            var buf = [UInt8](repeating: 0, count: 4096)
            let deadline = DispatchTime.now().uptimeNanoseconds + 2_000_000_000
            while DispatchTime.now().uptimeNanoseconds < deadline {
                let n = recv(fd, &buf, buf.count, 0)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { break }
                // A connected socket hears only the upstream; a reply with another id or question is skipped.
                if let parsed = DNSMessage.parseResponse(Array(buf[0..<n]), id: id, name: name) { return parsed }
            }
        }
        return nil
    }

    /// A metadata token for the session at `address`, valid for `seconds`.
    func issueToken(for address: IPAddress, seconds: Int) -> String? {
        var bytes = [UInt8](repeating: 0, count: 32)
        var rng = SystemRandomNumberGenerator()
        for i in bytes.indices { bytes[i] = rng.next() }
        let token = Hex.encode(bytes)
        let until = DispatchTime.now().uptimeNanoseconds + UInt64(seconds) * 1_000_000_000
        return entries.withLock { e -> String? in
            guard e[address] != nil else { return nil }
            let now = DispatchTime.now().uptimeNanoseconds
            e[address]!.tokens = e[address]!.tokens.filter { $0.value > now }
            guard e[address]!.tokens.count < 64 else { return nil }
            e[address]!.tokens[token] = until
            return token
        }
    }

    func tokenValid(_ token: String, for address: IPAddress) -> Bool {
        let now = DispatchTime.now().uptimeNanoseconds
        return entries.withLock { ($0[address]?.tokens[token] ?? 0) > now }
    }

    private func readDenials() {
        var batch = [cubicle_denial](repeating: cubicle_denial(), count: 64)
        while !closed.load(ordering: .acquiring) {
            var p = pollfd(fd: nflogFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, 250)
            if ready <= 0 { continue }
            let n = cubicle_nflog_read(nflogFD, &batch, Int32(batch.count))
            guard n > 0 else { continue }
            let handler = denialHandler.withLock { $0 }
            for d in batch[0..<Int(n)] {
                let source = IPAddress.v4(UInt32(bigEndian: d.source_be))
                guard let entry = entry(source) else { continue }
                let denial = EgressDenial(sessionID: entry.sessionID, runtime: entry.runtime, destination: .v4(UInt32(bigEndian: d.destination_be)),
                                          port: Int(d.port), transport: d.protocol == 6 ? "tcp" : d.protocol == 17 ? "udp" : d.protocol == 1 ? "icmp" : "ip\(d.protocol)")
                handler?(denial)
            }
        }
        Glibc.close(nflogFD)
    }
}
