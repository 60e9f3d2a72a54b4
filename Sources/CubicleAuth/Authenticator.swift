#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import Crypto
import Synchronization

/// Who made a request, once checked. Sessions are owned by `owner`: the same session id sent by another
/// owner is another session.
public struct Caller: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// No principals file: cubicled serves loopback only and everyone there is the same caller.
        case anonymous
        /// Signed with a principal's access key.
        case principal(Principals.Principal)
        /// A bearer token a runtime's JWT authorizer accepted.
        case token(issuer: String, subject: String)
    }

    public let owner: String
    public let kind: Kind

    public static let anonymous = Caller(owner: "anonymous", kind: .anonymous)

    public init(owner: String, kind: Kind) {
        self.owner = owner
        self.kind = kind
    }

    public var isToken: Bool { if case .token = kind { return true }; return false }
}

/// SigV4 verification against the principals file, and IAM-style permission checks. Without a file every
/// request is the anonymous caller (cubicled allows that only when it listens on loopback alone).
public final class Authenticator: Sendable {
    public let principals: Principals?
    public let region: String
    public let accountID: String
    /// The signing name both AgentCore services use.
    public static let service = "bedrock-agentcore"
    let now: @Sendable () -> Int

    public init(principals: Principals?, region: String, accountID: String, now: @escaping @Sendable () -> Int = { Int(time(nil)) }) {
        self.principals = principals
        self.region = region
        self.accountID = accountID
        self.now = now
    }

    public var requiresSignatures: Bool { principals != nil }

    /// The request as far as its head shows it: anonymous, or a signature to verify once the body's hash is
    /// known. Throws the 403s that need no body (no signature, unknown key, stale date...).
    /// - Parameters:
    ///   - authority: the Host header (HTTP/2's :authority).
    ///   - headers: every header, its name lowercased, in the order they came.
    public func begin(method: String, path: String, query: String, authority: String?,
                      headers: [(name: String, value: String)]) throws(AgentCoreError) -> PendingSignature? {
        guard let principals else { return nil }
        // One pass for the headers SigV4 itself reads.
        var authorizations: [String] = [], tokens: [String] = [], dates: [String] = [], declaredHashes: [String] = []
        for (name, value) in headers where name.utf8.first == UInt8(ascii: "a") || name.utf8.first == UInt8(ascii: "x") {
            switch name {
            case "authorization": authorizations.append(value)
            case "x-amz-date": dates.append(value)
            case "x-amz-security-token": tokens.append(value)
            case "x-amz-content-sha256": declaredHashes.append(value)
            default: break
            }
        }
        // A signature in the Authorization header, or in the query of a presigned URL (a WebSocket
        // client cannot always set headers on its upgrade).
        let auth: SigV4.Authorization, amzDate: String, signedQuery: String, presigned: SigV4.Presigned?
        if let header = authorizations.first {
            guard authorizations.count == 1 else { throw AgentCoreError(.incompleteSignature, "Only one Authorization header is allowed") }
            auth = try SigV4.parseAuthorization(header)
            presigned = nil
            signedQuery = query
            guard dates.count == 1, let date = dates.first else {
                throw AgentCoreError(.incompleteSignature, "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.")
            }
            amzDate = date
        } else if let p = try SigV4.parsePresigned(query: query) {
            auth = p.authorization
            presigned = p
            signedQuery = p.signedQuery
            amzDate = p.amzDate
            tokens += p.securityToken.map { [$0] } ?? []
        } else {
            throw AgentCoreError(.missingAuthenticationToken, "Missing Authentication Token")
        }
        guard let entry = principals.keys[auth.accessKeyID] else {
            throw AgentCoreError(.unrecognizedClient, "The security token included in the request is invalid.")
        }
        let principal = principals.principals[entry.principal], key = entry.key
        guard tokens.count <= 1, Self.sameToken(tokens.first, key.sessionToken) else {
            throw AgentCoreError(.unrecognizedClient, "The security token included in the request is invalid.")
        }
        guard let seconds = SigV4.parseDate(amzDate) else {
            throw AgentCoreError(.incompleteSignature, "X-Amz-Date must be in ISO8601 basic format: yyyyMMdd'T'HHmmss'Z'")
        }
        guard amzDate.hasPrefix(auth.date) else {
            throw AgentCoreError(.invalidSignature, "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '\(auth.date)' != '\(amzDate.prefix(8))', from '\(amzDate)'.")
        }
        guard auth.service == Self.service else {
            throw AgentCoreError(.invalidSignature, "Credential should be scoped to correct service: '\(Self.service)'. ")
        }
        guard auth.region == region else { throw AgentCoreError(.invalidSignature, "Credential should be scoped to a valid region. ") }
        let now = self.now()
        if let presigned {
            // A presigned URL is good from its date (give or take the usual skew) until it expires.
            if seconds + presigned.expires < now {
                throw AgentCoreError(.invalidSignature, "Signature expired: the presigned URL of \(amzDate) expired after \(presigned.expires) seconds, before \(SigV4.formatDate(now)).")
            }
        } else if seconds < now - SigV4.maxSkewSeconds {
            throw AgentCoreError(.invalidSignature, "Signature expired: \(amzDate) is now earlier than \(SigV4.formatDate(now - SigV4.maxSkewSeconds)) (\(SigV4.formatDate(now)) - 5 min.)")
        }
        if seconds > now + SigV4.maxSkewSeconds {
            throw AgentCoreError(.invalidSignature, "Signature not yet current: \(amzDate) is still later than \(SigV4.formatDate(now + SigV4.maxSkewSeconds)) (\(SigV4.formatDate(now)) + 5 min.)")
        }
        let signed = auth.signedHeaders
        var values = [[String]](repeating: [], count: signed.count)
        for (name, value) in headers {
            if let i = signed.firstIndex(of: name) { values[i].append(value) }
        }
        if let i = signed.firstIndex(of: "host"), let authority { values[i] = [authority] }
        let declared = declaredHashes.first
        if let declared, declared.utf8.count != 64 || SigV4.Hex.decode(declared) == nil {
            throw AgentCoreError(.invalidSignature, "x-amz-content-sha256 must be the payload's SHA-256 in hex: an unsigned payload is not accepted")
        }
        return PendingSignature(caller: Caller(owner: principal.name, kind: .principal(principal)), authorization: auth, amzDate: amzDate,
                                method: method, path: path, query: signedQuery, headerValues: values,
                                signingKey: signingKey(entry, auth), declaredPayloadHash: declared?.lowercased(), presigned: presigned != nil)
    }

