#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux

/// Where a role's credentials come from: a profile in an AWS shared-credentials file that only root can
/// read (`roleCredentials` in the config). Read on every request, so rotating the file takes effect at once.
public struct RoleCredentialSource: Sendable, Equatable {
    public var roleArn: String
    public var profile: String
    public var sharedCredentialsFile: String

    public init(roleArn: String, profile: String, sharedCredentialsFile: String) {
        self.roleArn = roleArn
        self.profile = profile
        self.sharedCredentialsFile = sharedCredentialsFile
    }

    /// The role's name, as the metadata endpoint lists it: the ARN's last path segment.
    public var roleName: String { String(roleArn.split(separator: "/").last ?? "role") }

    public struct Credentials: Sendable, Equatable {
        public var accessKeyId: String
        public var secretAccessKey: String
        public var sessionToken: String?
    }

    public enum Failure: Error, Equatable, CustomStringConvertible, Sendable {
        case unreadable(String)
        case readableByOthers(String)
        case noProfile(String, String)
        case incomplete(String, String)

        public var description: String {
            switch self {
            case .unreadable(let why): return why
            case .readableByOthers(let path): return "\(path) can be read by users other than root: it holds secret keys (chmod 600, chown root)"
            case .noProfile(let path, let p): return "\(path) has no profile [\(p)]"
            case .incomplete(let path, let p): return "profile [\(p)] in \(path) has no aws_access_key_id and aws_secret_access_key (a role_arn profile needs STS, which cubicled does not call)"
            }
        }
    }

    /// The file must belong to root and be closed to everyone else: it holds secret keys.
    public func check() throws(Failure) {
        var st = stat()
        guard stat(sharedCredentialsFile, &st) == 0 else { throw .unreadable("cannot stat \(sharedCredentialsFile): errno \(errno)") }
        guard st.st_uid == 0, st.st_mode & 0o077 == 0 else { throw .readableByOthers(sharedCredentialsFile) }
        _ = try load()
    }

    public func load() throws(Failure) -> Credentials {
        let text: String
        do { text = try Files.read(sharedCredentialsFile, limit: 1 << 20) } catch { throw .unreadable("cannot read \(sharedCredentialsFile): \(error)") }
        guard let section = Self.parse(text)[profile] else { throw .noProfile(sharedCredentialsFile, profile) }
        guard let id = section["aws_access_key_id"], let secret = section["aws_secret_access_key"], !id.isEmpty, !secret.isEmpty else {
            throw .incomplete(sharedCredentialsFile, profile)
        }
        return Credentials(accessKeyId: id, secretAccessKey: secret, sessionToken: section["aws_session_token"])
    }

    /// The INI dialect of ~/.aws/credentials: `[profile]` sections of `key = value` lines, `#`/`;` comments.
    static func parse(_ text: String) -> [String: [String: String]] {
        var out: [String: [String: String]] = [:]
        var current: String?
        for raw in text.split(whereSeparator: \.isNewline) {
            let line = raw.trimmingSpaces
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                current = String(line.dropFirst().dropLast()).trimmingSpaces
                out[current!, default: [:]] = out[current!] ?? [:]
                continue
            }
            guard let section = current, let eq = line.firstIndex(of: "=") else { continue }
            out[section]![String(line[..<eq]).trimmingSpaces.lowercased()] = String(line[line.index(after: eq)...]).trimmingSpaces
        }
        return out
    }
}
