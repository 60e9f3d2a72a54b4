#if canImport(Glibc)
import Glibc
#endif
import AsyncHTTPClient
import CubicleAgentCore
import CubicleJSON
import Foundation
import JWTKit
import Logging
import NIOCore
import Synchronization

/// Checks bearer tokens for runtimes with a `customJWTAuthorizer`: the issuer's OIDC discovery document and
/// JWKS are fetched once and cached per discovery URL, and fetched again when a token names a key id the
/// cache does not have (a rotated key), at most once a second. Signatures are jwt-kit's; which algorithms
/// and keys are acceptable at all is decided here first: asymmetric only, the key's type and declared
/// algorithm must agree with the token's, and `none` or HMAC never pass whatever the token's header says.
public final class JWTVerifier: Sendable {
    /// The algorithms a token may use. No `none`; no HS*, whose key would be the issuer's public key.
    public static let allowedAlgorithms: Set<String> = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
    /// Clock skew forgiven on `exp` and `nbf`.
    public static let leewaySeconds = 30
    static let refetchEverySeconds = 3600
    static let maxDocumentBytes = 256 << 10

    private let issuers = Mutex<[String: Issuer]>([:])
    /// Made on first use (most daemons have no JWT runtime); its owner must shut it down (`shutdown`).
    private let client = Mutex<HTTPClient?>(nil)
    private let shutDown = Mutex(false)
    let logger: Logger
    let now: @Sendable () -> Int

    public init(logger: Logger, now: @escaping @Sendable () -> Int = { Int(time(nil)) }) {
        self.logger = logger
        self.now = now
    }

