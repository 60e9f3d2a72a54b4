#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import CubicleControlPlane
import CubicleAuth
import CubicleGateway
import CubicleStorage
import CubicleImages
import CubicleLinux
import CubicleNetwork
import CubicleOperators
import CubicleRuntimes
import CubicleSandbox
import CubicleSessions
import CubicleShells
import Hummingbird
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import UnixSignals
import Synchronization


struct Cubicled: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cubicled",
        abstract: "Serve the Amazon Bedrock AgentCore data plane with one isolated sandbox per runtime session.")

    @Option(name: .customLong("listen"), help: "Data-plane address, HOST:PORT.")
    var listen = "127.0.0.1:8080"

    @Option(name: .customLong("admin-socket"), help: "Operator API Unix socket (mode 0600; 0660 with --admin-group).")
    var adminSocket = "/run/cubicle/admin.sock"

    @Option(name: .customLong("admin-group"), help: "A group, by name or gid, whose members may use the admin socket besides root.")
    var adminGroup: String?

    @Option(name: .customLong("state-dir"), help: "Where session state lives; created if missing, emptied on exit.")
    var stateDir = "/run/cubicle"

    @Option(name: .customLong("config"), help: "YAML config file; without one the embedded `demo` runtime is served.")
    var config: String?

    @Option(name: .customLong("cgroup-parent"), help: "cgroup under which session cgroups are made.")
    var cgroupParent = "cubicle"

    @Flag(name: .customLong("cgroup-delegated"), help: "cgroup v2: this daemon's own cgroup was delegated to it (systemd Delegate=yes); it moves itself into <own>/daemon and makes session cgroups under <own>/sessions instead of --cgroup-parent.")
    var cgroupDelegated = false

    @Option(name: .customLong("first-host-uid"), help: "First host uid of the ranges mapped into sandboxes (65,536 per session).")
    var firstHostUID: UInt32 = 1_000_000

    @Option(name: .customLong("uid-lease-dir"), help: "Leases of host uid ranges, shared by every cubicled on this host.")
    var uidLeaseDir = "/run/cubicle-uid-leases"

    @Option(name: .customLong("init"), help: "Path of cubicle-init (default: beside cubicled).")
    var initPath: String?

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel = "info"

    @Option(name: .customLong("egress-interface"), help: "PUBLIC sessions' traffic leaves only through this interface (default: the interface of the default route).")
    var egressInterface: String?

    @Option(name: .customLong("dns-upstream"), help: "Resolver the session DNS asks, IPv4 ADDR or ADDR:PORT; repeatable (default: the host's resolv.conf).")
    var dnsUpstream: [String] = []

    @Option(name: .customLong("session-network"), help: "IPv4 range PUBLIC sessions get addresses from; its first address is their gateway, DNS and metadata endpoint. Unique per cubicled on a host.")
    var sessionNetwork = "10.213.0.0/16"

    @Option(name: .customLong("data-dir"), help: "Where what outlives cubicled lives: the runtime store (runtimes.db) and the image store (images/).")
    var dataDir = "/var/lib/cubicle"

    @Option(name: .customLong("store"), help: "Where runtimes made through the control plane are kept: sqlite:/PATH (default: sqlite:<data-dir>/runtimes.db) or postgres://USER[:PASSWORD]@HOST[:PORT]/DB, shared by a fleet.")
    var store: String?

    @Option(name: .customLong("account-id"), help: "The 12-digit account in runtime ARNs (default: the config's accountId, else 000000000000).")
    var accountID: String?

    @Option(name: .customLong("code-root"), help: "A host directory under which control-plane runtimes may name code directories (host:/DIR) and image layouts (oci:/DIR); repeatable. None by default.")
    var codeRoots: [String] = []

    @Option(name: .customLong("region"), help: "The region sessions are told (AWS_REGION) and the metadata endpoint reports (default: the config's, else us-east-1).")
    var region: String?

    @Option(name: .customLong("credentials"), help: "The principals file (YAML, root-owned, mode 0600): access keys whose SigV4 signatures are checked on every call, and what each principal may do. Without it, calls are accepted unsigned, and only on a loopback --listen.")
    var credentials: String?

    @Flag(name: .customLong("insecure-no-auth"), help: "Serve a --listen address other hosts can reach without --credentials: anyone who can connect can invoke agents and run commands in sessions. Put an authenticating proxy in front.")
    var insecureNoAuth = false

    func run() async throws {
        var logger = Logger(label: "cubicled")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        guard geteuid() == 0 else { throw StartupRefused("cubicled must run as root: it creates namespaces and cgroups") }
        guard let (host, port) = Self.parseAddress(listen) else {
            throw ValidationError("--listen must be HOST:PORT, was \(listen)")
        }
        // Without principals no caller is checked, and the data plane runs shell commands in sessions: only
        // this host's own users may reach it unless the operator says otherwise, in words that say what it costs.
        let loopback = LoopbackCongestion.isLoopback(host: host)
        var principals: Principals?
        if let credentials {
            do { principals = try Principals.load(path: credentials) } catch { throw StartupRefused("--credentials: \(error)") }
        } else if !insecureNoAuth && !loopback {
            throw StartupRefused("--listen \(listen) can be reached from other hosts, and without --credentials cubicled checks no caller: anyone who can connect could invoke agents and run commands in sessions. Give --credentials FILE (SigV4 principals), listen on 127.0.0.1 or ::1, or pass --insecure-no-auth to serve it anyway.")
        }
        let exeDirectory = Self.executableDirectory()
        // A daemon that refuses to start leaves no state directory of its own making behind.
        let madeStateDir = !Files.exists(stateDir)
        try Files.makeDirectories(stateDir, mode: 0o700)
        var serving = false
        defer { if !serving && madeStateDir { rmdir(stateDir) } }
        Self.raiseOpenFileLimit(logger: logger)

        var loaded: DaemonConfig
        if let config {
            let text: String
            do { text = try Files.read(config) } catch { throw StartupRefused("cannot read --config \(config): \(error)") }
            do { loaded = try DaemonConfig.parse(yaml: text) } catch { throw StartupRefused("\(config): \(error)") }
        } else {
            loaded = DaemonConfig.embedded(demoCodeDirectory: try Self.installDemoAgent(from: exeDirectory, stateDir: stateDir))
        }
        if let region { loaded.region = region }
        if let accountID {
            guard accountID.utf8.count == 12, accountID.allSatisfy(\.isNumber) else { throw ValidationError("--account-id must be 12 digits, was \(accountID)") }
            loaded.accountID = accountID
        }
        let daemonConfig = loaded
        let storeLocation = store ?? "sqlite:\(dataDir)/runtimes.db"
        guard let location = StoreLocation.parse(storeLocation) else {
            throw ValidationError("--store must be sqlite:/PATH or postgres://USER[:PASSWORD]@HOST[:PORT]/DB, was \(storeLocation)")
        }
        for root in codeRoots where !root.hasPrefix("/") { throw ValidationError("--code-root must be an absolute path, was \(root)") }
        // Sessions must run out of their own limits before the host runs out of file handles.
        let budget = daemonConfig.fileBudget
        do {
            if let raised = try FileBudget.ensure(maxSessions: budget.sessions, sessions: budget.limits) {
                logger.notice("raised fs.file-max so sessions hit their own limits before the host's file table",
                              metadata: ["from": "\(raised.from)", "to": "\(raised.to)", "sessions": "\(budget.sessions)"])
            }
        } catch {
            throw StartupRefused("fs.file-max is too low for \(budget.sessions) sessions of these runtimes and cannot be raised (\(error)): one session could fill the host's file table. Raise it (sysctl fs.file-max), or lower maxSessions or the runtimes' memory limits.")
        }
        let profile = try daemonConfig.seccompProfile.map { try SeccompProfile.load(path: $0) } ?? SeccompProfile.embeddedDefault
        let seccompProgram = try profile.compile()

        var sessionsCgroup = cgroupParent
        if cgroupDelegated {
            do { sessionsCgroup = try Cgroup.adoptDelegatedSubtree(membership: try Files.read("/proc/self/cgroup")) }
            catch { throw StartupRefused("--cgroup-delegated: \(error)") }
        }
        var hostConfig = SandboxHostConfig(initPath: initPath ?? exeDirectory + "/cubicle-init", stateDirectory: stateDir, cgroupParent: sessionsCgroup)
        hostConfig.firstHostID = firstHostUID
        hostConfig.uidLeaseDirectory = uidLeaseDir
        hostConfig.reconnectSeconds = Int64(daemonConfig.restartGraceSeconds)
        hostConfig.sessionsYieldCPUToHost = daemonConfig.sessionsYieldCPUToHost
        hostConfig.networkNamespacePool = daemonConfig.networkNamespacePool
        hostConfig.initForkServer = daemonConfig.initForkServer
        let launcher = SandboxLauncher(host: hostConfig)
        if let forkServer = launcher.forkServer, !forkServer.start() {
            logger.warning("sandboxes' inits will be exec'd one by one", metadata: ["reason": "\(forkServer.unavailableReason ?? "?")"])
        }
        let group = MultiThreadedEventLoopGroup.singleton
        for source in daemonConfig.roleCredentials {
            do { try source.check() } catch { throw StartupRefused("roleCredentials \(source.roleArn): \(error)") }
        }
        do {
            try Files.makeDirectories(dataDir, mode: 0o700)
            // Signed invocations' bodies past a megabyte wait here, unlinked, while their signature is checked.
            try Files.makeDirectories(dataDir + "/spool", mode: 0o700)
        } catch { throw StartupRefused("--data-dir \(dataDir): \(error)") }
        let authenticator = Authenticator(principals: principals, region: daemonConfig.region, accountID: daemonConfig.accountID)
        let admission = Admission(authenticator: authenticator, tokens: JWTVerifier(logger: logger), spoolDirectory: dataDir + "/spool")
        // Interactive shells, on both listeners; a data-plane shell waits this long for its client to return.
        let shells = ShellRegistry(group: group, graceSeconds: daemonConfig.shellReconnectSeconds)
        if let principals {
            logger.notice("callers are checked", metadata: ["credentials": "\(credentials ?? "")", "principals": "\(principals.principals.count)"])
        } else {
            logger.notice(loopback ? "no --credentials: accepting unsigned calls, because the listener is on loopback only"
                                   : "--insecure-no-auth: accepting unsigned calls from anyone who can reach the listener",
                          metadata: ["listen": "\(listen)"])
        }
        let imageStore: ImageStore
        do { imageStore = try ImageStore(root: dataDir + "/images") } catch { throw StartupRefused("--data-dir \(dataDir): \(error)") }
        let images = PreparedImages(store: imageStore, registries: daemonConfig.registries, logger: logger)
        let runtimeStore: any RuntimeStore
        do { runtimeStore = try await Self.openStore(location, logger: logger) } catch { throw StartupRefused("--store \(location): \(error)") }
        let catalog = RuntimeCatalog(declared: daemonConfig, now: Double(time(nil)))
        let storage: SessionStorage
        do { storage = try SessionStorage(root: dataDir + "/storage") } catch { throw StartupRefused("--data-dir \(dataDir): \(error)") }
        let manager = SessionManager(config: daemonConfig, launcher: launcher, seccompProgram: seccompProgram, group: group, logger: logger,
                                     images: images, catalog: catalog, storage: storage)
        // PUBLIC networking starts with the first PUBLIC runtime, declared or made through the control plane.
        let networkLogger = logger
        let networkStarter = NetworkStarter { [self] in
            let network = try await self.startNetwork(daemonConfig, group: group, logger: networkLogger)
            manager.attach(network)
            return network
        }
        var documentContext = RuntimeDocument.Context()
        documentContext.lifecycleMinimumSeconds = daemonConfig.lifecycleMinimumSeconds
        documentContext.mappedRoles = Set(daemonConfig.roleCredentials.map(\.roleArn))
        documentContext.codeRoots = codeRoots
        let controlPlane = ControlPlane(store: runtimeStore, catalog: catalog, sessions: manager, images: images,
                                        settings: .init(region: daemonConfig.region, accountID: daemonConfig.accountID, document: documentContext),
                                        logger: logger, ensureNetwork: { _ = try await networkStarter.start(adopting: false) })
        do { try await controlPlane.start(declared: daemonConfig.runtimes) } catch { throw StartupRefused("--store \(location): \(error)") }
        var network: SessionNetworking?
        if catalog.allConfigs.contains(where: { $0.networkMode == .public }) {
            do { network = try await networkStarter.start(adopting: true) } catch let e as StartupRefused { throw e } catch {
                throw StartupRefused("PUBLIC networking could not start: \(error)")
            }
        }
        // Every image a runtime names, pulled and unpacked before any session can ask for it.
        let uris = Set(catalog.allConfigs.compactMap(\.containerUri))
        if !uris.isEmpty { await images.prepare(uris) }
        // Sessions a killed predecessor left running are served again before any request can arrive.
        let (adopted, removed) = await manager.adoptLeftovers()
        network?.adoptionDone()
        if !adopted.isEmpty || removed > 0 {
            logger.notice("took over from a previous cubicled", metadata: ["adopted": "\(adopted.count)", "removed": "\(removed)"])
        }

        let access = AdminAccess(group: try adminGroup.map(Self.groupID))
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [.microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
                                                   .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500),
                                                   .seconds(1), .seconds(2.5), .seconds(5), .seconds(10), .seconds(30), .seconds(60)]
        MetricsSystem.bootstrap(factory)

        // systemd (Type=notify) hears READY=1 once both listeners accept, not when the process merely exists.
        let notify = ServiceNotify()
        let notifyLogger = logger
        let listening = ListenerCount(expected: 2) {
            do { try notify.ready(status: "serving \(daemonConfig.runtimes.count) runtime(s) on \(host):\(port)") }
            catch { notifyLogger.warning("sd_notify failed", metadata: ["error": "\(error)"]) }
        }

        // A stale socket from a daemon that did not exit cleanly would make the bind fail.
        if Files.isSocket(adminSocket) { unlink(adminSocket) }
        try Files.makeDirectories(Files.parent(adminSocket), mode: 0o755)
        let socketPath = adminSocket
        let adminLogger = logger
        let adminAPI = AdminAPI(sessions: manager, group: group, access: access, images: images, controlPlane: controlPlane, shells: shells)
        let admin = Application(
            responder: adminAPI,
            server: .init { responder in
                UpgradableHTTPChannel(responder: responder, idleTimeout: nil) { head, channel in await adminAPI.decideUpgrade(head, channel: channel) }
            },
            configuration: .init(address: .unixDomainSocket(path: adminSocket), serverName: "cubicled-admin"),
            onServerRunning: { _ in
                // The socket is made with the umask's mode; narrow it before anyone is told it exists.
                chmod(socketPath, access.group == nil ? 0o600 : 0o660)
                if let gid = access.group { chown(socketPath, 0, gid) }
                adminLogger.notice("admin socket ready", metadata: ["path": "\(socketPath)"])
                listening.oneReady()
            },
            eventLoopGroupProvider: .shared(group),
            logger: logger)

        let readyLogger = logger
        let app = Application(
            responder: DataPlane(sessions: manager, group: group, logger: logger, prometheus: registry,
                                 admission: admission,
                                 // It decides what code runs as which role on this host: with no callers checked, only
                                 // this host's own users may reach it.
                                 controlPlane: principals != nil || loopback ? controlPlane : nil,
                                 controlPlaneRefusal: "The control plane answers unsigned calls only on a loopback listener: give cubicled --credentials to serve it here"),
            server: .dataPlane(sessions: manager, admission: admission, shells: shells, logger: logger, idleTimeout: .nanoseconds(Int64(daemonConfig.clientIdleTimeoutSeconds * 1e9))),
            configuration: .init(address: .hostname(host, port: port), serverName: "cubicled"),
            onServerRunning: { channel in
                readyLogger.notice("cubicled ready", metadata: ["listen": "\(channel.localAddress.map { "\($0)" } ?? "?")",
                                                            "runtimes": "\(daemonConfig.runtimes.map(\.name))", "state_dir": "\(stateDir)"])
                listening.oneReady()
            },
            eventLoopGroupProvider: .shared(group),
            logger: logger)
        let sessionsService = SessionsService(manager: manager, stateDir: stateDir, host: hostConfig, adminSocket: adminSocket, notify: notify,
                                              images: images, controlPlane: controlPlane, configPath: config, logger: logger)
        let services = ServiceGroup(configuration: .init(
            // Shut down in reverse: sessions end first (cutting their in-flight streams, refusing new
            // sessions), then the listener drains what is left and stops.
            services: [.init(service: app), .init(service: admin), .init(service: sessionsService)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        serving = true
        do { try await services.run() } catch {
            await admission.tokens.shutdown()
            throw error
        }
        await admission.tokens.shutdown()
    }

    static func openStore(_ location: StoreLocation, logger: Logger) async throws -> any RuntimeStore {
        switch location {
        case .sqlite(let path): return try SQLiteRuntimeStore(path: path)
        case .postgres(let p): return try await PostgresRuntimeStore.connect(p, logger: logger)
        }
    }

    /// The network room, only once some runtime is PUBLIC: SANDBOX-only daemons touch no host networking.
    func startNetwork(_ config: DaemonConfig, group: any EventLoopGroup, logger: Logger) async throws -> SessionNetworking {
        guard let range = CIDR(sessionNetwork), case .v4 = range.base, range.prefix <= 29 else {
            throw ValidationError("--session-network must be an IPv4 CIDR of /29 or larger, was \(sessionNetwork)")
        }
        guard let egress = egressInterface ?? NetworkSettings.defaultRouteInterface() else {
            throw StartupRefused("PUBLIC runtimes need an egress interface: the host has no default route; pass --egress-interface")
        }
        var upstreams: [(IPAddress, Int)] = []
        for text in dnsUpstream {
            let (host, port) = Self.parseAddress(text).map { ($0.0, $0.1) } ?? (text, 53)
            guard let a = IPAddress(host), case .v4 = a else { throw ValidationError("--dns-upstream must be an IPv4 ADDR or ADDR:PORT, was \(text)") }
            upstreams.append((a, port))
        }
        if upstreams.isEmpty { upstreams = NetworkSettings.hostResolvers() }
        guard !upstreams.isEmpty else { throw StartupRefused("PUBLIC runtimes need a DNS upstream: /etc/resolv.conf names no IPv4 nameserver; pass --dns-upstream") }
        let tag = NetworkSettings.tag(forSessionNetwork: sessionNetwork)
        let settings = NetworkSettings(sessionNetwork: range, egressInterface: egress, dnsUpstreams: upstreams, tag: tag, region: config.region)
        do {
            let network = try await SessionNetworking(settings: settings, group: group, logger: logger)
            logger.notice("PUBLIC networking ready", metadata: ["egress": "\(egress)", "sessions": "\(range)", "gateway": "\(network.gateway)",
                                                                "table": "\(network.firewall.table)", "dns": "\(upstreams.map { "\($0.0):\($0.1)" })"])
            return network
        } catch {
            throw StartupRefused("PUBLIC networking could not start: \(error)")
        }
    }

    static func groupID(_ name: String) throws -> gid_t {
        if let gid = gid_t(name) { return gid }
        guard let entry = getgrnam(name) else { throw ValidationError("--admin-group: no group \(name)") }
        return entry.pointee.gr_gid
    }

    static func parseAddress(_ text: String) -> (String, Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host.isEmpty ? "0.0.0.0" : host, port)
    }

    static func executableDirectory() -> String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let path = n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
        return Files.parent(path)
    }

    /// The demo runtime's code directory holds only cubicle-demo-agent, copied from beside cubicled, so
    /// sandboxes see nothing else of the build.
    static func installDemoAgent(from exeDirectory: String, stateDir: String) throws -> String {
        let source = exeDirectory + "/cubicle-demo-agent"
        let directory = StateDirectory(stateDir).runtime("demo")
        do {
            let bytes = try Files.readBytes(source, limit: 256 << 20)
            try Files.makeDirectories(directory, mode: 0o755)
            try Files.writeAtomically(directory + "/cubicle-demo-agent", bytes, mode: 0o755)
        } catch {
            throw StartupRefused("cannot install the demo agent from \(source): \(error)")
        }
        return directory
    }
}

