import CubicleAgentCore
import CubicleRuntimes
import CubicleSandbox
import CubicleSessions
import Foundation
import Testing

@Suite struct ConfigTests {
    @Test func fullRuntime() throws {
        let c = try DaemonConfig.parse(yaml: """
        maxSessions: 5
        lifecycleMinimumSeconds: 1
        healthPollSeconds: 0.5
        runtimes:
          - name: weather-agent
            command: [/usr/bin/python3, /app/agent.py]
            codeDirectory: /srv/agents/weather
            environmentVariables: {MODEL: stub, LOG_LEVEL: debug}
            protocol: MCP
            lifecycle: {idleRuntimeSessionTimeout: 2, maxLifetime: 10}
            limits: {memory: 256MiB, cpus: 0.5, pids: 64, tmpfs: 32M, openFiles: 1024}
            requestHeaderAllowlist: [X-Team]
            readOnlyMounts:
              - {source: /opt/venv}
            warmPool: 3
        """)
        #expect(c.maxSessions == 5)
        #expect(c.healthPollSeconds == 0.5)
        let r = try #require(c.runtime(named: "weather-agent"))
        #expect(r.command == ["/usr/bin/python3", "/app/agent.py"])
        #expect(r.environment == ["MODEL": "stub", "LOG_LEVEL": "debug"])
        #expect(r.serverProtocol == .mcp && r.serverProtocol.port == 8000)
        #expect(r.idleRuntimeSessionTimeout == 2 && r.maxLifetime == 10)
        #expect(r.limits.memoryBytes == 256 << 20 && r.limits.tmpfsBytes == 32 << 20 && r.limits.cpus == 0.5 && r.limits.pids == 64)
        #expect(r.requestHeaderAllowlist == ["x-team"])
        #expect(r.readOnlyMounts.first?.target == "/opt/venv")
        #expect(r.warmPool == 3)
        #expect(r.limits.openFiles == 1024)
        // maxSessions live sessions and every warm pool's sandboxes, each up to the runtime's limits.
        #expect(c.fileBudget.sessions == 8)
        #expect(c.fileBudget.limits == [FileBudget.Session(memoryBytes: 256 << 20, pids: 64, openFiles: 1024)])
    }

    /// A session holds what its memory backs (256 bytes a file) or what its processes' descriptors and
    /// mappings allow, whichever is less; the host's file table must hold the host's use, a reserve and
    /// maxSessions of the largest; overflow saturates.
    /// ensure() against a fake /proc/sys: raised to what is needed when lower, left alone when not.
    @Test func fileBudgetRaisesFileMaxOnlyWhenLow() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("cubicle-procsys-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: root) }
        try FileManager.default.createDirectory(atPath: root + "/fs", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/vm", withIntermediateDirectories: true)
        try "3000\t0\t9223372036854775807\n".write(toFile: root + "/fs/file-nr", atomically: false, encoding: .utf8)
        try "65530\n".write(toFile: root + "/vm/max_map_count", atomically: false, encoding: .utf8)
        try "100000\n".write(toFile: root + "/fs/file-max", atomically: false, encoding: .utf8)
        let session = FileBudget.Session(memoryBytes: 64 << 20, pids: 8, openFiles: 256)
        let needed = 3000 + FileBudget.hostReserve + 3 * FileBudget.ceiling(session, maxMapCount: 65530)
        #expect(try FileBudget.ensure(maxSessions: 3, sessions: [session], procSys: root) == FileBudget.Raised(from: 100000, to: needed))
        #expect(try String(contentsOfFile: root + "/fs/file-max", encoding: .utf8) == String(needed))
        #expect(try FileBudget.ensure(maxSessions: 3, sessions: [session], procSys: root) == nil)
    }

    @Test func fileBudgetArithmetic() {
        let small = FileBudget.Session(memoryBytes: 256 << 20, pids: 4, openFiles: 1024)
        #expect(FileBudget.ceiling(small, maxMapCount: 65530) == 4 * (1024 + 65530))
        let large = FileBudget.Session(memoryBytes: 2 << 30, pids: 1024, openFiles: 4096)
        #expect(FileBudget.ceiling(large, maxMapCount: 65530) == (2 << 30) / 256)
        #expect(FileBudget.required(hostFiles: 5000, maxSessions: 10, sessions: [small, large], maxMapCount: 65530)
                == 5000 + FileBudget.hostReserve + 10 * ((2 << 30) / 256))
        let huge = FileBudget.Session(memoryBytes: Int64.max, pids: Int64.max, openFiles: Int64.max)
        #expect(FileBudget.required(hostFiles: 1, maxSessions: 1000, sessions: [huge], maxMapCount: 65530) == Int64.max)
    }

