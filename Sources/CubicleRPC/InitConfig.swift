/// What cubicle-init needs to build a sandbox. Nothing here names a session: a sandbox can be built
/// before any session exists (warm pools) and learns its session id from each request.
public struct InitConfig: Equatable, Sendable {
    /// One entry of the sandbox's filesystem taken from the host. Each source is opened O_PATH while still
    /// host root, before init's namespace could hide it: by the clone right after it starts (descriptor
    /// `InitConfig.firstSourceFD + sourceIndex`), or by the fork server for a runtime's template.
    public struct Mount: Equatable, Sendable {
        public enum Kind: Equatable, Sendable {
            case bindReadOnly(sourceIndex: Int, directory: Bool)
            case symlink(destination: String)
        }
        public var target: String
        public var kind: Kind
        public init(target: String, kind: Kind) { self.target = target; self.kind = kind }
    }

    public var hostname: String = "cubicle"
    public var rootBytes: Int64 = 16 << 20
    public var tmpBytes: Int64 = 256 << 20
    public var homeBytes: Int64 = 64 << 20
    /// Host system directories, /etc files, the code directory and extra read-only binds, in order.
    public var mounts: [Mount] = []
    public var agentUID: UInt32 = 1000
    public var agentGID: UInt32 = 1000
    /// Compiled seccomp program (struct sock_filter[]), loaded by every process init starts.
    public var seccompProgram: [UInt8] = []
    public var maxOpenFiles: UInt64 = 4096
    public var maxProcesses: UInt64 = 4096
    /// How long the sandbox outlives its daemon: after the control channel closes, init waits this long for
    /// a new daemon to connect to the reconnect socket before it ends the sandbox. 0: end at once.
    public var reconnectSeconds: Int64 = 0
    /// Written as /etc/resolv.conf's only nameserver; nil: the host's resolv.conf is bound in.
    public var nameserver: String?
    /// How many image layers make the root (0: the host's /usr, /lib* and /etc files, read-only, as
    /// before). They arrive after the configuration, as idmapped mounts (`RPCMethod.imageLayers`); the
    /// root is then an overlay of them with a writable upper layer in the root's tmpfs.
    public var imageLayers = 0
    /// Empty directories made in the read-only tree, where the host mounts a session's storage
    /// (`/mnt/NAME`) once the sandbox is its.
    public var mountPoints: [String] = []
    /// Where an image root's upper layer (its tmpfs) is also mounted, so the host can wipe it at teardown.
    public static let imageUpper = "/.cubicle-upper"

    public static let codePath = "/app"
    /// fd 3 is the control socket; fd 4 a listening socket in the host's state directory where a restarted
    /// daemon reconnects; bind sources follow.
    public static let controlFD: Int32 = 3
    public static let reconnectFD: Int32 = 4
    public static let firstSourceFD: Int32 = 5
    public static let agentUser = "agent"
    public static let agentHome = "/home/agent"
    /// The sandbox's writable tmpfs mounts, which init mounts (RootFilesystem.mountPerSandboxPart) and the
    /// host wipes at teardown (PinnedMounts); everything else in the tree is read-only.
    public static let writableMounts = ["/dev/shm", "/tmp", agentHome]

    public init() {}

    public var json: JSON {
        [
            "hostname": .string(hostname),
            "rootBytes": .int(rootBytes),
            "tmpBytes": .int(tmpBytes),
            "homeBytes": .int(homeBytes),
            "mounts": .array(mounts.map { m -> JSON in
                switch m.kind {
                case .bindReadOnly(let index, let directory):
                    ["target": .string(m.target), "source": .int(Int64(index)), "directory": .bool(directory)]
                case .symlink(let destination):
                    ["target": .string(m.target), "symlink": .string(destination)]
                }
            }),
            "agentUID": .int(Int64(agentUID)),
            "agentGID": .int(Int64(agentGID)),
            "seccomp": .string(Hex.encode(seccompProgram)),
            "maxOpenFiles": .int(Int64(maxOpenFiles)),
            "maxProcesses": .int(Int64(maxProcesses)),
            "reconnectSeconds": .int(reconnectSeconds),
            "nameserver": nameserver.map { .string($0) } ?? .null,
            "imageLayers": .int(Int64(imageLayers)),
            "mountPoints": .array(mountPoints.map(JSON.string)),
        ]
    }

