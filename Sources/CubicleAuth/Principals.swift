#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import Crypto
import Synchronization
import Yams

/// The principals file (`--credentials FILE`): who may call and what each may do, in IAM's vocabulary.
///
///     principals:
///       - name: alice
///         accessKeys: [{accessKeyId: AKIA..., secretAccessKey: "...", sessionToken: "..."}]
///         allow: [{actions: ["bedrock-agentcore:InvokeAgentRuntime"], resources: ["arn:aws:bedrock-agentcore:*:*:runtime/*"]}]
///         deny:  [...]
public struct Principals: Sendable {
    public struct Principal: Sendable, Equatable {
        public var name: String
        public var allow: [Statement]
        public var deny: [Statement]
    }

    public struct AccessKey: Sendable, Equatable {
        public var id: String
        public var secret: String
        /// When set, requests signed with this key must carry it as X-Amz-Security-Token (temporary
        /// credentials); when not, a request that carries one is refused.
        public var sessionToken: String?
    }

    /// Actions and resources with IAM's wildcards: `*` any run of characters, `?` any one. Actions match
    /// case-insensitively (as IAM's do), resources exactly.
    public struct Statement: Sendable, Equatable {
        public var actions: [String]
        public var resources: [String]

        func matches(action: String, resource: String) -> Bool {
            actions.contains { Wildcard.matches($0, action, caseInsensitive: true) } && resources.contains { Wildcard.matches($0, resource) }
        }
    }

    public let principals: [Principal]
    /// Access key id → its principal, the key, and the key's last signing key.
    let keys: [String: KeyEntry]

    /// One access key and the HMAC state its last scope's signing key makes: requests are signed for
    /// one date, region and service at a time, so deriving it (four HMACs) and keying it (two SHA-256
    /// blocks) is done once per key and day rather than per request.
    final class KeyEntry: Sendable {
        let principal: Int
        let key: AccessKey
        let signing = Mutex<(date: String, region: String, service: String, mac: SigningMAC)?>(nil)
        init(principal: Int, key: AccessKey) { self.principal = principal; self.key = key }
    }

    public init(principals: [Principal], keys: [(principal: String, key: AccessKey)]) throws(ConfigurationError) {
        self.principals = principals
        var map: [String: KeyEntry] = [:]
        for (name, key) in keys {
            guard let i = principals.firstIndex(where: { $0.name == name }) else { throw ConfigurationError("principal \(name) is not defined") }
            guard map[key.id] == nil else { throw ConfigurationError("access key \(key.id) is given twice") }
            map[key.id] = KeyEntry(principal: i, key: key)
        }
        self.keys = map
    }

    public func key(_ id: String) -> (principal: Principal, key: AccessKey)? {
        guard let entry = keys[id] else { return nil }
        return (principals[entry.principal], entry.key)
    }

    /// An explicit deny wins; otherwise some allow must match (IAM's evaluation, identity policies only).
    public static func allows(_ principal: Principal, action: String, resource: String) -> Bool {
        if principal.deny.contains(where: { $0.matches(action: action, resource: resource) }) { return false }
        return principal.allow.contains { $0.matches(action: action, resource: resource) }
    }

    public struct ConfigurationError: Error, CustomStringConvertible, Sendable {
        public var description: String
        init(_ d: String) { description = "credentials: \(d)" }
    }