    var http: HTTPClient? {
        client.withLock { client in
            if let client { return client }
            guard !shutDown.withLock({ $0 }) else { return nil }
            var config = HTTPClient.Configuration()
            config.redirectConfiguration = .disallow
            config.timeout = .init(connect: .seconds(5), read: .seconds(10))
            client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: config)
            return client
        }
    }

    /// Ends the HTTP client, if one was made; no fetch is made after.
    public func shutdown() async {
        shutDown.withLock { $0 = true }
        if let http = client.withLock({ $0 }) { try? await http.shutdown() }
    }

    /// The caller a token stands for, or AccessDeniedException saying why not.
    public func verify(_ token: String, for config: JWTAuthorizerConfiguration) async throws(AgentCoreError) -> Caller {
        let issuer = issuers.withLock { issuers in
            if let i = issuers[config.discoveryURL] { return i }
            let i = Issuer(discoveryURL: config.discoveryURL, verifier: self)
            issuers[config.discoveryURL] = i
            return i
        }
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard token.utf8.count <= 16384, parts.count == 3,
              let headerBytes = Base64URL.decode(parts[0]), let header = try? JSON.parse(headerBytes), let alg = header["alg"]?.stringValue else {
            throw denied("the bearer token is not a signed JWT")
        }
        guard Self.allowedAlgorithms.contains(alg) else { throw denied("the token's algorithm \(alg.prefix(16)) is not accepted") }
        let kid = header["kid"]?.stringValue
        let claims: TokenClaims
        do {
            let keys = try await issuer.keys(for: kid, alg: alg)
            claims = try await keys.verify(token, as: TokenClaims.self)
        } catch let e as AgentCoreError {
            throw e
        } catch {
            throw denied("the token's signature does not verify")
        }
        let expectedIssuer = try await issuer.issuerName()
        return try check(claims.values, config: config, issuer: expectedIssuer)
    }

    func check(_ c: [String: TokenClaims.Value], config: JWTAuthorizerConfiguration, issuer: String) throws(AgentCoreError) -> Caller {
        let now = self.now()
        guard case .number(let exp)? = c["exp"] else { throw denied("the token has no exp claim") }
        guard Double(now - Self.leewaySeconds) < exp else { throw denied("the token has expired") }
        if case .number(let nbf)? = c["nbf"], Double(now + Self.leewaySeconds) < nbf { throw denied("the token is not valid yet (nbf)") }
        guard case .string(let iss)? = c["iss"], iss == issuer else { throw denied("the token's issuer is not the discovery document's") }
        guard case .string(let sub)? = c["sub"], !sub.isEmpty else { throw denied("the token has no sub claim") }
        if !config.allowedAudience.isEmpty {
            guard c["aud"]?.strings.contains(where: config.allowedAudience.contains) == true else { throw denied("the token's audience is not allowed") }
        }
        if !config.allowedClients.isEmpty {
            let client = c["client_id"]?.strings.first ?? c["azp"]?.strings.first
            guard let client, config.allowedClients.contains(client) else { throw denied("the token's client is not allowed") }
        }
        if !config.allowedScopes.isEmpty {
            let scopes = (c["scope"]?.strings.first ?? "").split(separator: " ").map(String.init) + (c["scp"]?.strings ?? [])
            guard scopes.contains(where: config.allowedScopes.contains) else { throw denied("the token has none of the allowed scopes") }
        }
        for claim in config.customClaims {
            let value = c[claim.name]
            let ok: Bool
            switch (claim.valueType, claim.matchOperator) {
            case (.string, _):
                if case .string(let s)? = value { ok = s == claim.values[0] } else { ok = false }
            case (.stringArray, .containsAny):
                if case .array? = value { ok = value!.strings.contains(where: claim.values.contains) } else { ok = false }
            case (.stringArray, _):
                if case .array? = value { ok = value!.strings.contains(claim.values[0]) } else { ok = false }
            }
            guard ok else { throw denied("the token's \(claim.name) claim does not match") }
        }
        return Caller(owner: "jwt:\(iss)#\(sub)", kind: .token(issuer: iss, subject: sub))
    }

    func denied(_ why: String) -> AgentCoreError {
        AgentCoreError(.accessDenied, "OAuth authorization failed: \(why)")
    }

    /// GETs a document of at most `maxDocumentBytes`: https, or plain http to this host's loopback only.
    func fetch(_ url: String) async throws(AgentCoreError) -> JSON {
        guard let parsed = URL(string: url), let host = parsed.host, parsed.scheme == "https" || (parsed.scheme == "http" && Self.isLoopback(host)) else {
            throw AgentCoreError(.accessDenied, "OAuth authorization failed: \(url.prefix(200)) must be https (plain http only to loopback)")
        }
        guard let http else { throw denied("cubicled is shutting down") }
        do {
            let response = try await http.execute(HTTPClientRequest(url: url), timeout: .seconds(10))
            guard response.status == .ok else { throw denied("\(url.prefix(200)) answered \(response.status.code)") }
            let body = try await response.body.collect(upTo: Self.maxDocumentBytes)
            return try JSON.parse(Array(body.readableBytesView))
        } catch let e as AgentCoreError {
            throw e
        } catch {
            logger.warning("JWT authorizer fetch failed", metadata: ["url": "\(url)", "error": "\(error)"])
            throw denied("could not fetch \(url.prefix(200))")
        }
    }

    static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host == "[::1]" || host.hasPrefix("127.")
    }
}

