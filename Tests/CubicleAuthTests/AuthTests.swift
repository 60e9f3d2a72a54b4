import CubicleAgentCore
import CubicleAuth
import CubicleJSON
import Crypto
import Logging
import Testing

/// A request botocore 1.43 signed (SigV4Auth.add_auth at 2026-12-05T12:00:00Z): the verifier must reach
/// the same signature from the same bytes, and refuse every change to what was signed.
struct SigV4Tests {
    static let path = "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A000000000000%3Aruntime%2Fdemo/invocations"
    static let query = "qualifier=DEFAULT&accountId=000000000000"
    static let body = Array(#"{"prompt":"hi"}"#.utf8)
    static let authorization = "AWS4-HMAC-SHA256 Credential=AKIAALICE00000000001/20261205/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amzn-bedrock-agentcore-runtime-session-id, Signature=58bd8c5bfa0588422cbc4f28db3843a04e6989344a8a4729ff6e670b4f7bb566"
    static let signedAt = 1_796_472_000 // 2026-12-05T12:00:00Z

    static func principals() throws -> Principals {
        try Principals.parse(yaml: """
            principals:
              - name: alice
                accessKeys: [{accessKeyId: AKIAALICE00000000001, secretAccessKey: alicesecretalicesecret0000}]
                allow: [{actions: ["bedrock-agentcore:Invoke*"], resources: ["arn:aws:bedrock-agentcore:*:*:runtime/demo"]}]
                deny: [{actions: ["bedrock-agentcore:InvokeAgentRuntimeCommand"], resources: ["*"]}]
            """)
    }

    static func headers(_ extra: [(String, String)] = [], drop: String? = nil) -> [(name: String, value: String)] {
        var all: [(String, String)] = [("authorization", authorization), ("content-type", "application/json"), ("x-amz-date", "20261205T120000Z"),
                                       ("x-amzn-bedrock-agentcore-runtime-session-id", String(repeating: "s", count: 40)), ("x-amzn-trace-id", "Root=1")]
        all.removeAll { $0.0 == drop }
        all += extra
        return all.map { (name: $0.0, value: $0.1) }
    }

    func verify(now: Int = signedAt, path: String = path, query: String = query, authority: String = "127.0.0.1:8080",
                headers: [(name: String, value: String)] = headers(), body: [UInt8] = body) throws -> Caller {
        let auth = Authenticator(principals: try Self.principals(), region: "us-east-1", accountID: "000000000000", now: { now })
        let pending = try #require(try auth.begin(method: "POST", path: path, query: query, authority: authority, headers: headers))
        var hash = PayloadHash()
        hash.update(body)
        return try pending.verify(payloadHash: hash.finish())
    }

    func refusal(_ kind: AgentCoreError.Kind, _ body: () throws -> Caller) {
        #expect(throws: AgentCoreError.self) { _ = try body() }
        do { _ = try body() } catch let e as AgentCoreError { #expect(e.kind == kind, "\(e)") } catch { Issue.record("\(error)") }
    }

    @Test func botocoreSignatureVerifies() throws {
        let caller = try verify()
        #expect(caller.owner == "alice")
        // Headers botocore leaves unsigned may change or be added (a proxy's trace id), and the query's order.
        _ = try verify(headers: Self.headers([("x-forwarded-for", "10.0.0.1")]))
        _ = try verify(query: "accountId=000000000000&qualifier=DEFAULT")
        _ = try verify(now: Self.signedAt + 299)
    }

    @Test func changesToWhatWasSignedAreRefused() throws {
        refusal(.invalidSignature) { try verify(body: Array(#"{"prompt":"ho"}"#.utf8)) }
        refusal(.invalidSignature) { try verify(path: Self.path.replacingOccurrences(of: "invocations", with: "commands")) }
        refusal(.invalidSignature) { try verify(query: "qualifier=v2&accountId=000000000000") }
        refusal(.invalidSignature) { try verify(authority: "127.0.0.1:9090") }
        refusal(.invalidSignature) { try verify(headers: Self.headers([("x-amzn-bedrock-agentcore-runtime-session-id", "t")])) } // a duplicate of a signed header
        refusal(.invalidSignature) { try verify(headers: Self.headers([("content-type", "text/plain")], drop: "content-type")) }
    }

    @Test func datesOutsideFiveMinutesAreRefused() {
        refusal(.invalidSignature) { try verify(now: Self.signedAt + 301) }
        refusal(.invalidSignature) { try verify(now: Self.signedAt - 301) }
    }

    @Test func credentialsAreChecked() {
        refusal(.missingAuthenticationToken) { try verify(headers: Self.headers(drop: "authorization")) }
        let unknown = Self.authorization.replacingOccurrences(of: "AKIAALICE00000000001", with: "AKIAMALLORY000000001")
        refusal(.unrecognizedClient) { try verify(headers: Self.headers([("authorization", unknown)], drop: "authorization")) }
        refusal(.unrecognizedClient) { try verify(headers: Self.headers([("x-amz-security-token", "forged")])) }
        let otherRegion = Self.authorization.replacingOccurrences(of: "us-east-1", with: "eu-west-1")
        refusal(.invalidSignature) { try verify(headers: Self.headers([("authorization", otherRegion)], drop: "authorization")) }
        refusal(.incompleteSignature) { try verify(headers: Self.headers(drop: "x-amz-date")) }
    }

    /// A URL botocore presigned (SigV4QueryAuth, 300 s, at 2026-12-05T15:28:23Z): a WebSocket client's way.
    static let presignedPath = "/runtimes/arn%3Aaws%3Abedrock-agentcore%3Aus-east-1%3A000000000000%3Aruntime%2Fdemo/ws"
    static let presignedQuery = "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id=ssssssssssssssssssssssssssssssssssssssss&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAALICE00000000001%2F20261205%2Fus-east-1%2Fbedrock-agentcore%2Faws4_request&X-Amz-Date=20261205T152823Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=d04b79974ec4a96ccc8ec935a1bbd1c721cc528c5e6501845e2a885d1fb31d71"
    static let presignedAt = 1_796_484_503

    func verifyPresigned(now: Int = presignedAt, query: String = presignedQuery, authority: String = "127.0.0.1:8080") throws -> Caller {
        let auth = Authenticator(principals: try Self.principals(), region: "us-east-1", accountID: "000000000000", now: { now })
        let pending = try #require(try auth.begin(method: "GET", path: Self.presignedPath, query: query, authority: authority,
                                                  headers: [(name: "host", value: authority)]))
        return try pending.verify(payloadHash: PayloadHash.empty)
    }

    @Test func aBotocorePresignedURLVerifiesUntilItExpires() throws {
        #expect(try verifyPresigned().owner == "alice")
        _ = try verifyPresigned(now: Self.presignedAt + 300)
        refusal(.invalidSignature) { try verifyPresigned(now: Self.presignedAt + 301) }
        refusal(.invalidSignature) { try verifyPresigned(now: Self.presignedAt - 301) }
        refusal(.invalidSignature) { try verifyPresigned(query: Self.presignedQuery.replacingOccurrences(of: "ssss", with: "tttt")) }
        refusal(.invalidSignature) { try verifyPresigned(query: Self.presignedQuery.replacingOccurrences(of: "Expires=300", with: "Expires=600")) }
        refusal(.invalidSignature) { try verifyPresigned(authority: "127.0.0.1:9090") }
        refusal(.incompleteSignature) { try verifyPresigned(query: Self.presignedQuery.replacingOccurrences(of: "X-Amz-Expires=300&", with: "")) }
        refusal(.incompleteSignature) { try verifyPresigned(query: Self.presignedQuery.replacingOccurrences(of: "Expires=300", with: "Expires=604801")) }
        refusal(.incompleteSignature) { try verifyPresigned(query: Self.presignedQuery + "&X-Amz-Signature=00") }
        refusal(.missingAuthenticationToken) { try verifyPresigned(query: "X-Amzn-Bedrock-AgentCore-Runtime-Session-Id=s") }
    }

    @Test func malformedAuthorizationHeaders() {
        for bad in ["AWS4-HMAC-SHA256", "AWS AKIA:sig", "AWS4-HMAC-SHA256 Credential=A/20261205/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=x-amz-date, Signature=" + String(repeating: "0", count: 64),
                    "AWS4-HMAC-SHA256 Credential=A/20261205/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host, Signature=zz",
                    "AWS4-HMAC-SHA256 Credential=A/2026/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=host, Signature=" + String(repeating: "0", count: 64),
                    "AWS4-HMAC-SHA256 Credential=A/20261205/us-east-1/bedrock-agentcore/aws4_request, SignedHeaders=Host, Signature=" + String(repeating: "0", count: 64)] {
            #expect(throws: AgentCoreError.self, "\(bad)") { try SigV4.parseAuthorization(bad) }
        }
    }

    @Test func canonicalURIEncodesTwiceAndDropsDotSegments() {
        func uri(_ path: String) -> String {
            let c = SigV4.canonicalRequest(method: "GET", path: path, query: "", signedHeaders: ["host"], values: { _ in ["h"] }, payloadHash: "x")
            return String(decoding: c.split(separator: 0x0A, omittingEmptySubsequences: false)[1], as: UTF8.self)
        }
        #expect(uri("/runtimes/a%3Ab/invocations") == "/runtimes/a%253Ab/invocations")
        #expect(uri("/a/./b/../c//d/") == "/a/c/d/")
        #expect(uri("") == "/")
        #expect(uri("/a b") == "/a%20b")
    }

    @Test func permissionsFollowIAM() throws {
        let auth = Authenticator(principals: try Self.principals(), region: "us-east-1", accountID: "000000000000")
        let alice = try #require(try Self.principals().key("AKIAALICE00000000001")).principal
        let caller = Caller(owner: "alice", kind: .principal(alice))
        let demo = auth.runtimeARN("demo")
        #expect(auth.allows(caller, "bedrock-agentcore:InvokeAgentRuntime", demo))
        #expect(auth.allows(caller, "BEDROCK-AGENTCORE:invokeagentruntime", demo), "actions match case-insensitively")
        #expect(!auth.allows(caller, "bedrock-agentcore:InvokeAgentRuntime", auth.runtimeARN("other")))
        #expect(!auth.allows(caller, "bedrock-agentcore:StopRuntimeSession", demo))
        #expect(!auth.allows(caller, "bedrock-agentcore:InvokeAgentRuntimeCommand", demo), "an explicit deny wins over an allow")
        do { try auth.authorize(caller, "bedrock-agentcore:StopRuntimeSession", demo) } catch {
            #expect(error.message == "User: arn:aws:iam::000000000000:user/alice is not authorized to perform: bedrock-agentcore:StopRuntimeSession on resource: \(demo) because no identity-based policy allows the bedrock-agentcore:StopRuntimeSession action")
        }
        #expect(Wildcard.matches("a*b?d", "axxxbcd") && !Wildcard.matches("a*b?d", "abd") && Wildcard.matches("*", ""))
        #expect(!Wildcard.matches(String(repeating: "*a", count: 30), String(repeating: "a", count: 29) + "b"))
    }

    @Test func principalsFileIsValidated() {
        for bad in ["principals: {}", "principals: [{name: a}]", "principals: [{name: 'a b', accessKeys: [{accessKeyId: AKIAAAAAAAAAAAAAAAAA, secretAccessKey: 0123456789abcdef}]}]",
                    "principals: [{name: a, accessKeys: [{accessKeyId: AKIA, secretAccessKey: 0123456789abcdef}]}]",
                    "principals: [{name: a, accessKeys: [{accessKeyId: AKIAAAAAAAAAAAAAAAAA, secretAccessKey: 0123456789abcdef}], allow: [{actions: ['s3:*'], resources: ['*']}]}]",
                    "principals: [{name: a, accessKeys: [{accessKeyId: AKIAAAAAAAAAAAAAAAAA, secretAccessKey: 0123456789abcdef}]}, {name: b, accessKeys: [{accessKeyId: AKIAAAAAAAAAAAAAAAAA, secretAccessKey: 0123456789abcdef}]}]"] {
            #expect(throws: Principals.ConfigurationError.self, "\(bad)") { try Principals.parse(yaml: bad) }
        }
    }

    @Test func amzDatesRoundTrip() {
        #expect(SigV4.parseDate("20261205T120000Z") == Self.signedAt)
        #expect(SigV4.formatDate(Self.signedAt) == "20261205T120000Z")
        #expect(SigV4.parseDate("20261305T120000Z") == nil && SigV4.parseDate("2026-12-05T12:00:00Z") == nil)
        #expect(SigV4.parseDate("20260229T000000Z") == nil && SigV4.parseDate("20240229T000000Z") != nil, "February 29th only in a leap year")
        #expect(SigV4.parseDate("09701101T000000Z") == nil && SigV4.parseDate("20261205T120060Z") == nil, "years from 1970, seconds below 60 (fuzz)")
    }
}

struct JWTVerifierTests {
    /// docs/security.md: discovery and keys come over https, or plain http to loopback only. 0.0.0.0 is not
    /// a loopback name to the check, but a connection to it stays on this host: without the check the
    /// fetch is tried and fails otherwise ("could not fetch"), and no packet leaves the machine either way.
    @Test func anIssuerIsReachedOverHTTPSOrLoopbackOnly() async throws {
        let verifier = JWTVerifier(logger: Logger(label: "test"))
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJ4In0.c2ln"
        for url in ["http://0.0.0.0:1/.well-known/openid-configuration"] {
            do {
                _ = try await verifier.verify(token, for: JWTAuthorizerConfiguration(discoveryURL: url))
                Issue.record("\(url) was used")
            } catch {
                #expect(error.kind == .accessDenied && error.message.contains("must be https"), "\(error)")
            }
        }
        await verifier.shutdown()
    }
}

struct AuthorizerConfigurationTests {
    @Test func parsesAndRendersTheModelsShape() throws {
        let doc = try JSON.parse(#"{"customJWTAuthorizer": {"discoveryUrl": "https://idp.example/.well-known/openid-configuration", "allowedAudience": ["a"], "allowedClients": ["c"], "allowedScopes": ["s"], "customClaims": [{"inboundTokenClaimName": "team", "inboundTokenClaimValueType": "STRING", "authorizingClaimMatchValue": {"claimMatchValue": {"matchValueString": "x"}, "claimMatchOperator": "EQUALS"}}]}}"#)
        let c = try JWTAuthorizerConfiguration.parse(doc)
        #expect(c.customClaims.first?.values == ["x"])
        #expect(try JWTAuthorizerConfiguration.parse(c.json) == c)
        for bad in [#"{"customJWTAuthorizer": {"discoveryUrl": "https://idp.example/keys"}}"#,
                    #"{"customJWTAuthorizer": {"discoveryUrl": "https://idp.example/.well-known/openid-configuration", "allowedAudience": []}}"#,
                    #"{"customJWTAuthorizer": {"discoveryUrl": "https://idp.example/.well-known/openid-configuration", "customClaims": [{"inboundTokenClaimName": "t", "inboundTokenClaimValueType": "STRING", "authorizingClaimMatchValue": {"claimMatchValue": {"matchValueString": "x"}, "claimMatchOperator": "CONTAINS_ANY"}}]}}"#,
                    #"{"other": {}}"#] {
            #expect(throws: AgentCoreError.self, "\(bad)") { try JWTAuthorizerConfiguration.parse(try JSON.parse(bad)) }
        }
    }
}