    /// Session tokens compared in constant time; absent on both sides is a match.
    static func sameToken(_ given: String?, _ expected: String?) -> Bool {
        switch (given, expected) {
        case (nil, nil): return true
        case (let g?, let e?): return constantTimeEqual(Array(g.utf8), Array(e.utf8))
        default: return false
        }
    }

    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    /// The HMAC keyed with the signing key of `auth`'s scope, derived once per key and scope (each request
    /// copies the keyed state).
    private func signingKey(_ entry: Principals.KeyEntry, _ auth: SigV4.Authorization) -> SigningMAC {
        if let cached = entry.signing.withLock({ $0 }), cached.date == auth.date, cached.region == auth.region, cached.service == auth.service {
            return cached.mac
        }
        func hmac(_ key: SymmetricKey, _ text: String) -> SymmetricKey {
            SymmetricKey(data: Array(HMAC<SHA256>.authenticationCode(for: Array(text.utf8), using: key)))
        }
        let kDate = hmac(SymmetricKey(data: Array("AWS4\(entry.key.secret)".utf8)), auth.date)
        let derived = SigningMAC(key: hmac(hmac(hmac(kDate, auth.region), auth.service), "aws4_request"))
        entry.signing.withLock { $0 = (auth.date, auth.region, auth.service, derived) }
        return derived
    }

    // MARK: - Permissions

    /// The ARN a principal is named by in AccessDenied messages.
    public func userARN(_ name: String) -> String { "arn:aws:iam::\(accountID):user/\(name)" }

    /// A runtime's ARN: the resource of every call on it.
    public func runtimeARN(_ id: String) -> String { "arn:aws:bedrock-agentcore:\(region):\(accountID):runtime/\(id)" }

    /// Refuses `action` on `resource` unless the caller's policy allows it. Anonymous callers may do anything
    /// (loopback only); a bearer token's caller only what its runtime's authorizer admits it to.
    public func authorize(_ caller: Caller, _ action: String, _ resource: String) throws(AgentCoreError) {
        switch caller.kind {
        case .anonymous: return
        case .token:
            guard Self.tokenActions.contains(action) else {
                throw AgentCoreError(.accessDenied, "A bearer token authorizes \(Self.tokenActions.sorted().joined(separator: ", ")) only, not \(action)")
            }
        case .principal(let p):
            if p.deny.contains(where: { $0.matches(action: action, resource: resource) }) {
                throw AgentCoreError(.accessDenied, "User: \(userARN(p.name)) is not authorized to perform: \(action) on resource: \(resource) with an explicit deny in an identity-based policy")
            }
            guard Principals.allows(p, action: action, resource: resource) else {
                throw AgentCoreError(.accessDenied, "User: \(userARN(p.name)) is not authorized to perform: \(action) on resource: \(resource) because no identity-based policy allows the \(action) action")
            }
        }
    }

    /// Whether `authorize` would pass, for the warm road that hands refusals to the task road to answer.
    public func allows(_ caller: Caller, _ action: String, _ resource: String) -> Bool {
        (try? authorize(caller, action, resource)) != nil
    }