    public init(json: JSON) throws(RPCError) {
        func field<T>(_ name: String, _ get: (JSON) -> T?) throws(RPCError) -> T {
            guard let v = json[name], let t = get(v) else { throw RPCError(code: RPCError.invalidParams, message: "config field \(name) missing or wrong type") }
            return t
        }
        hostname = try field("hostname") { $0.stringValue }
        rootBytes = try field("rootBytes") { $0.intValue }
        tmpBytes = try field("tmpBytes") { $0.intValue }
        homeBytes = try field("homeBytes") { $0.intValue }
        let entries = try field("mounts") { $0.arrayValue }
        mounts = []
        for e in entries.prefix(256) {
            guard let target = e["target"]?.stringValue, target.hasPrefix("/"), !target.split(separator: "/").contains("..") else {
                throw RPCError(code: RPCError.invalidParams, message: "mount target must be an absolute path without ..")
            }
            if let index = e["source"]?.intValue, index >= 0, index < 48, let directory = e["directory"]?.boolValue {
                mounts.append(Mount(target: target, kind: .bindReadOnly(sourceIndex: Int(index), directory: directory)))
            } else if let destination = e["symlink"]?.stringValue {
                mounts.append(Mount(target: target, kind: .symlink(destination: destination)))
            } else {
                throw RPCError(code: RPCError.invalidParams, message: "mount \(target) is neither a bind nor a symlink")
            }
        }
        agentUID = try field("agentUID") { $0.intValue.flatMap { UInt32(exactly: $0) } }
        agentGID = try field("agentGID") { $0.intValue.flatMap { UInt32(exactly: $0) } }
        seccompProgram = try field("seccomp") { $0.stringValue.flatMap(Hex.decode) }
        maxOpenFiles = try field("maxOpenFiles") { $0.intValue.flatMap { UInt64(exactly: $0) } }
        maxProcesses = try field("maxProcesses") { $0.intValue.flatMap { UInt64(exactly: $0) } }
        reconnectSeconds = min(max(json["reconnectSeconds"]?.intValue ?? 0, 0), 86_400)
        imageLayers = Int(min(max(json["imageLayers"]?.intValue ?? 0, 0), 128))
        mountPoints = []
        for p in (json["mountPoints"]?.arrayValue ?? []).prefix(8) {
            guard let path = p.stringValue, path.hasPrefix("/"), path.utf8.count <= 256,
                  !path.split(separator: "/").contains(where: { $0 == ".." || $0 == "." }) else {
                throw RPCError(code: RPCError.invalidParams, message: "mount point must be an absolute path without . or ..")
            }
            mountPoints.append(path)
        }
        // A dotted IPv4 address and nothing else: it is written into a file other programs parse.
        if let n = json["nameserver"]?.stringValue {
            guard n.utf8.count <= 15, n.utf8.allSatisfy({ $0 == UInt8(ascii: ".") || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }) else {
                throw RPCError(code: RPCError.invalidParams, message: "config field nameserver is not an IPv4 address")
            }
            nameserver = n
        }
        guard seccompProgram.count % 8 == 0, seccompProgram.count / 8 <= 4096 else {
            throw RPCError(code: RPCError.invalidParams, message: "seccomp program is not whole instructions")
        }
    }
}

/// A process for init to start: the agent, or a command run beside it.
public struct ProcessParams: Equatable, Sendable {
    public var argv: [String]
    public var env: [String]
    public var cwd: String

    public init(argv: [String], env: [String], cwd: String = InitConfig.agentHome) {
        self.argv = argv
        self.env = env
        self.cwd = cwd
    }

    public var json: JSON {
        ["argv": .array(argv.map { .string($0) }), "env": .array(env.map { .string($0) }), "cwd": .string(cwd)]
    }

    public init(json: JSON) throws(RPCError) {
        guard let argv = json["argv"]?.arrayValue?.compactMap(\.stringValue), !argv.isEmpty, argv.count <= 4096,
              let env = json["env"]?.arrayValue?.compactMap(\.stringValue), env.count <= 4096,
              let cwd = json["cwd"]?.stringValue
        else { throw RPCError(code: RPCError.invalidParams, message: "process needs argv (non-empty), env and cwd") }
        guard !(argv + env + [cwd]).contains(where: { $0.utf8.contains(0) }) else {
            throw RPCError(code: RPCError.invalidParams, message: "NUL byte in argv, env or cwd")
        }
        self.argv = argv
        self.env = env
        self.cwd = cwd
    }
}

