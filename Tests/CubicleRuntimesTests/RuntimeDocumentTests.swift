import CubicleAgentCore
import CubicleJSON
@testable import CubicleRuntimes
import Testing

/// CreateAgentRuntime's fields checked against the model and against what Cubicle can honour, and the
/// sandbox configuration a version becomes; the catalog's answer for each qualifier.
@Suite struct RuntimeDocumentTests {
    static let role = "arn:aws:iam::123456789012:role/Agent"
    var context: RuntimeDocument.Context {
        var c = RuntimeDocument.Context()
        c.codeRoots = ["/srv/agents"]
        c.mappedRoles = [Self.role]
        return c
    }

    func body(_ extra: [String: JSON] = [:], uri: String = "123456789012.dkr.ecr.us-east-1.amazonaws.com/agent:v1") -> [String: JSON] {
        var b: [String: JSON] = ["agentRuntimeName": "agent", "agentRuntimeArtifact": ["containerConfiguration": ["containerUri": .string(uri)]],
                                 "roleArn": .string(Self.role), "networkConfiguration": ["networkMode": "PUBLIC"]]
        for (k, v) in extra { b[k] = v }
        return b
    }

    func config(_ b: [String: JSON], tags: [String: String] = [:]) throws -> RuntimeConfig {
        let doc = try RuntimeDocument.version(from: b, tags: tags, allowed: ["agentRuntimeName", "clientToken", "tags"], context: context)
        return try RuntimeDocument.config(doc, id: "agent-0123456789", version: 3, context: context)
    }

    func refusal(_ b: [String: JSON], tags: [String: String] = [:]) -> AgentCoreError? {
        #expect(throws: AgentCoreError.self) { _ = try config(b, tags: tags) }
    }

    @Test func sessionStorageIsAppliedWithItsCap() throws {
        let c = try config(body(["filesystemConfigurations": [["sessionStorage": ["mountPath": "/mnt/work/"]]]]), tags: ["cubicle:sessionStorage": "256MiB"])
        #expect(c.sessionStorage == { var s = RuntimeConfig.SessionStorageConfig(mountPath: "/mnt/work"); s.bytes = 256 << 20; return s }())
        #expect(refusal(body(), tags: ["cubicle:sessionStorage": "256MiB"])?.fields.first?.name == "tags.cubicle:sessionStorage", "a cap without storage")
    }

    @Test func requestTimeLimitsDefaultToAgentCoresAndTakeTags() throws {
        let plain = try config(body())
        #expect(plain.limits.requestSeconds == 900 && plain.limits.streamSeconds == 3600, "15 and 60 minutes, as AgentCore")
        let c = try config(body(), tags: ["cubicle:requestSeconds": "30", "cubicle:streamSeconds": "120"])
        #expect(c.limits.requestSeconds == 30 && c.limits.streamSeconds == 120)
        #expect(refusal(body(), tags: ["cubicle:requestSeconds": "0"])?.fields.first?.name == "tags.cubicle:requestSeconds")
    }

    @Test func aJWTAuthorizerIsAppliedAndRendered() throws {
        let authorizer: JSON = ["customJWTAuthorizer": ["discoveryUrl": "https://idp.example/.well-known/openid-configuration", "allowedClients": ["app"]]]
        let c = try config(body(["authorizerConfiguration": authorizer]))
        #expect(c.authorizer?.allowedClients == ["app"] && c.authorizer?.json == authorizer)
    }

