#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import CubicleLinux
import CubicleNetwork
import CubicleRuntimes
import CubicleSandbox
import CubicleSessions
import CubicleStorage

/// The JSON operators see: `ps` rows, `inspect`, log lines. Facts come from the kernel at the time of the
/// request (/proc, the cgroup files, statfs), not from what cubicled believes.
enum OperatorJSON {
    static func usage(_ u: CgroupUsage) -> JSON {
        [
            "memoryBytes": .int(u.memoryBytes), "memoryPeakBytes": u.memoryPeakBytes.map { .int($0) } ?? .null,
            "cpuSeconds": .double(Double(u.cpuNanoseconds) / 1e9), "pids": .int(u.pids), "oomKills": .int(u.oomKills),
            "pidsLimitHits": .int(u.pidsLimitHits),
        ]
    }

    static func limits(_ l: RuntimeConfig.Limits) -> JSON {
        ["memoryBytes": .int(l.memoryBytes), "cpus": .double(l.cpus), "pids": .int(Int64(l.pids)), "tmpfsBytes": .int(l.tmpfsBytes)]
    }

    static func summary(_ s: SessionSummary, timeline: Session.Timeline?) -> JSON {
        var o: [String: JSON] = [
            "id": .string(s.id), "owner": .string(s.owner), "runtime": .string(s.runtime), "runtimeVersion": .int(Int64(s.runtimeVersion)), "state": .string(s.state), "sandbox": .string(s.sandboxID),
            "created": .int(Int64(s.createdUnixTime)), "invocations": .int(Int64(s.invocations)),
            "lastPing": s.lastPing.map { .string($0) } ?? .null, "initPID": .int(Int64(s.initPID)), "agentPID": .int(Int64(s.agentPID)),
            "usage": usage(s.usage),
        ]
        if let ended = s.endedUnixTime { o["ended"] = .int(Int64(ended)) }
        if let reason = s.endReason {
            o["endReason"] = .string(reason.name)
            o["endDetail"] = .string(reason.description)
        }
        if !s.teardownLeftovers.isEmpty { o["teardownLeftovers"] = .array(s.teardownLeftovers.map { .string($0) }) }
        if let t = timeline { o["idleSeconds"] = .double((t.idleSeconds * 10).rounded() / 10) }
        return .object(o)
    }

    static func inspect(_ session: Session, shells: Int) -> JSON {
        let sandbox = session.sandbox
        let summary = session.summary
        let t = session.timeline
        guard case .object(var o) = self.summary(summary, timeline: t) else { return .null }
        o["agentHostPID"] = hostPID(ofChild: session.agentPID, of: sandbox.initPID).map { .int(Int64($0)) } ?? .null
        o["namespaces"] = namespaces(pid: sandbox.initPID)
        o["cgroup"] = [
            "version": .string(sandbox.cgroup.version.rawValue), "path": .string(sandbox.cgroup.path),
            "directories": .array(sandbox.cgroup.directories.map { .string($0) }),
        ]
        o["ids"] = ["hostBase": .int(Int64(sandbox.uidRange.hostBase)), "size": .int(Int64(sandbox.uidRange.size)),
                    "agentHostUID": .int(Int64(sandbox.uidRange.host(1000)))]
        o["limits"] = limits(session.runtime.limits)
        // The CPUs the session may run on; empty: all of them.
        o["cpus"] = .array(sandbox.cpus.map { .int(Int64($0)) })
        o["tmpfsBytesUsed"] = tmpfsUsage(pid: sandbox.initPID)
        o["lifecycle"] = [
            "state": .string(summary.state), "created": .int(Int64(summary.createdUnixTime)),
            "lastActivity": .double(t.lastActivity.rounded()), "idleDeadline": t.idleDeadline.map { .double($0.rounded()) } ?? .null,
            "maxLifetimeDeadline": .double(t.maxLifetimeDeadline.rounded()),
            "idleTimeoutSeconds": .int(Int64(session.runtime.idleRuntimeSessionTimeout)),
            "maxLifetimeSeconds": .int(Int64(session.runtime.maxLifetime)),
        ]
        o["spawnMicroseconds"] = .int(Int64(sandbox.spawnNanoseconds / 1000))
        // Interactive shells a client can still use (data plane and exec -it; a dropped one within its window).
        o["shells"] = .int(Int64(shells))
        o["network"] = network(session)
        // The image the session's root is (nil: the host's /usr, /lib* and /etc files).
        o["image"] = session.runtime.containerUri.map { .string($0) } ?? .null
        // Its storage volume's use, read from the mounted file system now.
        if let lease = session.storage, let fs = session.runtime.sessionStorage, let u = try? StorageVolume.usage(lease.hostPath) {
            o["storage"] = ["mountPath": .string(fs.mountPath), "bytesUsed": .int(u.bytes), "bytesLimit": .int(u.bytesLimit),
                            "inodesUsed": .int(u.inodes), "inodesLimit": .int(u.inodesLimit), "volume": .string(lease.key.name)]
        } else {
            o["storage"] = .null
        }
        return .object(o)
    }