/// One issuer's discovery document and keys.
actor Issuer {
    let discoveryURL: String
    unowned let verifier: JWTVerifier
    private var issuer: String?
    private var jwksURI: String?
    /// Key id → (key type, declared algorithm, a collection holding that key alone).
    private var keys: [String: (kty: String, alg: String?, collection: JWTKeyCollection)] = [:]
    private var fetchedAt = Int.min / 2
    private var fetching: Task<Void, any Error>?

    init(discoveryURL: String, verifier: JWTVerifier) {
        self.discoveryURL = discoveryURL
        self.verifier = verifier
    }

    func issuerName() async throws(AgentCoreError) -> String {
        if issuer == nil { try await refresh() }
        guard let issuer else { throw verifier.denied("the discovery document names no issuer") }
        return issuer
    }

    /// The collection for the token's key; refetched once when the key is unknown (rotation).
    func keys(for kid: String?, alg: String) async throws(AgentCoreError) -> JWTKeyCollection {
        let now = verifier.now()
        if now - fetchedAt >= JWTVerifier.refetchEverySeconds { try await refresh() }
        if find(kid) == nil, now - fetchedAt >= 1 { try await refresh() }
        guard let key = find(kid) else { throw verifier.denied("no key of the issuer matches the token's kid") }
        let family = alg.prefix(2)
        guard (family == "RS" || family == "PS") ? key.kty == "RSA" : key.kty == "EC" else {
            throw verifier.denied("the token's algorithm \(alg) does not fit its key's type \(key.kty)")
        }
        if let declared = key.alg, declared != alg { throw verifier.denied("the token's algorithm \(alg) is not its key's (\(declared))") }
        return key.collection
    }

    private func find(_ kid: String?) -> (kty: String, alg: String?, collection: JWTKeyCollection)? {
        if let kid { return keys[kid] }
        return keys.count == 1 ? keys.first!.value : nil
    }

    /// Discovery, then the JWKS; concurrent callers share one fetch.
    private func refresh() async throws(AgentCoreError) {
        if let fetching {
            do { try await fetching.value } catch { throw (error as? AgentCoreError) ?? verifier.denied("could not fetch the issuer's keys") }
            return
        }
        let task = Task { try await self.load() }
        fetching = task
        defer { fetching = nil }
        do { try await task.value } catch { throw (error as? AgentCoreError) ?? verifier.denied("could not fetch the issuer's keys") }
    }

    private func load() async throws(AgentCoreError) {
        fetchedAt = verifier.now()
        let discovery = try await verifier.fetch(discoveryURL)
        guard let iss = discovery["issuer"]?.stringValue, let uri = discovery["jwks_uri"]?.stringValue else {
            throw verifier.denied("the discovery document lacks issuer or jwks_uri")
        }
        let jwks = try await verifier.fetch(uri)
        guard let list = jwks["keys"]?.arrayValue else { throw verifier.denied("the JWKS has no keys") }
        var loaded: [String: (kty: String, alg: String?, collection: JWTKeyCollection)] = [:]
        for (i, key) in list.prefix(100).enumerated() {
            // Symmetric (oct) and unknown key types are skipped: only public keys can verify here.
            guard let kty = key["kty"]?.stringValue, kty == "RSA" || kty == "EC" else { continue }
            if let use = key["use"]?.stringValue, use != "sig" { continue }
            let kid = key["kid"]?.stringValue ?? "#\(i)"
            var withKid = key.objectValue ?? [:]
            withKid["kid"] = .string(kid)
            let collection = JWTKeyCollection()
            do {
                _ = try await collection.add(jwksJSON: String(decoding: JSON.object(["keys": .array([.object(withKid)])]).serialized(), as: UTF8.self))
            } catch { continue }
            loaded[kid] = (kty, key["alg"]?.stringValue, collection)
        }
        issuer = iss
        jwksURI = uri
        keys = loaded
    }
}

/// Every claim, whatever its name: the authorizer's checks are configured at run time.
struct TokenClaims: JWTPayload {
    enum Value: Codable, Sendable {
        case string(String), number(Double), bool(Bool), array([Value]), other

        init(from decoder: any Decoder) throws {
            let c = try decoder.singleValueContainer()
            if let s = try? c.decode(String.self) { self = .string(s) }
            else if let b = try? c.decode(Bool.self) { self = .bool(b) }
            else if let n = try? c.decode(Double.self) { self = .number(n) }
            else if let a = try? c.decode([Value].self) { self = .array(a) }
            else { self = .other }
        }

        func encode(to encoder: any Encoder) throws {}

        /// A string claim as one, an array's strings.
        var strings: [String] {
            switch self {
            case .string(let s): [s]
            case .array(let a): a.compactMap { if case .string(let s) = $0 { s } else { nil } }
            default: []
            }
        }
    }

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    var values: [String: Value] = [:]

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Key.self)
        for key in c.allKeys.prefix(256) { values[key.stringValue] = (try? c.decode(Value.self, forKey: key)) ?? .other }
    }

    func encode(to encoder: any Encoder) throws {}

    /// The checks are `JWTVerifier.check`'s, which needs the authorizer's configuration.
    func verify(using algorithm: some JWTAlgorithm) async throws {}
}

/// base64url, padded or not (JWT segments; the WebSocket bearer subprotocol).
public enum Base64URL {
    public static func decode<S: StringProtocol>(_ text: S) -> [UInt8]? {
        var s = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while s.utf8.count % 4 != 0 { s += "=" }
        return Data(base64Encoded: s).map { Array($0) }
    }
}