    @Test func defaultsMirrorAWS() throws {
        let c = try DaemonConfig.parse(yaml: "runtimes:\n  - {name: a, command: [/app/a]}\n")
        let r = try #require(c.runtime(named: "a"))
        #expect(r.idleRuntimeSessionTimeout == 900 && r.maxLifetime == 28_800)
        #expect(r.serverProtocol == .http)
        #expect(c.initializationTimeoutSeconds == 30)
        #expect(r.warmPool == 0, "no sandbox is started before it is asked for unless configured")
        #expect(c.sessionsYieldCPUToHost == .whileThrottled, "sessions' CPU comes after the host's while one is throttled, unless configured")
        #expect(c.networkNamespacePool == 4)
        #expect(try DaemonConfig.parse(yaml: "networkNamespacePool: 0\nruntimes:\n  - {name: a, command: [/a]}").networkNamespacePool == 0)
        #expect(c.initForkServer)
        #expect(try DaemonConfig.parse(yaml: "initForkServer: false\nruntimes:\n  - {name: a, command: [/a]}").initForkServer == false)
        for (text, mode) in [("false", SessionsCPUYield.never), ("true", .always), ("whileThrottled", .whileThrottled)] {
            #expect(try DaemonConfig.parse(yaml: "sessionsYieldCPUToHost: \(text)\nruntimes:\n  - {name: a, command: [/a]}").sessionsYieldCPUToHost == mode)
        }
    }

    /// Each bad config is refused with the path of the field at fault.
    @Test(arguments: [
        ("runtimes: []", "runtimes"),
        ("maxSessions: 10", "runtimes"),
        ("runtimes:\n  - {command: [/a]}", "runtimes[0].name"),
        ("runtimes:\n  - {name: a}", "runtimes[0].command"),
        ("runtimes:\n  - {name: '9x', command: [/a]}", "runtimes[0].name"),
        ("runtimes:\n  - {name: a, command: [/a], protocol: GRPC}", "runtimes[0].protocol"),
        ("runtimes:\n  - {name: a, command: [/a], lifecycle: {idleRuntimeSessionTimeout: 30}}", "runtimes[0].lifecycle.idleRuntimeSessionTimeout"),
        ("runtimes:\n  - {name: a, command: [/a], lifecycle: {maxLifetime: 28801}}", "runtimes[0].lifecycle.maxLifetime"),
        ("runtimes:\n  - {name: a, command: [/a], lifecycle: {idleRuntimeSessionTimeout: 900, maxLifetime: 600}}", "runtimes[0].lifecycle.idleRuntimeSessionTimeout"),
        ("runtimes:\n  - {name: a, command: [/a], limits: {memory: lots}}", "runtimes[0].limits.memory"),
        ("runtimes:\n  - {name: a, command: [/a], limits: {pids: 2}}", "runtimes[0].limits.pids"),
        ("runtimes:\n  - {name: a, command: [/a], warmPool: -1}", "runtimes[0].warmPool"),
        ("runtimes:\n  - {name: a, command: [/a], warmPool: 1001}", "runtimes[0].warmPool"),
        ("runtimes:\n  - {name: a, command: [/a], codeDirectory: relative/dir}", "runtimes[0].codeDirectory"),
        ("runtimes:\n  - {name: a, command: [/a], colour: blue}", "runtimes[0].colour"),
        ("runtimes:\n  - {name: a, command: [/a]}\n  - {name: a, command: [/b]}", "runtimes[1].name"),
        ("runtimes:\n  - {name: a, command: [/a], readOnlyMounts: [{source: /x, target: /a/../etc}]}", "runtimes[0].readOnlyMounts[0].target"),
        ("maxSessions: many\nruntimes:\n  - {name: a, command: [/a]}", "maxSessions"),
        ("sessionsYieldCPUToHost: sometimes\nruntimes:\n  - {name: a, command: [/a]}", "sessionsYieldCPUToHost"),
        ("networkNamespacePool: -1\nruntimes:\n  - {name: a, command: [/a]}", "networkNamespacePool"),
        ("initForkServer: 3\nruntimes:\n  - {name: a, command: [/a]}", "initForkServer"),
        ("runtimes: {a: 1}", "runtimes"),
        ("runtimes:\n  - [unclosed", "(file)"),
        ("", "(file)"),
    ])
    func badConfigNamesTheField(yaml: String, field: String) {
        let e = #expect(throws: ConfigError.self) { try DaemonConfig.parse(yaml: yaml) }
        #expect(e?.field == field, "\(yaml) -> \(String(describing: e))")
    }

