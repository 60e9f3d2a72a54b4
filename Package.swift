// swift-tools-version:6.0
import PackageDescription

// Executables that run inside a sandbox see only the host's /usr, /lib* and /bin, never the toolchain's
// directory, so they carry the Swift runtime with them; linked whole, they also start without the dynamic
// loader. The demo agent dynamically linked against glibc took a fifth of the host's CPU in sustained
// session churn, most of it in its start (perf); static, scale_bench went from 100–107 to 130–147 sessions/s.
let staticExecutable: [LinkerSetting] = [.unsafeFlags(["-static-executable"])]

let package = Package(
    name: "cubicle",
    products: [
        .executable(name: "cubicled", targets: ["cubicled"]),
        .executable(name: "cubicle-init", targets: ["cubicle-init"]),
        .executable(name: "cubicle", targets: ["cubicle"]),
        .executable(name: "cubicle-demo-agent", targets: ["cubicle-demo-agent"]),
        .executable(name: "cubicle-sandbox-bench", targets: ["cubicle-sandbox-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-async-algorithms.git", from: "1.1.4"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/vapor/jwt-kit.git", from: "5.8.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
    ],
    targets: [
        // Only what Swift cannot do safely: clone/fork with pre-exec setup, SCM_RIGHTS, variadic ioctl/prctl.
        .target(name: "CCubicleShim"),
        .systemLibrary(name: "CLibseccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        .target(name: "CubicleLinux", dependencies: ["CCubicleShim"]),
        // A strict, bounded JSON value: no Foundation, so init and the demo agent can use it.
        .target(name: "CubicleJSON"),
        .target(name: "CubicleRPC", dependencies: ["CubicleLinux", "CubicleJSON"]),
        .target(name: "CubicleInit", dependencies: ["CubicleRPC", "CubicleLinux", "CCubicleShim"]),
        .executableTarget(name: "cubicle-init", dependencies: ["CubicleInit"], linkerSettings: staticExecutable),
        .target(name: "CubicleSandbox", dependencies: ["CubicleRPC", "CubicleLinux", "CCubicleShim", "CLibseccomp"],
                // sandbox/seccomp/default.json, compiled into the daemon so it needs no file at run time.
                resources: [.embedInCode("Resources/default-seccomp.json")]),
        // The AgentCore wire formats: routes, validation, error shapes, the event stream. No I/O.
        .target(name: "CubicleAgentCore", dependencies: ["CubicleJSON"]),
        // The one transport to an agent inside a sandbox: keep-alive HTTP/1.1 links driven on event loops,
        // with an async exchange over the same links for callers in tasks.
        .target(name: "CubicleAgentLink", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOWebSocket", package: "swift-nio"),
        ]),
        // Per-session networking: the egress policy as a pure value today; links, nftables, the session DNS and
        // the metadata endpoint with PUBLIC sessions.
        // The session DNS's wire format alone (no I/O), so the fuzzer builds it without the network room's
        // dependencies.
        .target(name: "CubicleDNSWire"),
        .systemLibrary(name: "CLibarchive", pkgConfig: "libarchive", providers: [.apt(["libarchive-dev"])]),
        // Container images: references, the content-addressed store, layers unpacked with libarchive.
        .target(name: "CubicleImages", dependencies: [
            "CLibarchive", "CubicleLinux", "CubicleJSON", "CubicleAgentCore",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .systemLibrary(name: "CNftables", pkgConfig: "libnftables", providers: [.apt(["libnftables-dev"])]),
        .target(name: "CubicleNetwork", dependencies: [
            "CCubicleShim", "CubicleLinux", "CNftables", "CubicleDNSWire", "CubicleJSON",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Session storage: a file system per session (an ext4 image on a loop device), kept across its
        // sandboxes.
        .target(name: "CubicleStorage", dependencies: ["CubicleLinux", "CCubicleShim", "CubicleJSON", .product(name: "Crypto", package: "swift-crypto")]),
        // Runtime definitions: the YAML config, the control plane's documents, versions and endpoints, and
        // the store that keeps them (SQLite embedded, PostgreSQL shared by a fleet).
        .target(name: "CubicleRuntimes", dependencies: [
            "CubicleSandbox", "CubicleAgentCore", "CubicleNetwork", "CubicleImages", "CubicleJSON",
            .product(name: "Yams", package: "Yams"),
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "PostgresNIO", package: "postgres-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        // The session registry, one supervisor per session, lifecycles, warm pools, adoption. NIO only for the
        // sandbox's pipes (logs, command output); HTTP is CubicleAgentLink's.
        .target(name: "CubicleSessions", dependencies: [
            "CubicleSandbox", "CubicleAgentCore", "CubicleRPC", "CubicleLinux", "CubicleAgentLink", "CubicleRuntimes", "CubicleNetwork", "CubicleImages",
            "CubicleStorage", "CCubicleShim",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "AsyncAlgorithms", package: "swift-async-algorithms"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        // The control plane's operations: runtimes, versions, endpoints and tags over the store, and the work
        // behind each status (images, code directories, networking, pools).
        .target(name: "CubicleControlPlane", dependencies: [
            "CubicleRuntimes", "CubicleSessions", "CubicleImages", "CubicleAgentCore", "CubicleJSON", "CubicleLinux", "CubicleSandbox",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HTTPTypes", package: "swift-http-types"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Who may call: SigV4 verification against the principals file, IAM-style permissions, and each
        // runtime's JWT authorizer (OIDC discovery, JWKS, claims).
        .target(name: "CubicleAuth", dependencies: [
            "CubicleAgentCore", "CubicleJSON",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "JWTKit", package: "jwt-kit"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "Yams", package: "Yams"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Interactive shells in sessions (a terminal per shell, kept across reconnects) and the WebSocket
        // upgrade both listeners serve them through.
        .target(name: "CubicleShells", dependencies: [
            "CubicleSessions", "CubicleSandbox", "CubicleRPC", "CubicleAgentCore", "CubicleAgentLink", "CCubicleShim",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOWebSocket", package: "swift-nio"),
            .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
            .product(name: "NIOHTTPTypesHTTP1", package: "swift-nio-extras"),
            .product(name: "Hummingbird", package: "hummingbird"),
        ]),
        .target(name: "CubicleGateway", dependencies: [
            "CubicleAuth", "CubicleSessions", "CubicleShells", "CubicleControlPlane", "CubicleAgentCore", "CubicleAgentLink", "CubicleRuntimes",
            .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
            .product(name: "NIOHTTPTypesHTTP1", package: "swift-nio-extras"),
            .product(name: "NIOWebSocket", package: "swift-nio"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "AsyncAlgorithms", package: "swift-async-algorithms"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // The operator API on the admin socket: sessions, logs, exec, stop, runtimes, events.
        .target(name: "CubicleOperators", dependencies: [
            "CubicleSessions", "CubicleRuntimes", "CubicleAgentCore", "CubicleSandbox", "CubicleLinux", "CubicleNetwork", "CubicleImages",
            "CubicleControlPlane", "CubicleStorage", "CubicleShells",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "AsyncAlgorithms", package: "swift-async-algorithms"),
        ]),
        // What the `cubicle` CLI does, apart from parsing its arguments: the HTTP client, tables, `top`.
        .target(name: "CubicleCLI", dependencies: ["CubicleJSON"]),
        .executableTarget(name: "cubicle", dependencies: [
            "CubicleCLI", "CubicleAgentCore", "CubicleAgentLink", "CubicleJSON",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOWebSocket", package: "swift-nio"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "cubicled", dependencies: [
            "CubicleGateway", "CubicleAuth", "CubicleStorage", "CubicleSessions", "CubicleRuntimes", "CubicleOperators", "CubicleControlPlane", "CubicleNetwork", "CubicleImages", "CubicleShells",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "cubicle-demo-agent", dependencies: ["CubicleJSON"], linkerSettings: staticExecutable),
        .executableTarget(name: "cubicle-sandbox-bench", dependencies: ["CubicleSandbox", "CubicleLinux", "CubicleRPC", "CubicleImages"], path: "Sources/Benchmarks/SandboxBench"),
        // libFuzzer targets (make fuzz builds them with -D CUBICLE_FUZZ -sanitize=fuzzer); plain builds replay a corpus.
        .target(name: "FuzzReplay", dependencies: ["CubicleLinux"], path: "Sources/Fuzz/Replay"),
        .executableTarget(name: "cubicle-fuzz-rpc-frames", dependencies: ["CubicleRPC", "FuzzReplay"], path: "Sources/Fuzz/RPCFrames"),
        .executableTarget(name: "cubicle-fuzz-event-stream", dependencies: ["CubicleAgentCore", "FuzzReplay"], path: "Sources/Fuzz/EventStream"),
        .executableTarget(name: "cubicle-fuzz-dns", dependencies: ["CubicleDNSWire", "FuzzReplay"], path: "Sources/Fuzz/DNS"),
        .executableTarget(name: "cubicle-fuzz-sigv4", dependencies: ["CubicleAgentCore", "FuzzReplay"], path: "Sources/Fuzz/SigV4"),
        .executableTarget(name: "cubicle-fuzz-validators", dependencies: ["CubicleAgentCore", "CubicleJSON", "FuzzReplay"], path: "Sources/Fuzz/Validators"),
        .testTarget(name: "CubicleRPCTests", dependencies: ["CubicleRPC"]),
        .testTarget(name: "CubicleSandboxTests", dependencies: ["CubicleSandbox", "CubicleRPC", "CubicleLinux", "CubicleImages", "CCubicleShim"]),
        .testTarget(name: "CubicleAgentCoreTests", dependencies: ["CubicleAgentCore", "CubicleJSON"]),
        .testTarget(name: "CubicleSessionsTests", dependencies: ["CubicleSessions", "CubicleRuntimes", "CubicleAgentCore", "CubicleSandbox", "CubicleLinux",
                                                           .product(name: "NIOPosix", package: "swift-nio"),
                                                           .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "CubicleAgentLinkTests", dependencies: ["CubicleAgentLink", .product(name: "Crypto", package: "swift-crypto"),
                                                            .product(name: "NIOPosix", package: "swift-nio")]),
        .testTarget(name: "CubicleGatewayTests", dependencies: ["CubicleGateway", "CubicleRuntimes", "CubicleAgentLink", "CubicleSessions", "CubicleAgentCore",
                                                          .product(name: "NIOEmbedded", package: "swift-nio"),
                                                          .product(name: "NIOHTTPTypes", package: "swift-nio-extras")]),
        .testTarget(name: "CubicleImagesTests", dependencies: ["CubicleImages", "CubicleLinux"]),
        .testTarget(name: "CubicleNetworkTests", dependencies: ["CubicleNetwork", "CubicleDNSWire"]),
        .testTarget(name: "CubicleCLITests", dependencies: ["CubicleCLI", "CubicleJSON"]),
        .testTarget(name: "CubicleAuthTests", dependencies: ["CubicleAuth", "CubicleAgentCore", "CubicleJSON",
                                                       .product(name: "Crypto", package: "swift-crypto"),
                                                       .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "CubicleStorageTests", dependencies: ["CubicleStorage", "CubicleLinux"]),
        .testTarget(name: "CubicleRuntimesTests", dependencies: ["CubicleRuntimes", "CubicleAgentCore", "CubicleJSON"]),
    ]
)
