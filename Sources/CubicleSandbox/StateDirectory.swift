#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleRPC

/// The one owner of the daemon's on-disk layout under `--state-dir` and of the sandbox id scheme:
///
///     <root>/sandboxes/sb-<16 hex>/    one per sandbox, 0700: SandboxDirectory
///     <root>/runtimes/<name>/          code directories cubicled installs itself (the demo agent)
///     <root>/uid-ranges/<slot>         uid range leases, unless --uid-lease-dir names another place
///
/// Nothing else spells these names; a restarted daemon finds what its predecessor left through the same
/// type.
public struct StateDirectory: Sendable, Equatable {
    public let root: String

    public init(_ root: String) { self.root = root }

    public var sandboxes: String { root + "/sandboxes" }
    public var runtimes: String { root + "/runtimes" }
    public var uidLeases: String { root + "/uid-ranges" }

    public func runtime(_ name: String) -> String { runtimes + "/" + name }
    public func sandbox(_ id: String) -> SandboxDirectory { SandboxDirectory(path: sandboxes + "/" + id, id: id) }

    /// The sandbox directories present, by id, sorted; anything else there is ignored.
    public func sandboxIDs() -> [String] {
        ((try? Files.listDirectory(sandboxes)) ?? []).filter(Self.isSandboxID).sorted()
    }

    static let idPrefix = "sb-"

    /// A new sandbox id: `sb-` and 64 random bits in hex. Never a session id: sessions are found by their
    /// own ids, which may be anything a client sends, and never name a file.
    public static func newSandboxID() -> String {
        var rng = SystemRandomNumberGenerator()
        return idPrefix + Hex.encode((0..<8).map { _ in UInt8.random(in: 0...255, using: &rng) })
    }

    public static func isSandboxID(_ name: String) -> Bool {
        let hex = name.utf8.dropFirst(idPrefix.utf8.count)
        return name.hasPrefix(idPrefix) && hex.count == 16
            && hex.allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains($0) }
    }

    /// What a daemon removes as it stops: every sandbox's and runtime's directory, then the root if empty.
    public func removeAll() {
        try? Files.removeTree(runtimes)
        try? Files.removeTree(sandboxes)
        rmdir(root)
    }
}

/// One sandbox's directory: its facts for a daemon that did not launch it, the record of the session
/// that owns it, and init's reconnect socket.
public struct SandboxDirectory: Sendable, Equatable {
    public let path: String
    public let id: String

    /// `SandboxFacts`: id, init's pid, cgroup, uid range.
    public var facts: String { path + "/sandbox.json" }
    /// The session that owns the sandbox (CubicleSessions writes and reads it).
    public var sessionRecord: String { path + "/session.json" }
    /// Where init listens for a daemon that reconnects.
    public static let controlSocketName = "control.sock"

    /// The directory at `path`, if its name is a sandbox id.
    public init?(path: String) {
        guard let name = path.split(separator: "/").last.map(String.init), StateDirectory.isSandboxID(name) else { return nil }
        self.init(path: path, id: name)
    }

    init(path: String, id: String) { (self.path, self.id) = (path, id) }
}
