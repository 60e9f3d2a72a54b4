import CubicleAgentCore
import CubicleJSON
import Testing

@Suite struct RouteTests {
    static let arn = "arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/demo"

    @Test func invokeByEncodedARN() throws {
        let path = "/runtimes/\(PercentEncoding.encode(Self.arn))/invocations"
        #expect(try Route.parse(method: "POST", path: path, query: "qualifier=DEFAULT") == .invoke(RuntimeAddress(name: "demo", qualifier: "DEFAULT")))
    }

    @Test func everyOperation() throws {
        let r = PercentEncoding.encode(Self.arn)
        #expect(try Route.parse(method: "POST", path: "/runtimes/\(r)/stopruntimesession", query: nil) == .stopSession(RuntimeAddress(name: "demo")))
        #expect(try Route.parse(method: "POST", path: "/runtimes/\(r)/commands", query: nil) == .command(RuntimeAddress(name: "demo")))
        #expect(try Route.parse(method: "GET", path: "/runtimes/\(r)/invocations/.well-known/agent-card.json", query: nil) == .agentCard(RuntimeAddress(name: "demo")))
        #expect(try Route.parse(method: "GET", path: "/ping", query: nil) == .ping)
        #expect(try Route.parse(method: "GET", path: "/metrics", query: nil) == .metrics)
    }

    @Test func bareNameNeedsAccountID() throws {
        #expect(try Route.parse(method: "POST", path: "/runtimes/demo/invocations", query: "accountId=123456789012") == .invoke(RuntimeAddress(name: "demo")))
        let e = #expect(throws: AgentCoreError.self) { try Route.parse(method: "POST", path: "/runtimes/demo/invocations", query: nil) }
        #expect(e?.kind == .validation)
        let bad = #expect(throws: AgentCoreError.self) { try Route.parse(method: "POST", path: "/runtimes/demo/invocations", query: "accountId=12ab") }
        #expect(bad?.fields.first?.name == "accountId")
    }

    @Test func malformedARNsAreValidationErrors() {
        for arn in ["arn:aws:s3:::bucket", "arn:aws:bedrock-agentcore:us-east-1:1:agent/x", "arn:aws:bedrock-agentcore:us-east-1:1:runtime/",
                    "arn:aws:bedrock-agentcore:us-east-1:1:runtime/9bad", "arn:aws:bedrock-agentcore:us-east-1:1:runtime/a b"] {
            let e = #expect(throws: AgentCoreError.self) { try Route.parse(method: "POST", path: "/runtimes/\(PercentEncoding.encode(arn))/invocations", query: nil) }
            #expect(e?.kind == .validation, "\(arn)")
        }
        let e = #expect(throws: AgentCoreError.self) { try Route.parse(method: "POST", path: "/runtimes/%zz/invocations", query: nil) }
        #expect(e?.kind == .validation)
    }

    @Test func unknownPathsAndMethodsAreNotFound() {
        for (method, path) in [("GET", "/runtimes/x/invocations"), ("POST", "/runtimes/x/other"), ("GET", "/"), ("DELETE", "/ping")] {
            let e = #expect(throws: AgentCoreError.self) { try Route.parse(method: method, path: path, query: "accountId=123456789012") }
            #expect(e?.kind == .resourceNotFound)
        }
    }

    @Test func percentEncodingRoundTrips() {
        for s in [Self.arn, "a/b:c d%e", "日本語"] { #expect(PercentEncoding.decode(PercentEncoding.encode(s)) == s) }
        #expect(PercentEncoding.decode("%4") == nil)
        #expect(PercentEncoding.decode("%ff") == nil)  // not UTF-8
    }
}

@Suite struct ValidationTests {
    @Test func sessionIDLength() throws {
        #expect(try Validate.sessionID(String(repeating: "a", count: 33)).count == 33)
        #expect(try Validate.sessionID(String(repeating: "a", count: 256)).count == 256)
        for bad in [String(repeating: "a", count: 32), String(repeating: "a", count: 257), ""] {
            let e = #expect(throws: AgentCoreError.self) { try Validate.sessionID(bad) }
            #expect(e?.kind == .validation && e?.status == 400)
        }
        let missing = #expect(throws: AgentCoreError.self) { try Validate.sessionID(nil) }
        #expect(missing?.fields.first?.name == "runtimeSessionId")
    }