    /// The session's network mode and, for PUBLIC, its link, address, policy and bytes through the link
    /// (the host end's counters: what the host end sent is what the session received).
    static func network(_ session: Session) -> JSON {
        let runtime = session.runtime
        var n: [String: JSON] = ["mode": .string(runtime.networkMode.rawValue)]
        guard let link = session.link else { return .object(n) }
        func counter(_ name: String) -> JSON {
            (try? Files.read("/sys/class/net/\(link.name)/statistics/\(name)")).flatMap { Int64($0.filter { !$0.isWhitespace }) }.map { .int($0) } ?? .null
        }
        n["link"] = .string(link.name)
        n["address"] = .string(link.address.description)
        n["egress"] = ["allow": .array(runtime.egress.allow.map { .string($0.description) }),
                       "deny": .array(runtime.egress.deny.map { .string($0.description) })]
        n["roleArn"] = runtime.roleArn.map { .string($0) } ?? .null
        n["bytesIn"] = counter("tx_bytes")
        n["bytesOut"] = counter("rx_bytes")
        return .object(n)
    }

    /// The host pid of init's child whose pid inside the sandbox is `inside` (NSpid's last field).
    static func hostPID(ofChild inside: Int32, of initPID: Int32) -> Int32? {
        guard let children = try? Files.read("/proc/\(initPID)/task/\(initPID)/children") else { return nil }
        for child in children.split(separator: " ").compactMap({ Int32($0.filter { !$0.isWhitespace }) }) {
            guard let status = try? Files.read("/proc/\(child)/status") else { continue }
            let nspid = status.split(separator: "\n").first { $0.hasPrefix("NSpid:") }?.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if nspid?.last.flatMap({ Int32($0) }) == inside { return child }
        }
        return nil
    }

    /// Inode numbers of init's namespaces (the agent shares them), as `ls -l /proc/PID/ns` shows them.
    static func namespaces(pid: Int32) -> JSON {
        var o: [String: JSON] = [:]
        for kind in ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"] {
            var buf = [CChar](repeating: 0, count: 128)
            let n = readlink("/proc/\(pid)/ns/\(kind)", &buf, buf.count - 1)
            guard n > 0 else { continue }
            let text = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let open = text.firstIndex(of: "["), let close = text.lastIndex(of: "]"), let inode = Int64(text[text.index(after: open)..<close]) {
                o[kind] = .int(inode)
            }
        }
        return .object(o)
    }

    /// Bytes used in each of the session's tmpfs mounts, seen through init's root.
    static func tmpfsUsage(pid: Int32) -> JSON {
        var o: [String: JSON] = [:]
        for (name, path) in [("root", "/"), ("tmp", "/tmp"), ("home", "/home/agent"), ("shm", "/dev/shm")] {
            var st = statvfs()
            guard statvfs("/proc/\(pid)/root\(path)", &st) == 0 else { continue }
            o[name] = .int(Int64(st.f_blocks - st.f_bfree) * Int64(st.f_frsize))
        }
        return .object(o)
    }

    static func logLine(_ line: LogRing.Line) -> JSON {
        ["stream": .string(line.stream), "text": .string(line.text), "seq": .int(Int64(line.sequence))]
    }
}