    /// What a runtime's JWT authorizer admits a token's bearer to: its own sessions on that runtime.
    static let tokenActions: Set<String> = ["bedrock-agentcore:InvokeAgentRuntime", "bedrock-agentcore:StopRuntimeSession",
                                            "bedrock-agentcore:InvokeAgentRuntimeCommand", "bedrock-agentcore:GetAgentCard",
                                            "bedrock-agentcore:InvokeAgentRuntimeWithWebSocketStream",
                                            "bedrock-agentcore:InvokeAgentRuntimeCommandShell"]
}

/// A signature checked as far as the head allows; `verify` finishes it with the payload's hash.
public struct PendingSignature: Sendable {
    public let caller: Caller
    let authorization: SigV4.Authorization
    let amzDate: String
    let method: String, path: String, query: String
    let headerValues: [[String]]
    let signingKey: SigningMAC
    /// What x-amz-content-sha256 declared, if sent: the body must hash to it as well.
    public let declaredPayloadHash: String?
    /// Signed in the query: the payload may also have been signed as `UNSIGNED-PAYLOAD` (S3's presigning
    /// rule, which some clients apply everywhere); presigned URLs are for requests without a body.
    let presigned: Bool

    /// Checks the signature over the request with the body's SHA-256 (lowercase hex).
    public func verify(payloadHash: String) throws(AgentCoreError) -> Caller {
        if let declaredPayloadHash, declaredPayloadHash != payloadHash {
            throw AgentCoreError(.invalidSignature, "The provided 'x-amz-content-sha256' header does not match what was computed.")
        }
        if presigned, payloadHash == PayloadHash.empty, declaredPayloadHash == nil, (try? check(payloadHash: "UNSIGNED-PAYLOAD")) != nil {
            return caller
        }
        try check(payloadHash: declaredPayloadHash ?? payloadHash)
        return caller
    }

    private func check(payloadHash: String) throws(AgentCoreError) {
        let names = authorization.signedHeaders
        let canonical = SigV4.canonicalRequest(method: method, path: path, query: query, signedHeaders: names,
                                               values: { name in names.firstIndex(of: name).map { headerValues[$0] } ?? [] },
                                               payloadHash: payloadHash)
        var toSign: [UInt8] = []
        toSign.reserveCapacity(200)
        toSign += SigV4.algorithm.utf8
        toSign.append(0x0A)
        toSign += amzDate.utf8
        toSign.append(0x0A)
        for part in [authorization.date, authorization.region, authorization.service] {
            toSign += part.utf8
            toSign.append(UInt8(ascii: "/"))
        }
        toSign += "aws4_request\n".utf8
        SHA256.hash(data: canonical).withUnsafeBytes { SigV4.Hex.append($0, to: &toSign) }
        guard Authenticator.constantTimeEqual(signingKey.code(toSign), authorization.signature) else {
            throw AgentCoreError(.invalidSignature, "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.")
        }
    }
}

/// HMAC-SHA256 under one signing key, its keyed inner and outer states made once: HMAC(K, m) is
/// SHA-256((K ^ opad) || SHA-256((K ^ ipad) || m)) (RFC 2104). swift-crypto's `HMAC.update` is generic over
/// DataProtocol and not inlinable, so every request paid for the unspecialized path; SHA-256 itself is
/// swift-crypto's, over raw buffers. `SigV4Tests` checks it against botocore's signature.
struct SigningMAC: Sendable {
    private let inner: SHA256
    private let outer: SHA256

    init(key: SymmetricKey) {
        // The signing key is an HMAC output, 32 bytes: shorter than the block, so it is used as it is.
        var block = [UInt8](repeating: 0, count: 64)
        key.withUnsafeBytes { k in for (i, b) in k.enumerated() { block[i] = b } }
        var inner = SHA256(), outer = SHA256()
        inner.update(data: block.map { $0 ^ 0x36 })
        outer.update(data: block.map { $0 ^ 0x5C })
        self.inner = inner
        self.outer = outer
    }

    func code(_ message: [UInt8]) -> [UInt8] {
        var i = inner
        message.withUnsafeBytes { i.update(bufferPointer: $0) }
        var o = outer
        i.finalize().withUnsafeBytes { o.update(bufferPointer: $0) }
        return o.finalize().withUnsafeBytes { Array($0) }
    }
}

/// SHA-256 of a body as it streams by.
public struct PayloadHash: Sendable {
    private var hasher = SHA256()
    public init() {}
    public mutating func update(_ bytes: [UInt8]) { hasher.update(data: bytes) }
    public mutating func update(bufferPointer: UnsafeRawBufferPointer) { hasher.update(bufferPointer: bufferPointer) }
    public func finish() -> String { hasher.finalize().withUnsafeBytes { SigV4.Hex.encode($0) } }
    public static let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
}