    @Test func everyFieldCubicleHasIsApplied() throws {
        let c = try config(body(["environmentVariables": ["A": "1"], "lifecycleConfiguration": ["idleRuntimeSessionTimeout": 120, "maxLifetime": 3600],
                                 "protocolConfiguration": ["serverProtocol": "MCP"], "requestHeaderConfiguration": ["requestHeaderAllowlist": ["X-Amzn-Bedrock-AgentCore-Runtime-Custom-H"]],
                                 "description": "d", "metadataConfiguration": ["requireMMDSV2": true]]),
                           tags: ["cubicle:memory": "1GiB", "cubicle:cpus": "0.5", "cubicle:warmPool": "2", "cubicle:egress.allow": "api.example.com 10.0.0.0/8", "other": "x"])
        #expect((c.name, c.version, c.containerUri, c.networkMode, c.roleArn) == ("agent-0123456789", 3, "123456789012.dkr.ecr.us-east-1.amazonaws.com/agent:v1", .public, Self.role))
        #expect(c.environment == ["A": "1"] && c.idleRuntimeSessionTimeout == 120 && c.maxLifetime == 3600 && c.serverProtocol == .mcp)
        #expect(c.requestHeaderAllowlist == ["x-amzn-bedrock-agentcore-runtime-custom-h"])
        #expect(c.limits.memoryBytes == 1 << 30 && c.limits.cpus == 0.5 && c.warmPool == 2 && c.egress.allow.count == 2)
    }

    @Test func aHostCodeDirectoryNeedsACodeRootAndACommand() throws {
        let c = try config(body(uri: "host:/srv/agents/tutor"), tags: ["cubicle:command": "/app/agent --port 8080"])
        #expect(c.codeDirectory == "/srv/agents/tutor" && c.command == ["/app/agent", "--port", "8080"] && c.containerUri == nil)
        #expect(refusal(body(uri: "host:/srv/agents/tutor"))?.fields.first?.name == "tags.cubicle:command")
        for outside in ["host:/etc", "host:/srv/agents/../../etc", "host:/srv/agentsX", "oci:/root/layout"] {
            #expect(refusal(body(uri: outside), tags: ["cubicle:command": "/app/agent"])?.fields.first?.name == "agentRuntimeArtifact.containerConfiguration.containerUri", "\(outside)")
        }
    }

    @Test func whatCubicleCannotHonourIsRefusedByName() throws {
        let cases: [([String: JSON], String)] = [
            (["agentRuntimeArtifact": ["codeConfiguration": ["code": ["s3": ["bucket": "b", "prefix": "p"]], "runtime": "PYTHON_3_12", "entryPoint": ["main.py"]]]], "agentRuntimeArtifact.codeConfiguration"),
            (["networkConfiguration": ["networkMode": "VPC"]], "networkConfiguration.networkMode"),
            (["networkConfiguration": ["networkMode": "PUBLIC", "networkModeConfig": ["subnets": ["subnet-1"]]]], "networkConfiguration.networkModeConfig"),
            (["authorizerConfiguration": ["customJWTAuthorizer": ["discoveryUrl": "https://x/keys"]]], "authorizerConfiguration.customJWTAuthorizer.discoveryUrl"),
            (["authorizerConfiguration": ["customJWTAuthorizer": ["discoveryUrl": "https://x/.well-known/openid-configuration",
                                                                  "privateEndpoint": ["vpc": "x"]]]], "authorizerConfiguration.customJWTAuthorizer.privateEndpoint"),
            (["filesystemConfigurations": [["sessionStorage": ["mountPath": "/mnt/a/b"]]]], "filesystemConfigurations[0].sessionStorage.mountPath"),
            (["filesystemConfigurations": [["efsAccessPoint": ["accessPointArn": "arn:aws:elasticfilesystem:us-east-1:123456789012:access-point/fsap-1", "mountPath": "/mnt/efs"]]]], "filesystemConfigurations[0]"),
            (["protocolConfiguration": ["serverProtocol": "AGUI"]], "protocolConfiguration.serverProtocol"),
            (["protocolConfiguration": ["serverProtocol": "SOAP"]], "protocolConfiguration.serverProtocol"),
            (["lifecycleConfiguration": ["idleRuntimeSessionTimeout": 59]], "lifecycleConfiguration.idleRuntimeSessionTimeout"),
            (["lifecycleConfiguration": ["idleRuntimeSessionTimeout": 3600, "maxLifetime": 600]], "lifecycleConfiguration.idleRuntimeSessionTimeout"),
            (["description": .string(String(repeating: "d", count: 4097))], "description"),
            (["roleArn": "arn:aws:iam::123456789012:user/x"], "roleArn"),
            (["roleArn": "arn:aws:iam::123456789012:role/Unmapped"], "roleArn"),
            (["environmentVariables": ["A=B": "1"]], "environmentVariables.A=B"),
            (["requestHeaderConfiguration": ["requestHeaderAllowlist": ["bad header"]]], "requestHeaderConfiguration.requestHeaderAllowlist"),
            (["surprise": 1], "surprise"),
        ]
        for (extra, field) in cases {
            #expect(refusal(body(extra))?.fields.first?.name == field, "\(extra)")
        }
        #expect(refusal(body(), tags: ["cubicle:memory": "a lot"])?.fields.first?.name == "tags.cubicle:memory")
        var sandbox = body(["networkConfiguration": ["networkMode": "SANDBOX"]])
        #expect(refusal(sandbox, tags: ["cubicle:egress.allow": "example.com"])?.fields.first?.name == "tags.cubicle:egress.allow")
        sandbox["roleArn"] = "arn:aws:iam::123456789012:role/Unmapped"
        let stored = try config(sandbox)
        #expect(stored.roleArn == nil && stored.networkMode == .sandbox, "a SANDBOX session has no network, so no credentials: its role is only stored")
        #expect(throws: AgentCoreError.self) { _ = try RuntimeDocument.tags(["cubicle:nonsense": "1"]) }
        #expect(throws: AgentCoreError.self) { _ = try RuntimeDocument.tags(["aws:reserved": "1"]) }
    }

