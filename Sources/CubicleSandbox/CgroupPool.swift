#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleRPC
import Dispatch
import Synchronization

/// cgroup v1 cgroups made and limited ahead of time. A v1 cgroup is one directory in each of five
/// hierarchies plus a cpuset copied down and the limits written: about 0.5 ms, the largest host step of a
/// spawn. A spare is made off the launch's path as `<parent>/pool-<hex>` and renamed to the sandbox's
/// `<parent>/sb-<id>` when a launch takes it (five renames, about 0.05 ms); its `tasks` files are opened
/// with it and stay valid across the rename.
///
/// v1 only: v2 cgroups cannot be renamed, and a v2 cgroup is one directory. A spare holds no process and
/// belongs to no session; `close()` removes the spares, and a new pool removes the ones a killed daemon left.
public final class CgroupPool: Sendable {
    struct Spare {
        var name: String
        var limits: CgroupLimits
        var taskFiles: [Int32]
    }
    private struct State {
        var spares: [Spare] = []
        var refilling = false
        var closed = false
        /// The limits spares are made for: those of the most recent launches, newest last.
        var wanted: [CgroupLimits] = []
    }
    private let state = Mutex(State())
    private let queue = DispatchQueue(label: "cubicle.cgroup-pool")
    let root: String
    let parent: String
    /// Spares kept for each set of limits.
    let size: Int
    static let prefix = "pool-"
    /// Sets of limits kept at once (one per runtime, usually); the least recent beyond these is dropped.
    static let limitSets = 4

    public init(root: String, parent: String, size: Int) {
        (self.root, self.parent, self.size) = (root, parent, size)
        for directory in Cgroup(version: .v1, root: root, path: parent).directories {
            for name in (try? Files.listDirectory(directory)) ?? [] where name.hasPrefix(Self.prefix) {
                rmdir(directory + "/" + name)
            }
        }
    }

    /// A launcher dropped without `close()` still leaves no spare behind (a refill in flight holds the pool
    /// until it is done).
    deinit {
        state.withLock { s in
            s.spares.forEach(discard)
            s.spares.removeAll()
        }
    }

    /// The limits that matter for a spare: the cpuset is the launch's to choose.
    static func key(_ limits: CgroupLimits) -> CgroupLimits {
        var k = limits
        k.cpuSet = nil
        return k
    }

    /// A spare made for `limits` renamed to `cgroup`, with its `tasks` files (the caller's to close); nil
    /// when none is ready. Either way it records the limits as wanted, for the next `refill()`.
    func take(_ limits: CgroupLimits, as cgroup: Cgroup) -> [Int32]? {
        let key = Self.key(limits)
        let spare = state.withLock { s -> Spare? in
            s.wanted.removeAll { $0 == key }
            s.wanted.append(key)
            if s.wanted.count > Self.limitSets { s.wanted.removeFirst() }
            guard let i = s.spares.firstIndex(where: { $0.limits == key }) else { return nil }
            return s.spares.remove(at: i)
        }
        guard let spare else { return nil }
        let from = Cgroup(version: .v1, root: root, path: "\(parent)/\(spare.name)").directories
        let to = cgroup.directories
        for (i, (a, b)) in zip(from, to).enumerated() where rename(a, b) != 0 {
            // Put back what moved and give the spare up: the launch makes its own.
            for (x, y) in zip(from, to).prefix(i) { rename(y, x) }
            discard(spare)
            return nil
        }
        return spare.taskFiles
    }

    /// Removes every spare; the pool makes no more.
    public func close() {
        let spares = state.withLock { s -> [Spare] in
            s.closed = true
            defer { s.spares.removeAll() }
            return s.spares
        }
        spares.forEach(discard)
        // A refill in progress sees `closed` and discards what it made.
        queue.sync {}
    }

    public var readyCount: Int { state.withLock { $0.spares.count } }

    /// Makes spares for the wanted limits, on the pool's queue. The launcher asks once a launch is over:
    /// cgroup mkdirs and writes take the cgroup lock that the launch's renames and joins wait for, and a
    /// CPU (a spawn's fork step went from 1.0-1.1 ms to 0.7 ms, and the server's wake-up p90 from 0.8-1.1 ms
    /// to 0.1 ms, once refills stopped overlapping it).
    public func refill() {
        let start = state.withLock { s -> Bool in
            guard !s.refilling, !s.closed else { return false }
            s.refilling = true
            return true
        }
        guard start else { return }
        queue.async { [self] in
            while true {
                let (next, unwanted) = state.withLock { s -> (CgroupLimits?, [Spare]) in
                    // Spares for limits no longer wanted go first.
                    let unwanted = s.spares.filter { !s.wanted.contains($0.limits) }
                    s.spares.removeAll { !s.wanted.contains($0.limits) }
                    let short = s.closed ? nil : s.wanted.reversed().first { l in s.spares.count(where: { $0.limits == l }) < size }
                    if short == nil { s.refilling = false }
                    return (short, unwanted)
                }
                unwanted.forEach(discard)
                guard let limits = next else { return }
                guard let spare = make(limits) else {
                    state.withLock { $0.refilling = false }
                    return
                }
                let kept = state.withLock { s -> Bool in
                    guard !s.closed else { return false }
                    s.spares.append(spare)
                    return true
                }
                if !kept { discard(spare) }
            }
        }
    }

    private func make(_ limits: CgroupLimits) -> Spare? {
        var rng = SystemRandomNumberGenerator()
        let name = Self.prefix + Hex.encode((0..<8).map { _ in UInt8.random(in: 0...255, using: &rng) })
        let cgroup = Cgroup(version: .v1, root: root, path: "\(parent)/\(name)")
        let files: [Int32]
        do {
            try cgroup.create()
            try cgroup.apply(limits)
            files = try cgroup.openTaskFiles()
        } catch {
            try? cgroup.remove()
            return nil
        }
        return Spare(name: name, limits: limits, taskFiles: files)
    }

    private func discard(_ spare: Spare) {
        spare.taskFiles.forEach { _ = Glibc.close($0) }
        try? Cgroup(version: .v1, root: root, path: "\(parent)/\(spare.name)").remove()
    }
}