extension Cubicled {
    /// Each live session holds a handful of descriptors (control socket, agent connections, log pipes), so
    /// the usual soft limit of 1,024 would refuse sessions long before --maxSessions. Sandboxes set their own.
    static func raiseOpenFileLimit(logger: Logger) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        limit.rlim_cur = limit.rlim_max
        if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) != 0 {
            logger.warning("could not raise the open-file limit", metadata: ["errno": "\(errno)"])
        }
    }
}

/// Runs until graceful shutdown, then ends every session (after the listener has stopped accepting)
/// and removes what this daemon created.
struct SessionsService: Service {
    let manager: SessionManager
    let stateDir: String
    let host: SandboxHostConfig
    let adminSocket: String
    let notify: ServiceNotify
    let images: PreparedImages?
    let controlPlane: ControlPlane
    let configPath: String?
    let logger: Logger

    func run() async throws {
        await manager.startWarmPools()
        // SIGHUP: the config file's runtimes again; sessions of unchanged runtimes go on.
        let reloads = Task { [configPath, controlPlane, logger] in
            for await _ in await UnixSignalsSequence(trapping: .sighup) {
                guard let configPath else {
                    logger.notice("SIGHUP: no --config to reload")
                    continue
                }
                do {
                    let parsed = try DaemonConfig.parse(yaml: try Files.read(configPath))
                    let counts = await controlPlane.reload(declared: parsed.runtimes)
                    logger.notice("config reloaded", metadata: ["added": "\(counts.added)", "changed": "\(counts.changed)", "removed": "\(counts.removed)"])
                } catch {
                    logger.error("SIGHUP: config not reloaded, the running runtimes stay", metadata: ["error": "\(error)"])
                }
            }
        }
        defer { reloads.cancel() }
        // Session storage untouched for sessionStorageExpirySeconds (14 days) is removed, as AgentCore does.
        let expiry = manager.config.sessionStorageExpirySeconds
        let sweeps = Task { [manager, logger] in
            let every = UInt64(max(1, min(expiry / 4, 3600)))
            while !Task.isCancelled {
                if let removed = await manager.storage?.expire(now: Int(time(nil)), after: expiry), removed > 0 {
                    logger.notice("session storage expired", metadata: ["volumes": "\(removed)"])
                }
                try? await Task.sleep(nanoseconds: every * 1_000_000_000)
            }
        }
        defer { sweeps.cancel() }
        do { try manager.watchCPUThrottling() } catch {
            logger.warning("sessions stay at the host's CPU weight even when throttled", metadata: ["error": "\(error)"])
        }
        try? await gracefulShutdown()
        try? notify.stopping()
        let count = await manager.liveCount
        logger.notice("shutting down", metadata: ["sessions": "\(count)"])
        await controlPlane.shutdown()
        await manager.shutdown()
        manager.launcher.shutdown()
        // Every session has ended and released its link: the table goes too.
        manager.network?.shutdown()
        await images?.shutdown()
        unlink(adminSocket)
        StateDirectory(stateDir).removeAll()  // the root only if nothing else lives there
        for directory in Cgroup(version: host.cgroupVersion, root: host.cgroupRoot, path: host.cgroupParent).directories {
            rmdir(directory)
        }
        logger.notice("shutdown complete")
    }
}

