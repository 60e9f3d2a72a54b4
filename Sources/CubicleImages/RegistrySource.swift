#if canImport(Glibc)
import Glibc
#endif
import AsyncHTTPClient
import CubicleAgentCore
import struct Foundation.Data
import CubicleJSON
import CubicleLinux
import NIOCore
import NIOHTTP1
import Synchronization

/// How cubicled may talk to one registry (`registries:` in the config, or a Docker config.json).
public struct RegistryAccess: Sendable, Equatable {
    public var host: String
    /// Plain HTTP: only where the operator says so for this host.
    public var insecure = false
    public var username: String?
    public var password: String?

    public init(host: String, insecure: Bool = false, username: String? = nil, password: String? = nil) {
        self.host = host
        self.insecure = insecure
        self.username = username
        self.password = password
    }

    /// Credentials from a Docker config.json's `auths` (base64 `user:password`), for hosts the config names.
    public static func dockerConfig(_ text: String) -> [RegistryAccess] {
        guard let json = try? JSON.parse(text), let auths = json["auths"]?.objectValue else { return [] }
        return auths.compactMap { host, entry in
            guard let encoded = entry["auth"]?.stringValue, let decoded = Base64.decode(encoded),
                  let colon = decoded.firstIndex(of: UInt8(ascii: ":")) else { return nil }
            let h = host.replacingPrefix("https://", "").replacingPrefix("http://", "").split(separator: "/").first.map(String.init) ?? host
            return RegistryAccess(host: h, username: String(decoding: decoded[..<colon], as: UTF8.self),
                                  password: String(decoding: decoded[(colon + 1)...], as: UTF8.self))
        }
    }
}

/// A registry, through the OCI distribution API: manifests and blobs, with the token dance a registry asks
/// for (a 401 naming a Bearer realm: a token from there, with the credentials if any, then the request
/// again) or Basic credentials. HTTPS unless the host is configured insecure.
public final class RegistrySource: ImageSource {
    public let reference: ImageReference
    public let access: RegistryAccess
    let client: HTTPClient
    private let token = Mutex<String?>(nil)

    public struct Failure: Error, CustomStringConvertible, Sendable, Equatable {
        public var message: String
        public var description: String { message }
    }

    public init(reference: ImageReference, access: RegistryAccess?, client: HTTPClient) {
        self.reference = reference
        self.access = access ?? RegistryAccess(host: reference.registry)
        self.client = client
    }

    var base: String {
        let host = reference.registry == "docker.io" ? "registry-1.docker.io" : reference.registry
        return (access.insecure ? "http://" : "https://") + host
    }

    public func manifest(_ ref: String) async throws -> (bytes: [UInt8], mediaType: String?, digest: Digest?) {
        let response = try await get("/v2/\(reference.repository)/manifests/\(ref)", accept: OCI.acceptedManifests)
        guard response.status == .ok else {
            throw Failure(message: response.status == .notFound
                ? "\(reference.registry)/\(reference.repository):\(ref) not found in the registry"
                : "\(reference.registry) answered \(response.status.code) for the manifest of \(reference.repository):\(ref)")
        }
        var body = try await response.body.collect(upTo: OCI.maxDocumentBytes)
        let bytes = body.readBytes(length: body.readableBytes) ?? []
        let type = response.headers.first(name: "Content-Type").map { String($0.split(separator: ";")[0]) }
        let claimed = response.headers.first(name: "Docker-Content-Digest").flatMap { try? Digest($0) }
        return (bytes, type, claimed)
    }

