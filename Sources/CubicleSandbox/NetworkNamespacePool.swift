#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import Dispatch
import Synchronization

/// Network namespaces made ahead of time, each with its loopback up, so a launch does not wait for one.
/// A new network namespace is the slowest thing clone does (about 0.45 ms here), and far slower while the
/// kernel is still tearing down an earlier sandbox's: that cleanup holds the rtnl lock across RCU grace
/// periods, which put 10-20 ms into one spawn in twenty. Made on the pool's own thread, that wait lands
/// there instead.
///
/// A pooled namespace belongs to a user namespace of its own that root on the host made (so the launching
/// thread may enter it), not to the sandbox's, so nothing inside can reconfigure it (no CAP_NET_ADMIN over
/// it); and not to the host's either, to which the kernel broadcasts host device uevents. The sandbox gets
/// a fresh one all the same, used by nobody before. An empty pool costs nothing but speed: the launch asks
/// clone for a new namespace as before.
public final class NetworkNamespacePool: Sendable {
    private struct State {
        var ready: [Int32] = []
        var closed = false
    }

    public let size: Int
    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    /// Where the pool's thread and every launching thread return after entering a new namespace.
    let hostNetworkFD: Int32

    public init(size: Int) throws(SystemError) {
        precondition(size > 0, "a pool of no namespaces is no pool: pass nil instead")
        self.size = size
        hostNetworkFD = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC)
        guard hostNetworkFD >= 0 else { throw SystemError.lastError("open /proc/self/ns/net") }
        // Made (by a short-lived child each, cubicle_netns_create) on a thread of the pool's own, so the
        // wait for a namespace lands there and not on a launch or a request.
        do { try startThread("network namespace pool's") { [self] in fill() } } catch {
            Glibc.close(hostNetworkFD)
            throw error
        }
        wake.signal()
    }

    /// A namespace for one sandbox, the caller's to close; nil while the pool is empty. The pool makes
    /// no new one until `refill()`.
    public func take() -> Int32? {
        state.withLock { $0.ready.popLast() }
    }

    /// Makes up what was taken, on the pool's thread. The launcher asks once a launch is over, not when
    /// it takes: a namespace made during a spawn holds locks the spawn needs and the CPU it runs on.
    public func refill() { wake.signal() }

    /// How many are ready now.
    public var readyCount: Int { state.withLock { $0.ready.count } }

    /// Closes every namespace not taken and ends the pool's thread. Only once no launch is under way: a
    /// launch returns to the host's namespace through the descriptor this closes.
    public func close() {
        state.withLock { $0.closed = true }
        wake.signal()
    }

    private func fill() {
        while true {
            wake.wait()
            while true {
                let (closed, count) = state.withLock { ($0.closed, $0.ready.count) }
                if closed {
                    let left = state.withLock { s in defer { s.ready = [] }; return s.ready }
                    left.forEach { _ = Glibc.close($0) }
                    Glibc.close(hostNetworkFD)
                    return
                }
                guard count < size else { break }
                let fd = cubicle_netns_create()
                // Out of namespaces or not allowed to make them: launches make their own until a take
                // wakes the pool again.
                guard fd >= 0 else { break }
                let kept = state.withLock { s in
                    guard !s.closed else { return false }
                    s.ready.append(fd)
                    return true
                }
                if !kept { Glibc.close(fd) }
            }
        }
    }
}