/// Why cubicled will not start, said as itself (ArgumentParser prints it as `Error: …` and exits 1, so a
/// service manager or script sees a failure; CleanExit would have exited 0).
struct StartupRefused: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Calls `whenAll` once, when the last of `expected` listeners reports that it accepts connections.
final class ListenerCount: Sendable {
    private let remaining: Mutex<Int>
    private let whenAll: @Sendable () -> Void

    init(expected: Int, whenAll: @escaping @Sendable () -> Void) {
        remaining = Mutex(expected)
        self.whenAll = whenAll
    }

    func oneReady() {
        let last = remaining.withLock { count in
            count -= 1
            return count == 0
        }
        if last { whenAll() }
    }
}

/// Starts PUBLIC networking once, whoever asks first (the start, or a control-plane runtime's work);
/// later callers get the same result.
actor NetworkStarter {
    private let make: @Sendable () async throws -> SessionNetworking
    private var started: Task<SessionNetworking, any Error>?

    init(_ make: @escaping @Sendable () async throws -> SessionNetworking) { self.make = make }

    /// `adopting`: the daemon's start, which calls `adoptionDone` itself after taking over its predecessor's
    /// sessions; otherwise links are made at once.
    func start(adopting: Bool) async throws -> SessionNetworking {
        if let started { return try await started.value }
        let make = self.make
        let task = Task { try await make() }
        started = task
        do {
            let network = try await task.value
            if !adopting { network.adoptionDone() }
            return network
        } catch {
            started = nil  // a later runtime may try again (the operator may have fixed the cause)
            throw error
        }
    }
}