    public func fetchBlob(_ digest: Digest, size: Int64, to path: String) async throws {
        let response = try await get("/v2/\(reference.repository)/blobs/\(digest)", accept: "*/*")
        guard response.status == .ok else {
            throw Failure(message: "\(reference.registry) answered \(response.status.code) for blob \(digest) of \(reference.repository)")
        }
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError.lastError("create \(path)") }
        defer { close(fd) }
        var written: Int64 = 0
        for try await chunk in response.body {
            written += Int64(chunk.readableBytes)
            // More than the descriptor promised: stop reading at once (the store refuses it anyway).
            guard written <= size else { throw Failure(message: "blob \(digest) is larger than its descriptor's \(size) bytes") }
            try chunk.withUnsafeReadableBytes { raw throws in
                var done = 0
                while done < raw.count {
                    let n = write(fd, raw.baseAddress! + done, raw.count - done)
                    if n < 0 { if errno == EINTR { continue }; throw SystemError.lastError("write \(path)") }
                    done += n
                }
            }
        }
    }

    /// A GET, authenticated as the registry asks: once as is (or with the token already held), then, on a
    /// 401, with a token from its realm or with Basic credentials.
    private func get(_ path: String, accept: String) async throws -> HTTPClientResponse {
        var request = HTTPClientRequest(url: base + path)
        request.headers.add(name: "Accept", value: accept)
        if let t = token.withLock({ $0 }) { request.headers.add(name: "Authorization", value: t) }
        let first = try await client.execute(request, timeout: .seconds(300))
        guard first.status == .unauthorized, let challenge = first.headers.first(name: "WWW-Authenticate") else { return first }
        _ = try? await first.body.collect(upTo: 1 << 16)
        let authorization = try await authorize(challenge)
        token.withLock { $0 = authorization }
        request.headers.replaceOrAdd(name: "Authorization", value: authorization)
        return try await client.execute(request, timeout: .seconds(300))
    }

    private var basic: String? {
        guard let u = access.username, let p = access.password else { return nil }
        return "Basic " + Base64.encode(Array("\(u):\(p)".utf8))
    }

    private func authorize(_ challenge: String) async throws -> String {
        let (scheme, params) = Self.parseChallenge(challenge)
        if scheme == "basic" {
            guard let basic else { throw Failure(message: "\(reference.registry) wants credentials and none are configured for it") }
            return basic
        }
        guard scheme == "bearer", let realm = params["realm"], realm.hasPrefix("https://") || (access.insecure && realm.hasPrefix("http://")) else {
            throw Failure(message: "\(reference.registry) asks for an authentication cubicled does not speak: \(challenge)")
        }
        var url = realm + (realm.contains("?") ? "&" : "?")
        url += "scope=" + PercentEncoding.encode(params["scope"] ?? "repository:\(reference.repository):pull")
        if let service = params["service"] { url += "&service=" + PercentEncoding.encode(service) }
        var request = HTTPClientRequest(url: url)
        if let basic { request.headers.add(name: "Authorization", value: basic) }
        let response = try await client.execute(request, timeout: .seconds(60))
        guard response.status == .ok else { throw Failure(message: "the token service of \(reference.registry) answered \(response.status.code)") }
        var body = try await response.body.collect(upTo: 1 << 20)
        guard let json = try? JSON.parse(body.readBytes(length: body.readableBytes) ?? []),
              let t = json["token"]?.stringValue ?? json["access_token"]?.stringValue, !t.isEmpty else {
            throw Failure(message: "the token service of \(reference.registry) sent no token")
        }
        return "Bearer " + t
    }

    /// `Bearer realm="…",service="…",scope="…"` -> ("bearer", [realm, service, scope]).
    static func parseChallenge(_ header: String) -> (String, [String: String]) {
        let trimmed = header.drop { $0 == " " }
        let scheme = trimmed.prefix { $0 != " " }.lowercased()
        var params: [String: String] = [:]
        var rest = trimmed.dropFirst(scheme.count)
        while let eq = rest.firstIndex(of: "=") {
            let key = rest[..<eq].filter { $0 != " " && $0 != "," }.lowercased()
            rest = rest[rest.index(after: eq)...]
            var value = ""
            if rest.first == "\"" {
                rest = rest.dropFirst()
                guard let close = rest.firstIndex(of: "\"") else { break }
                value = String(rest[..<close])
                rest = rest[rest.index(after: close)...]
            } else {
                let end = rest.firstIndex(of: ",") ?? rest.endIndex
                value = String(rest[..<end])
                rest = rest[end...]
            }
            params[key] = value
        }
        return (scheme, params)
    }
}

extension String {
    func replacingPrefix(_ prefix: String, _ with: String) -> String { hasPrefix(prefix) ? with + dropFirst(prefix.count) : self }
}


/// Base64 for Basic credentials and config.json's `auth`, through Foundation's.
enum Base64 {
    static func encode(_ bytes: [UInt8]) -> String { Data(bytes).base64EncodedString() }
    static func decode(_ text: String) -> [UInt8]? { Data(base64Encoded: text).map { Array($0) } }
}
