#if canImport(Glibc)
import Glibc
#endif
import CLibseccomp
import CubicleLinux
import CubicleRPC

/// A seccomp profile in the OCI/Docker JSON format, compiled on the host to a BPF program that init
/// installs in every process it starts. Compiling here keeps libseccomp out of the sandbox and turns a bad
/// profile into an error before anything is spawned.
public struct SeccompProfile: Sendable {
    public enum Action: Equatable, Sendable {
        case allow, errno(UInt16), killThread, killProcess, trap, log

        init(_ name: String, errno: UInt16?) throws(SeccompError) {
            switch name {
            case "SCMP_ACT_ALLOW": self = .allow
            case "SCMP_ACT_ERRNO": self = .errno(errno ?? UInt16(EPERM))
            case "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD": self = .killThread
            case "SCMP_ACT_KILL_PROCESS": self = .killProcess
            case "SCMP_ACT_TRAP": self = .trap
            case "SCMP_ACT_LOG": self = .log
            default: throw SeccompError("unknown action \(name)")
            }
        }

        var raw: UInt32 {
            switch self {
            case .allow: 0x7fff_0000
            case .errno(let e): 0x0005_0000 | UInt32(e)
            case .killThread: 0
            case .killProcess: 0x8000_0000
            case .trap: 0x0003_0000
            case .log: 0x7ffc_0000
            }
        }
    }

    public struct Argument: Equatable, Sendable {
        public var index: UInt32
        public var op: UInt32
        public var value: UInt64
        public var valueTwo: UInt64
    }

    public struct Rule: Equatable, Sendable {
        public var names: [String]
        public var action: Action
        public var args: [Argument]
    }

    public var defaultAction: Action
    public var rules: [Rule]

    static let operators: [String: UInt32] = [
        "SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
        "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7,
    ]

    public static func load(path: String) throws(SeccompError) -> SeccompProfile {
        let bytes: [UInt8]
        do { bytes = try Files.readBytes(path, limit: 4 << 20) } catch { throw SeccompError("cannot read \(path): \(error)") }
        return try parse(bytes)
    }

    public static func parse(_ bytes: [UInt8]) throws(SeccompError) -> SeccompProfile {
        let json: JSON
        do { json = try JSON.parse(bytes) } catch { throw SeccompError("profile is not JSON: \(error)") }
        guard let name = json["defaultAction"]?.stringValue else { throw SeccompError("defaultAction missing") }
        let defaultErrno = json["defaultErrnoRet"]?.intValue.flatMap { UInt16(exactly: $0) }
        let defaultAction = try Action(name, errno: defaultErrno)
        var rules: [Rule] = []
        for (i, entry) in (json["syscalls"]?.arrayValue ?? []).enumerated() {
            // The agent holds no capabilities, so rules that need one never apply; other architectures' rules neither.
            if let caps = entry["includes"]?["caps"]?.arrayValue, !caps.isEmpty { continue }
            if let arches = entry["includes"]?["arches"]?.arrayValue?.compactMap(\.stringValue), !arches.contains("amd64") && !arches.contains("x86_64") { continue }
            if let arches = entry["excludes"]?["arches"]?.arrayValue?.compactMap(\.stringValue), arches.contains("amd64") { continue }
            guard let names = entry["names"]?.arrayValue?.compactMap(\.stringValue), !names.isEmpty else {
                throw SeccompError("syscalls[\(i)]: names missing")
            }
            guard let actionName = entry["action"]?.stringValue else { throw SeccompError("syscalls[\(i)]: action missing") }
            let action = try Action(actionName, errno: entry["errnoRet"]?.intValue.flatMap { UInt16(exactly: $0) })
            var args: [Argument] = []
            for a in entry["args"]?.arrayValue ?? [] {
                guard let index = a["index"]?.intValue, (0...5).contains(index),
                      let opName = a["op"]?.stringValue, let op = operators[opName],
                      let value = a["value"]?.intValue, value >= 0
                else { throw SeccompError("syscalls[\(i)]: bad argument filter \(a.text)") }
                let two = a["valueTwo"]?.intValue ?? 0
                args.append(Argument(index: UInt32(index), op: op, value: UInt64(value), valueTwo: UInt64(max(0, two))))
            }
            rules.append(Rule(names: names, action: action, args: args))
        }
        return SeccompProfile(defaultAction: defaultAction, rules: rules)
    }

    /// The BPF program (struct sock_filter[]) for this machine's architecture. Other ABIs (x32, i386 via
    /// int 0x80) are not added, so libseccomp's bad-architecture action kills them.
    public func compile() throws(SeccompError) -> [UInt8] {
        guard let ctx = seccomp_init(defaultAction.raw) else { throw SeccompError("seccomp_init failed") }
        defer { seccomp_release(ctx) }
        for rule in rules {
            for name in rule.names {
                let nr = seccomp_syscall_resolve_name(name)
                if nr == __NR_SCMP_ERROR { continue }  // unknown to this kernel/libseccomp, as runc does
                let cmps = rule.args.map { scmp_arg_cmp(arg: $0.index, op: scmp_compare(rawValue: $0.op), datum_a: $0.value, datum_b: $0.valueTwo) }
                let rc = cmps.withUnsafeBufferPointer { seccomp_rule_add_array(ctx, rule.action.raw, nr, UInt32($0.count), $0.baseAddress) }
                // -EACCES/-EEXIST: the rule's action equals the default, which libseccomp refuses as redundant.
                if rc < 0 && rule.action != defaultAction {
                    throw SeccompError("rule for \(name): \(String(cString: strerror(-rc)))")
                }
            }
        }
        // A program is at most 4096 instructions (32 KiB), less than a pipe buffer, so export cannot block.
        let pipe: (read: Int32, write: Int32)
        do { pipe = try Descriptors.pipe() } catch { throw SeccompError("pipe: \(error)") }
        let rc = seccomp_export_bpf(ctx, pipe.write)
        close(pipe.write)
        let fd = pipe.read
        defer { close(fd) }
        guard rc == 0 else { throw SeccompError("seccomp_export_bpf: \(String(cString: strerror(-rc)))") }
        var program: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 8192)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            program.append(contentsOf: buf[0..<n])
        }
        guard !program.isEmpty, program.count % 8 == 0 else { throw SeccompError("exported program is empty or malformed") }
        return program
    }
}

public struct SeccompError: Error, CustomStringConvertible, Sendable {
    public var message: String
    init(_ message: String) { self.message = message }
    public var description: String { "seccomp profile: \(message)" }
}

extension SeccompProfile {
    /// sandbox/seccomp/default.json as it was when this binary was built.
    public static var embeddedDefault: SeccompProfile {
        get throws(SeccompError) { try parse(PackageResources.default_seccomp_json) }
    }
}
