#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import Synchronization

/// Chooses the CPUs a sandbox may run on: as many as its quota rounds up to, the least used ones first.
/// A VM with one vCPU never runs two threads at once; without this, a session with half a CPU of quota and
/// four busy threads would burst on every core of the host and hold up every neighbour (noisy_bench).
public final class CPUPlacer: Sendable {
    public let online: [Int]
    private let load: Mutex<[Int: Int]>

    public init(online: [Int] = CPUPlacer.allowedCPUs()) {
        self.online = online
        load = Mutex(Dictionary(uniqueKeysWithValues: online.map { ($0, 0) }))
    }

    /// nil when the session may use every CPU anyway.
    public func take(_ count: Int) -> [Int]? {
        guard count > 0, count < online.count else { return nil }
        return load.withLock { load in
            let chosen = online.sorted { (load[$0]!, $0) < (load[$1]!, $1) }.prefix(count)
            for c in chosen { load[c]! += 1 }
            return Array(chosen).sorted()
        }
    }

    /// For a sandbox adopted from a previous daemon, whose placement is already in its cgroup.
    public func claim(_ cpus: [Int]) {
        load.withLock { load in for c in cpus where load[c] != nil { load[c]! += 1 } }
    }

    public func release(_ cpus: [Int]) {
        load.withLock { load in for c in cpus where (load[c] ?? 0) > 0 { load[c]! -= 1 } }
    }

    /// The CPUs this process may run on (its own cpuset or affinity, e.g. a container's share).
    public static func allowedCPUs() -> [Int] {
        let status = (try? Files.read("/proc/self/status")) ?? ""
        if let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") }),
           let cpus = parseList(String(line.dropFirst("Cpus_allowed_list:".count)).trimmingSpaces) {
            return cpus
        }
        return Array(0..<max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
    }

    /// "0-2,5" -> [0, 1, 2, 5]
    static func parseList(_ text: String) -> [Int]? {
        var out: [Int] = []
        for part in text.split(separator: ",") {
            let ends = part.split(separator: "-").map { Int($0) }
            guard !ends.contains(nil), let a = ends.first!, let b = ends.last! , a <= b, ends.count <= 2 else { return nil }
            out += Array(a...b)
        }
        return out.isEmpty ? nil : out
    }
}