    /// Reads the file, refusing one that anyone but root could read or write: it holds secret keys.
    public static func load(path: String) throws(ConfigurationError) -> Principals {
        var st = stat()
        guard stat(path, &st) == 0 else { throw ConfigurationError("\(path): \(String(cString: strerror(errno)))") }
        guard st.st_mode & S_IFMT == S_IFREG else { throw ConfigurationError("\(path) is not a regular file") }
        guard st.st_uid == 0, st.st_mode & 0o077 == 0 else {
            throw ConfigurationError("\(path) must be owned by root and readable by no one else (chmod 600): it holds secret access keys")
        }
        guard let f = fopen(path, "r") else { throw ConfigurationError("\(path): \(String(cString: strerror(errno)))") }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n == 0 { break }
            bytes += chunk[0..<n]
            guard bytes.count <= 4 << 20 else { throw ConfigurationError("\(path) is over 4 MiB") }
        }
        return try parse(yaml: String(decoding: bytes, as: UTF8.self))
    }

    public static func parse(yaml text: String) throws(ConfigurationError) -> Principals {
        let root: Any?
        do { root = try Yams.load(yaml: text) } catch { throw ConfigurationError("not valid YAML: \(error)") }
        guard let top = root as? [String: Any], let list = top["principals"] as? [Any], top.count == 1 else {
            throw ConfigurationError("must be a mapping with one key, principals: a list")
        }
        var principals: [Principal] = [], keys: [(String, AccessKey)] = []
        for (i, item) in list.enumerated() {
            let path = "principals[\(i)]"
            guard let p = item as? [String: Any] else { throw ConfigurationError("\(path) must be a mapping") }
            for key in p.keys where !["name", "accessKeys", "allow", "deny"].contains(key) { throw ConfigurationError("\(path).\(key) is not a field") }
            guard let name = p["name"] as? String, isName(name) else {
                throw ConfigurationError("\(path).name is required: letters, digits and +=,.@_- (an IAM user name), 1 to 64")
            }
            guard !principals.contains(where: { $0.name == name }) else { throw ConfigurationError("\(path).name \(name) is given twice") }
            guard let ks = p["accessKeys"] as? [Any], !ks.isEmpty else { throw ConfigurationError("\(path).accessKeys must list at least one key") }
            for (j, k) in ks.enumerated() {
                let kp = "\(path).accessKeys[\(j)]"
                guard let k = k as? [String: Any] else { throw ConfigurationError("\(kp) must be a mapping") }
                for key in k.keys where !["accessKeyId", "secretAccessKey", "sessionToken"].contains(key) { throw ConfigurationError("\(kp).\(key) is not a field") }
                guard let id = k["accessKeyId"] as? String, (16...128).contains(id.utf8.count), id.utf8.allSatisfy({ SigV4Bytes.isAlphanumeric($0) }) else {
                    throw ConfigurationError("\(kp).accessKeyId must be 16 to 128 letters and digits")
                }
                guard let secret = k["secretAccessKey"] as? String, secret.utf8.count >= 16 else {
                    throw ConfigurationError("\(kp).secretAccessKey must be at least 16 characters")
                }
                let token = k["sessionToken"] as? String
                keys.append((name, AccessKey(id: id, secret: secret, sessionToken: token)))
            }
            principals.append(Principal(name: name, allow: try statements(p["allow"], "\(path).allow"), deny: try statements(p["deny"], "\(path).deny")))
        }
        return try Principals(principals: principals, keys: keys)
    }

    static func statements(_ value: Any?, _ path: String) throws(ConfigurationError) -> [Statement] {
        guard let value else { return [] }
        guard let list = value as? [Any] else { throw ConfigurationError("\(path) must be a list of {actions, resources}") }
        var out: [Statement] = []
        for (i, item) in list.enumerated() {
            guard let s = item as? [String: Any], s.count == 2, let actions = s["actions"] as? [String], let resources = s["resources"] as? [String],
                  !actions.isEmpty, !resources.isEmpty else {
                throw ConfigurationError("\(path)[\(i)] must be {actions: [...], resources: [...]}, both non-empty lists of strings")
            }
            for a in actions where !(a == "*" || a.lowercased().hasPrefix("bedrock-agentcore:")) {
                throw ConfigurationError("\(path)[\(i)].actions: \(a) is not a bedrock-agentcore action (bedrock-agentcore:NAME, wildcards allowed)")
            }
            out.append(Statement(actions: actions, resources: resources))
        }
        return out
    }

    static func isName(_ s: String) -> Bool {
        (1...64).contains(s.utf8.count) && s.utf8.allSatisfy { SigV4Bytes.isAlphanumeric($0) || "+=,.@_-".utf8.contains($0) }
    }
}

enum SigV4Bytes {
    static func isAlphanumeric(_ b: UInt8) -> Bool { (b >= 0x30 && b <= 0x39) || (b | 0x20 >= 0x61 && b | 0x20 <= 0x7A) }
}

/// IAM's `*` and `?`, iteratively with one backtrack point, so a hostile pattern cannot make it exponential.
/// Over the strings' own UTF-8 storage: it runs for every call, on the event loop.
public enum Wildcard {
    public static func matches(_ pattern: String, _ text: String, caseInsensitive: Bool = false) -> Bool {
        var pattern = pattern, text = text
        return pattern.withUTF8 { p in text.withUTF8 { t in matches(p, t, caseInsensitive) } }
    }

    static func matches(_ p: UnsafeBufferPointer<UInt8>, _ t: UnsafeBufferPointer<UInt8>, _ fold: Bool) -> Bool {
        func same(_ a: UInt8, _ b: UInt8) -> Bool {
            guard fold else { return a == b }
            func lower(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5A ? c | 0x20 : c }
            return lower(a) == lower(b)
        }
        var i = 0, j = 0, star = -1, mark = 0
        while j < t.count {
            if i < p.count, p[i] == UInt8(ascii: "*") {
                star = i; mark = j; i += 1
            } else if i < p.count, p[i] == UInt8(ascii: "?") || same(p[i], t[j]) {
                i += 1; j += 1
            } else if star >= 0 {
                i = star + 1; mark += 1; j = mark
            } else {
                return false
            }
        }
        while i < p.count, p[i] == UInt8(ascii: "*") { i += 1 }
        return i == p.count
    }
}