    @Test func theCatalogResolvesQualifiersToReadyVersions() throws {
        let catalog = RuntimeCatalog()
        var r = RuntimeRecord(id: "agent-0123456789", name: "agent", createdAt: 1, status: .updating, versions: [
            RuntimeVersionRecord(version: 1, createdAt: 1, status: .ready, document: [:]),
            RuntimeVersionRecord(version: 2, createdAt: 2, status: .updating, document: [:]),
        ])
        r.endpoints = [RuntimeEndpointRecord(name: "DEFAULT", id: "d", liveVersion: 1, targetVersion: 2, status: .updating, createdAt: 1),
                       RuntimeEndpointRecord(name: "fresh", id: "f", liveVersion: nil, targetVersion: 2, status: .creating, createdAt: 1)]
        var v1 = RuntimeConfig(name: r.id, command: ["/a"])
        v1.version = 1
        catalog.set(r, configs: [1: v1])
        #expect(try catalog.resolve(r.id, qualifier: nil).version == 1, "DEFAULT serves its live version while the next one prepares")
        #expect(try catalog.resolve(r.id, qualifier: "DEFAULT").version == 1)
        #expect(try catalog.resolve(r.id, qualifier: "1").version == 1)
        #expect(throws: RuntimeCatalog.Refusal.notReady(runtime: r.id, qualifier: "2", status: "UPDATING")) { try catalog.resolve(r.id, qualifier: "2") }
        #expect(throws: RuntimeCatalog.Refusal.notReady(runtime: r.id, qualifier: "fresh", status: "CREATING")) { try catalog.resolve(r.id, qualifier: "fresh") }
        #expect(throws: RuntimeCatalog.Refusal.noEndpoint(runtime: r.id, qualifier: "9")) { try catalog.resolve(r.id, qualifier: "9") }
        #expect(throws: RuntimeCatalog.Refusal.noEndpoint(runtime: r.id, qualifier: "nope")) { try catalog.resolve(r.id, qualifier: "nope") }
        #expect(throws: RuntimeCatalog.Refusal.noRuntime("other")) { try catalog.resolve("other", qualifier: nil) }
        r.status = .deleting
        catalog.set(r, configs: [1: v1])
        #expect(throws: RuntimeCatalog.Refusal.noRuntime(r.id)) { try catalog.resolve(r.id, qualifier: nil) }
    }
}
