#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import Dispatch
import Synchronization

/// One session's link: a network namespace with `eth0` holding `address`, paired with `name` on the host,
/// which holds the gateway. Routed, point to point: there is no bridge, so no layer-2 path between sessions.
public struct SessionLink: Sendable, Equatable {
    public let index: Int
    public let name: String
    public let address: IPAddress
    /// The namespace, for the launch to join; -1 once handed over or for a link found again after a restart.
    public let namespaceFD: Int32
}

/// Links made ahead of time on a thread of their own, as network namespaces are (`NetworkNamespacePool`),
/// so a PUBLIC session's spawn does not wait for a namespace, a veth pair and five netlink requests; and
/// deleted on that thread too, since a veth's deletion waits for the kernel's RCU grace periods.
public final class SessionLinks: Sendable {
    private struct State {
        var ready: [SessionLink] = []
        var free: [Int]
        var inUse: Set<Int> = []
        var doomed: [String] = []
        var closed = false
        /// Links of this prefix found on the host at start: a killed predecessor's, until adoption claims
        /// them or `begin` deletes them.
        var found: Set<Int> = []
    }

    public let network: CIDR
    public let gateway: IPAddress
    public let prefix: String
    public let poolSize: Int
    private let state: Mutex<State>
    private let wake = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private let hostNetworkFD: Int32

    /// - Parameters:
    ///   - network: the sessions' IPv4 range; its first address after the base is the gateway.
    ///   - prefix: link names are `prefix` and the index in base 36 (at most 15 bytes in all).
    public init(network: CIDR, prefix: String, poolSize: Int) throws(SystemError) {
        guard case .v4(let base) = network.base, network.prefix <= 29 else {
            throw SystemError("session network must be IPv4, /29 or larger", errno: EINVAL)
        }
        self.network = network
        gateway = .v4(base + 1)
        self.prefix = prefix
        self.poolSize = poolSize
        let count = min((1 << (32 - network.prefix)) - 3, 1 << 20)
        var initial = State(free: Array((0..<count).reversed()))
        // A predecessor's links stay untouched (their sessions may be adopted) and their indices unused.
        for name in (try? Files.listDirectory("/sys/class/net")) ?? [] where name.hasPrefix(prefix) {
            if let i = Int(name.dropFirst(prefix.count), radix: 36), i < count { initial.found.insert(i) }
        }
        initial.free.removeAll { initial.found.contains($0) }
        state = Mutex(initial)
        hostNetworkFD = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC)
        guard hostNetworkFD >= 0 else { throw SystemError.lastError("open /proc/self/ns/net") }
        do { try startThread("session links'") { [self] in work() } } catch {
            Glibc.close(hostNetworkFD)
            throw error
        }
    }

    /// Once adoption is over: deletes the predecessor's links no session claimed, and starts making links.
    public func begin() {
        let unclaimed = state.withLock { s in defer { s.found = [] }; return s.found }
        state.withLock { s in s.doomed += unclaimed.map { name(of: $0) }; s.inUse.formUnion(unclaimed) }
        wake.signal()
    }

    public func address(of index: Int) -> IPAddress {
        guard case .v4(let base) = network.base else { preconditionFailure() }
        return .v4(base + 2 + UInt32(index))
    }

    public func name(of index: Int) -> String { prefix + String(index, radix: 36) }

    /// A ready link, or one made now (on a thread, not the caller's task) when none is ready.
    public func take() async throws(SystemError) -> SessionLink {
        if let link = state.withLock({ $0.ready.popLast() }) { return link }
        let made: Result<SessionLink, SystemError> = await withCheckedContinuation { c in
            DispatchQueue.global().async { c.resume(returning: self.make()) }
        }
        return try made.get()
    }

    /// Makes up what was taken, on the links' thread.
    public func refill() { wake.signal() }

    /// Marks a link a restarted daemon found again as in use, so its index is not given out twice.
    public func claim(index: Int) -> Bool {
        state.withLock { s in
            guard s.found.remove(index) != nil else { return false }
            s.inUse.insert(index)
            return true
        }
    }

    /// Deletes a link (on the links' thread) and frees its index once it is gone.
    public func release(_ link: SessionLink) {
        if link.namespaceFD >= 0 { Glibc.close(link.namespaceFD) }
        state.withLock { $0.doomed.append(link.name) }
        wake.signal()
    }

    /// Deletes every ready link and ends the thread, and waits for it (a few seconds at most), so no link
    /// outlives a daemon that shut down. Links in use are the sessions' to release first.
    public func close() {
        state.withLock { $0.closed = true }
        wake.signal()
        _ = finished.wait(timeout: .now() + 10)
    }

    private func make() -> Result<SessionLink, SystemError> {
        guard let index = state.withLock({ s -> Int? in
            guard let i = s.free.popLast() else { return nil }
            s.inUse.insert(i)
            return i
        }) else { return .failure(SystemError("every address of the session network \(network) is in use", errno: EADDRNOTAVAIL)) }
        let name = name(of: index)
        // A link of this name left by a daemon that was killed, whose session is gone.
        _ = cubicle_link_delete(name)
        let netns = cubicle_netns_create()
        guard netns >= 0 else {
            let e = SystemError.lastError("create network namespace")
            state.withLock { s in s.inUse.remove(index); s.free.append(index) }
            return .failure(e)
        }
        guard case .v4(let gw) = gateway, case .v4(let address) = address(of: index) else { preconditionFailure() }
        var step: UnsafePointer<CChar>?
        let rc = cubicle_link_create(name, netns, hostNetworkFD, gw.bigEndian, address.bigEndian, &step)
        if rc < 0 {
            let e = SystemError.lastError("link \(name): \(step.map { String(cString: $0) } ?? "?")")
            Glibc.close(netns)
            _ = cubicle_link_delete(name)
            state.withLock { s in s.inUse.remove(index); s.free.append(index) }
            return .failure(e)
        }
        // Forwarding on this link only (the host's ip_forward is left as it is); no IPv6 on the host end,
        // so the session has no link-local path to the host either.
        _ = try? Files.write("/proc/sys/net/ipv4/conf/\(name)/forwarding", "1")
        _ = try? Files.write("/proc/sys/net/ipv6/conf/\(name)/disable_ipv6", "1")
        return .success(SessionLink(index: index, name: name, address: self.address(of: index), namespaceFD: netns))
    }

    private func work() {
        while true {
            wake.wait()
            while true {
                let (closed, doomed, count) = state.withLock { s in
                    defer { s.doomed = [] }
                    return (s.closed, s.doomed, s.ready.count)
                }
                for name in doomed {
                    _ = cubicle_link_delete(name)
                    if let i = Int(name.dropFirst(prefix.count), radix: 36) {
                        state.withLock { s in if s.inUse.remove(i) != nil { s.free.append(i) } }
                    }
                }
                if closed {
                    let left = state.withLock { s in defer { s.ready = [] }; return s.ready }
                    for link in left {
                        Glibc.close(link.namespaceFD)
                        _ = cubicle_link_delete(link.name)
                    }
                    Glibc.close(hostNetworkFD)
                    finished.signal()
                    return
                }
                guard count < poolSize else { break }
                guard case .success(let link) = make() else { break }
                let kept = state.withLock { s in
                    guard !s.closed else { return false }
                    s.ready.append(link)
                    return true
                }
                if !kept {
                    Glibc.close(link.namespaceFD)
                    _ = cubicle_link_delete(link.name)
                }
            }
        }
    }
}
