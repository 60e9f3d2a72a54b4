/// The daemon's side of init's fork server: one request makes one sandbox's init. The server is
/// cubicle-init itself, started once by the daemon and single-threaded, so each init it clones starts
/// with the Swift runtime loaded and its code paged in instead of paying for an exec (see
/// `Sources/CubicleInit/ForkServer.swift`).
///
/// A request is one SOCK_SEQPACKET message: the length of this JSON (4 bytes, little-endian), the JSON, then
/// init's configuration (the JSON of `InitConfig`), with the descriptors it counts attached in the order of
/// `descriptorCount`. The reply is `ForkReply`, 20 bytes. The configuration travels as bytes so the server
/// can tell it has parsed the same one before (every sandbox of a runtime has the same) without parsing it.
public struct ForkRequest: Equatable, Sendable {
    public var namespaces: Int32
    public var unshareCgroup: Bool
    /// uid_map and gid_map, written by the server while the child waits.
    public var idMap: String
    /// init's bind sources: what the server builds the runtime's template from (and checks at each
    /// request), or, without a template, what the child opens O_PATH in its new mount namespace.
    public var sources: [String]
    public var hasNetworkNamespace: Bool
    /// cgroup v1 `tasks` files the child writes "0" to.
    public var cgroupTaskFiles: Int
    /// A cgroup v2 `cgroup.procs` the server writes the child's pid to.
    public var hasCgroupProcs: Bool
    /// The host uid that owns the new user namespace (`cubicle_sandbox_spawn.userns_owner`); 0: the server.
    public var usernsOwner: UInt32

    /// Control socket and reconnect socket: init's fds 3 and 4.
    public static let placedCount = 2
    public static let maxSize = 256 * 1024
    /// The server's socket to the daemon.
    public static let serverFD: Int32 = 3

    public init(namespaces: Int32, unshareCgroup: Bool, idMap: String, sources: [String], hasNetworkNamespace: Bool,
                cgroupTaskFiles: Int, hasCgroupProcs: Bool, usernsOwner: UInt32 = 0) {
        (self.namespaces, self.unshareCgroup, self.idMap, self.sources) = (namespaces, unshareCgroup, idMap, sources)
        (self.hasNetworkNamespace, self.cgroupTaskFiles, self.hasCgroupProcs) = (hasNetworkNamespace, cgroupTaskFiles, hasCgroupProcs)
        self.usernsOwner = usernsOwner
    }

    public static func message(request: [UInt8], configuration: [UInt8]) -> [UInt8] {
        (0..<4).map { UInt8(truncatingIfNeeded: UInt32(request.count) >> ($0 * 8)) } + request + configuration
    }

    /// The request's JSON and the configuration's bytes; nil when the lengths do not add up.
    public static func split(_ message: ArraySlice<UInt8>) -> (request: ArraySlice<UInt8>, configuration: ArraySlice<UInt8>)? {
        guard message.count >= 4 else { return nil }
        let start = message.startIndex
        let n = (0..<4).reduce(0) { $0 | Int(message[start + $1]) << ($1 * 8) }
        guard n <= message.count - 4 else { return nil }
        return (message[(start + 4)..<(start + 4 + n)], message[(start + 4 + n)...])
    }

    /// How many descriptors come with the request: placed ones, the network namespace, tasks files, cgroup.procs.
    public var descriptorCount: Int {
        Self.placedCount + (hasNetworkNamespace ? 1 : 0) + cgroupTaskFiles + (hasCgroupProcs ? 1 : 0)
    }

    public var json: JSON {
        ["namespaces": .int(Int64(namespaces)), "unshareCgroup": .bool(unshareCgroup), "idMap": .string(idMap),
         "sources": .array(sources.map { .string($0) }), "netns": .bool(hasNetworkNamespace),
         "tasks": .int(Int64(cgroupTaskFiles)), "procs": .bool(hasCgroupProcs), "owner": .int(Int64(usernsOwner))]
    }

    public init(json: JSON) throws(RPCError) {
        guard let namespaces = json["namespaces"]?.intValue.flatMap({ Int32(exactly: $0) }),
              let unshareCgroup = json["unshareCgroup"]?.boolValue, let idMap = json["idMap"]?.stringValue,
              let sources = json["sources"]?.arrayValue?.compactMap(\.stringValue), sources.count <= 48,
              let netns = json["netns"]?.boolValue, let tasks = json["tasks"]?.intValue, (0...8).contains(tasks),
              let procs = json["procs"]?.boolValue,
              let owner = json["owner"]?.intValue.flatMap({ UInt32(exactly: $0) }),
              !(sources + [idMap]).contains(where: { $0.utf8.contains(0) })
        else { throw RPCError(code: RPCError.invalidParams, message: "malformed fork request") }
        self.init(namespaces: namespaces, unshareCgroup: unshareCgroup, idMap: idMap, sources: sources,
                  hasNetworkNamespace: netns, cgroupTaskFiles: Int(tasks), hasCgroupProcs: procs, usernsOwner: owner)
    }
}

/// The server's answer: the new init's pid, or the step that failed with errno. `unreaped` is a child that
/// was made and killed: it is the daemon's child (CLONE_PARENT), so the daemon reaps it.
public struct ForkReply: Equatable, Sendable {
    public var pid: Int32
    public var step: Int32
    public var errno: Int32
    public var index: Int32
    public var unreaped: Int32

    public static let size = 20

    public init(pid: Int32, step: Int32 = 0, errno: Int32 = 0, index: Int32 = -1, unreaped: Int32 = 0) {
        (self.pid, self.step, self.errno, self.index, self.unreaped) = (pid, step, errno, index, unreaped)
    }

    public var bytes: [UInt8] {
        [pid, step, errno, index, unreaped].flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: UInt32(bitPattern: v) >> ($0 * 8)) } }
    }

    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == Self.size else { return nil }
        let b = Array(bytes)
        func word(_ i: Int) -> Int32 { Int32(bitPattern: (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[i * 4 + $1]) << ($1 * 8) }) }
        self.init(pid: word(0), step: word(1), errno: word(2), index: word(3), unreaped: word(4))
    }

    /// First bytes the server sends once it is ready, so the daemon knows the binary speaks this protocol.
    public static let hello: [UInt8] = Array("cubicle-init fork server 1\n".utf8)
    /// In the server's environment, asking cubicle-init to serve as the fork server.
    public static let environmentKey = "CUBICLE_INIT_FORK_SERVER"
}