    @Test func embeddedDefaultServesDemo() {
        let c = DaemonConfig.embedded(demoCodeDirectory: "/run/cubicle/runtimes/demo")
        #expect(c.runtimes.map(\.name) == ["demo"])
        #expect(c.runtime(named: "demo")?.command == ["/app/cubicle-demo-agent"])
    }
}

@Suite struct TextTests {
    @Test func utf8ChunksNeverSplitACharacter() {
        let text = "héllo 日本語 🎉 end"
        let bytes = Array(text.utf8)
        for size in 1...5 {
            var chunker = UTF8Chunker()
            var out = ""
            for start in stride(from: 0, to: bytes.count, by: size) { out += chunker.feed(bytes[start..<min(bytes.count, start + size)]) }
            out += chunker.finish()
            #expect(out == text, "chunk size \(size)")
        }
    }

    @Test func invalidUTF8BecomesReplacement() {
        var chunker = UTF8Chunker()
        let out = chunker.feed([0x61, 0xFF, 0x62]) + chunker.finish()
        #expect(out == "a\u{FFFD}b")
    }
}

/// networkConfiguration, egress, roleArn and roleCredentials, with AgentCore's names.
@Suite struct NetworkConfigTests {
    let role = "arn:aws:iam::123456789012:role/tutor"

    @Test func publicRuntimeWithPolicyAndRole() throws {
        let c = try DaemonConfig.parse(yaml: """
        region: eu-west-1
        roleCredentials:
          - {roleArn: "\(role)", profile: tutor, sharedCredentialsFile: /etc/cubicle/aws-credentials}
        runtimes:
          - name: web
            command: [/app/agent]
            networkConfiguration: {networkMode: PUBLIC}
            egress: {allow: [bedrock-runtime.us-east-1.amazonaws.com, "*.example.com", 203.0.113.0/24], deny: [203.0.113.9]}
            roleArn: "\(role)"
          - name: plain
            command: [/app/agent]
        """)
        let web = try #require(c.runtime(named: "web"))
        #expect(web.networkMode == .public && web.roleArn == role)
        #expect(web.egress.allow.map(\.description) == ["bedrock-runtime.us-east-1.amazonaws.com", "*.example.com", "203.0.113.0/24"])
        #expect(web.egress.deny.map(\.description) == ["203.0.113.9/32"])
        #expect(c.runtime(named: "plain")?.networkMode == .sandbox, "SANDBOX is the default")
        #expect(c.region == "eu-west-1" && c.roleCredentials.first?.profile == "tutor")
        #expect(DaemonConfig.embedded(demoCodeDirectory: "/x").runtimes[0].networkMode == .sandbox)
    }

    @Test func mistakesNameTheirField() {
        func error(_ runtime: String, top: String = "") -> String? {
            do { _ = try DaemonConfig.parse(yaml: top + "runtimes:\n  - name: r\n    command: [/a]\n" + runtime); return nil } catch { return error.field }
        }
        #expect(error("    networkConfiguration: {networkMode: VPC}\n") == "runtimes[0].networkConfiguration.networkMode")
        #expect(error("    networkConfiguration: {networkMode: PUBLIC}\n    egress: {allow: [\"10.0.0.1/8\"]}\n") == "runtimes[0].egress.allow[0]")
        #expect(error("    networkConfiguration: {networkMode: PUBLIC}\n    egress: {allow: [\"bad name!\"]}\n") == "runtimes[0].egress.allow[0]")
        #expect(error("    egress: {allow: [example.com]}\n") == "runtimes[0].egress", "egress on a SANDBOX runtime")
        #expect(error("    networkConfiguration: {networkMode: PUBLIC}\n    egress: {allowed: [example.com]}\n") == "runtimes[0].egress.allowed")
        #expect(error("    roleArn: \"\(role)\"\n") == "runtimes[0].roleArn", "a role for a SANDBOX runtime")
        #expect(error("    networkConfiguration: {networkMode: PUBLIC}\n    roleArn: \"\(role)\"\n") == "runtimes[0].roleArn", "no roleCredentials entry")
        #expect(error("    networkConfiguration: {networkMode: PUBLIC}\n    roleArn: arn:aws:iam::1:role/x\n") == "runtimes[0].roleArn")
        #expect(error("", top: "roleCredentials:\n  - {roleArn: \"\(role)\", sharedCredentialsFile: relative}\n") == "roleCredentials[0].sharedCredentialsFile")
        #expect(error("", top: "region: US_EAST\n") == "region")
    }
}
