import CubicleAgentCore
import CubicleSandbox
import CubicleSessions
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
            limits: {memory: 256MiB, cpus: 0.5, pids: 64, tmpfs: 32M}
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