    @Test func sessionIDCharacters() {
        for bad in [String(repeating: "a", count: 32) + " ", String(repeating: "a", count: 32) + "\u{7f}", String(repeating: "é", count: 20)] {
            #expect(throws: AgentCoreError.self) { try Validate.sessionID(bad) }
        }
    }

    @Test func payloadLimit() throws {
        try Validate.payloadLength(100_000_000)
        try Validate.payloadLength(nil)
        let e = #expect(throws: AgentCoreError.self) { try Validate.payloadLength(100_000_001) }
        #expect(e?.kind == .validation)
    }

    @Test func commandBody() throws {
        #expect(try CommandRequest(body: Array(#"{"command":"ls"}"#.utf8)) == CommandRequest(command: "ls", timeoutSeconds: 300))
        #expect(try CommandRequest(body: Array(#"{"command":"ls","timeout":5}"#.utf8)).timeoutSeconds == 5)
        let cases: [(String, AgentCoreError.ValidationReason)] = [
            ("{", .cannotParse), ("[]", .cannotParse), (#"{"timeout":5}"#, .fieldValidationFailed), (#"{"command":""}"#, .fieldValidationFailed),
            (#"{"command":"ls","timeout":0}"#, .fieldValidationFailed), (#"{"command":"ls","timeout":3601}"#, .fieldValidationFailed),
            (#"{"command":"ls","timeout":"5"}"#, .fieldValidationFailed),
            ("{\"command\":\"" + String(repeating: "x", count: 65537) + "\"}", .fieldValidationFailed),
        ]
        for (body, reason) in cases {
            let e = #expect(throws: AgentCoreError.self) { try CommandRequest(body: Array(body.utf8)) }
            #expect(e?.reason == reason, "\(body.prefix(40))")
        }
    }

    @Test func errorShapes() throws {
        let e = AgentCoreError.invalidField("runtimeSessionId", "too short")
        let body = try JSON.parse(e.body)
        #expect(body["message"]?.stringValue?.contains("runtimeSessionId") == true)
        #expect(body["reason"] == "FieldValidationFailed")
        #expect(body["fieldList"]?.arrayValue?.first?["name"] == "runtimeSessionId")
        #expect(AgentCoreError.initializationTimeout.status == 424)
        #expect(AgentCoreError.initializationTimeout.message == "Runtime initialization time exceeded. Please make sure that initialization completes in 30s.")
        let quota = try JSON.parse(AgentCoreError(.serviceQuotaExceeded, "full").body)
        #expect(quota == ["message": "full"])
        #expect(AgentCoreError.Kind.serviceQuotaExceeded.status == 402)
        #expect(AgentCoreError.Kind.runtimeClient.eventStreamMember == "runtimeClientError")
    }

    @Test func headerForwarding() {
        let allow: Set<String> = ["x-team"]
        #expect(AgentCoreHeader.forwardsToAgent("X-Amzn-Bedrock-AgentCore-Runtime-Custom-Tenant", value: "a", allowlist: []))
        #expect(!AgentCoreHeader.forwardsToAgent("X-Amzn-Bedrock-AgentCore-Runtime-Custom-Tenant", value: String(repeating: "a", count: 4097), allowlist: []))
        #expect(AgentCoreHeader.forwardsToAgent("traceparent", value: "00-1", allowlist: []))
        #expect(AgentCoreHeader.forwardsToAgent("Mcp-Session-Id", value: "m", allowlist: []))
        #expect(AgentCoreHeader.forwardsToAgent("X-Team", value: "t", allowlist: allow))
        #expect(!AgentCoreHeader.forwardsToAgent("X-Other", value: "t", allowlist: allow))
        #expect(!AgentCoreHeader.forwardsToAgent("Authorization", value: "AWS4-HMAC-SHA256 ...", allowlist: ["authorization"]))
        #expect(!AgentCoreHeader.forwardsToAgent("Authorization", value: "AWS4-HMAC-SHA256 ...", allowlist: [], authorizer: true))
        #expect(!AgentCoreHeader.forwardsToAgent("Authorization", value: "Bearer t", allowlist: ["authorization"]), "no authorizer: no token")
        #expect(AgentCoreHeader.forwardsToAgent("Authorization", value: "Bearer t", allowlist: [], authorizer: true))
        #expect(!AgentCoreHeader.forwardsToAgent("X-Amz-Security-Token", value: "t", allowlist: ["x-amz-security-token"]))
        #expect(!AgentCoreHeader.forwardsToAgent("Host", value: "h", allowlist: []))
    }
}

@Suite struct EventStreamTests {
    static func hex(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        var i = s.startIndex
        while i < s.endIndex { let j = s.index(i, offsetBy: 2); out.append(UInt8(s[i..<j], radix: 16)!); i = j }
        return out
    }

    /// Built independently with Python's struct and zlib.crc32, and read back by botocore's EventStreamBuffer.
    @Test func contentStartKnownBytes() {
        let expected = Self.hex("0000006e0000004ba22e8e5d0d3a6d6573736167652d747970650700056576656e740b3a6576656e742d747970650700056368756e6b0d3a636f6e74656e742d747970650700106170706c69636174696f6e2f6a736f6e7b22636f6e74656e745374617274223a7b7d7d1ff311ca")
        #expect(CommandEvent.start.message.encoded() == expected)
    }

    @Test func crc32CheckValue() {
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)
    }

    @Test func roundTripInPieces() throws {
        let events: [CommandEvent] = [.start, .stdout("héllo\n"), .stderr(String(repeating: "x", count: 70_000)), .stop(exitCode: 3, timedOut: true)]
        let bytes = events.flatMap { $0.message.encoded() }
        var buffer: [UInt8] = []
        var decoded: [EventStream.Message] = []
        for chunk in stride(from: 0, to: bytes.count, by: 997) {
            buffer += bytes[chunk..<min(bytes.count, chunk + 997)]
            decoded += try EventStream.decode(&buffer)
        }
        #expect(buffer.isEmpty)
        #expect(decoded == events.map(\.message))
        let stop = try JSON.parse(decoded[3].payload)
        #expect(stop == ["contentStop": ["exitCode": 3, "status": "TIMED_OUT"]])
    }

    @Test func corruptionIsRefused() {
        var bytes = CommandEvent.stdout("hi").message.encoded()
        bytes[bytes.count - 6] ^= 1
        #expect(throws: EventStream.DecodeError.self) { _ = try EventStream.decode(&bytes) }
        var prelude = CommandEvent.start.message.encoded()
        prelude[2] ^= 0x40
        #expect(throws: EventStream.DecodeError.self) { _ = try EventStream.decode(&prelude) }
    }

    /// Bytes that are not UTF-8 in a header, under valid CRCs, are refused rather than repaired into
    /// U+FFFD (a header would not read back as what was sent). Found by the event-stream fuzzer.
    @Test(arguments: [true, false]) func headersThatAreNotUTF8AreRefused(inName: Bool) {
        let bad: [UInt8] = [0x3A, 0x9D, 0x8E]
        let name: [UInt8] = inName ? bad : Array(":event-type".utf8)
        let value: [UInt8] = inName ? Array("chunk".utf8) : bad
        let headers = [UInt8(name.count)] + name + [7, 0, UInt8(value.count)] + value
        let payload = Array("{}".utf8)
        func be32(_ v: Int) -> [UInt8] { [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }
        var bytes = be32(12 + headers.count + payload.count + 4) + be32(headers.count)
        bytes += be32(Int(CRC32.checksum(bytes))) + headers + payload
        bytes += be32(Int(CRC32.checksum(bytes)))
        #expect(throws: EventStream.DecodeError.self) { _ = try EventStream.decode(&bytes) }
    }

    @Test func exceptionMessage() {
        let m = EventStream.Message.exception(AgentCoreError(.runtimeClient, "agent gone"))
        #expect(m.headers.map(\.0) == [":message-type", ":exception-type", ":content-type"])
        #expect(m.headers[1].1 == "runtimeClientError")
    }
}

/// bedrock-agentcore-control's routes, beside the data plane's on one listener.
@Suite struct ControlRouteTests {
    @Test func everyOperation() throws {
        let cases: [(String, String, ControlRoute)] = [
            ("PUT", "/runtimes/", .createRuntime), ("POST", "/runtimes/", .listRuntimes),
            ("GET", "/runtimes/a-0123456789/", .getRuntime(id: "a-0123456789")), ("PUT", "/runtimes/a-0123456789/", .updateRuntime(id: "a-0123456789")),
            ("DELETE", "/runtimes/a-0123456789/", .deleteRuntime(id: "a-0123456789")), ("POST", "/runtimes/a-0123456789/versions/", .listVersions(id: "a-0123456789")),
            ("PUT", "/runtimes/a-0123456789/runtime-endpoints/", .createEndpoint(id: "a-0123456789")),
            ("POST", "/runtimes/a-0123456789/runtime-endpoints/", .listEndpoints(id: "a-0123456789")),
            ("GET", "/runtimes/a-0123456789/runtime-endpoints/e1/", .getEndpoint(id: "a-0123456789", name: "e1")),
            ("PUT", "/runtimes/a-0123456789/runtime-endpoints/e1/", .updateEndpoint(id: "a-0123456789", name: "e1")),
            ("DELETE", "/runtimes/a-0123456789/runtime-endpoints/e1/", .deleteEndpoint(id: "a-0123456789", name: "e1")),
            ("POST", "/tags/" + PercentEncoding.encode("arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/a-0123456789"),
             .tagResource(arn: "arn:aws:bedrock-agentcore:us-east-1:000000000000:runtime/a-0123456789")),
        ]
        for (method, path, route) in cases { #expect(try ControlRoute.parse(method: method, path: path) == route, "\(method) \(path)") }
    }

    @Test func theDataPlanesRoutesAreNotTheControlPlanes() throws {
        let arn = PercentEncoding.encode("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/demo")
        for path in ["/runtimes/\(arn)/invocations", "/runtimes/\(arn)/stopruntimesession", "/runtimes/\(arn)/commands", "/ping", "/metrics"] {
            #expect(try ControlRoute.parse(method: "POST", path: path) == nil, "\(path)")
        }
        // And the other way round: no control-plane path is a data-plane operation.
        for path in ["/runtimes/", "/runtimes/a-0123456789/", "/runtimes/a-0123456789/versions/", "/runtimes/a-0123456789/runtime-endpoints/"] {
            #expect(throws: AgentCoreError.self) { try Route.parse(method: "POST", path: path, query: nil) }
        }
    }

    @Test func hostileIdentifiersAreValidationErrors() {
        for path in ["/runtimes/..%2F..%2Fetc/", "/runtimes/%ZZ/", "/runtimes/a-0123456789/runtime-endpoints/bad-name/",
                     "/runtimes/" + String(repeating: "a", count: 101) + "/"] {
            let e = #expect(throws: AgentCoreError.self) { try ControlRoute.parse(method: "GET", path: path) }
            #expect(e?.kind == .validation, "\(path)")
        }
        #expect(throws: AgentCoreError.self) { try ControlRoute.parse(method: "GET", path: "/tags/short") }
    }

    @Test func repeatedQueryNamesKeepEveryValue() {
        #expect(QueryString.parseAll("tagKeys=a&tagKeys=b%20c&x=1") == ["tagKeys": ["a", "b c"], "x": ["1"]])
    }
}
