#if canImport(Glibc)
import Glibc
#endif
import CubicleImages
import CubicleLinux
import CubicleRPC
import Foundation
import Synchronization
import Testing
@testable import CubicleSandbox

let isRoot = getuid() == 0
let rootReason: Comment = "needs root: creates user namespaces, cgroups and mounts (CI runs as root)"

enum Paths {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    /// Products sit beside the test bundle.
    static let products: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        while dir.path != "/" && !FileManager.default.fileExists(atPath: dir.appendingPathComponent("cubicle-init").path) {
            dir = dir.deletingLastPathComponent()
        }
        return dir.path
    }()
    static var initBinary: String { products + "/cubicle-init" }
    /// Built with plain cc by `make test` (not SwiftPM, which would link it against the Swift runtime a
    /// sandbox does not have), statically: probes need nothing inside, so they run in image sandboxes too.
    static var probe: String { repo + "/.build/cubicle-probe" }
}

/// What a sandbox's root is: the host's /usr, /lib* and /etc files (bound read-only), or an image's layers.
enum RootKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case host, image
    var testDescription: String { rawValue }
}

/// The test image (Tests/images/make_oci_layout.py, a static busybox for its userland), pulled once per run
/// into a store under .build/ and shared by every test that launches image sandboxes.
enum TestImage {
    static let prepared = Mutex<Task<[String], any Error>?>(nil)

    /// Its layer directories, bottom first; nil (with the reason printed) where the host has no static busybox.
    static func layers() async throws -> [String]? {
        guard Files.exists("/bin/busybox") else {
            print("image root: skipped, no static busybox on this host (apt-get install busybox-static)")
            return nil
        }
        let task = prepared.withLock { t -> Task<[String], any Error> in
            if let t { return t }
            let made = Task {
                let dir = Paths.repo + "/.build/test-image"
                try? Files.removeTree(dir)
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
                p.arguments = [Paths.repo + "/Tests/images/make_oci_layout.py", dir + "/layout", "v1", "\(OCI.Platform.host.os)/\(OCI.Platform.host.architecture)"]
                try p.run()
                p.waitUntilExit()
                let store = try ImageStore(root: dir + "/store")
                let image = try await ImagePuller(store: store).pull("v1", as: "test", from: OCILayoutSource(directory: dir + "/layout"))
                return image.layers.map { store.layerPath($0) }
            }
            t = made
            return made
        }
        return try await task.value
    }
}

let defaultSeccomp: [UInt8] = try! SeccompProfile.load(path: Paths.repo + "/sandbox/seccomp/default.json").compile()

/// One test's private host: its own state directory and cgroup parent, removed afterwards even when the
/// test fails, so tests run in parallel and leave nothing for the next run.
final class TestHost: @unchecked Sendable {
    let stateDirectory: String
    let cgroupParent: String
    let config: SandboxHostConfig
    let launcher: SandboxLauncher
    let codeDirectory: String
    var sandboxes: [Sandbox] = []

    init(initPath: String = Paths.initBinary, uidRangeCount: Int = 4096, firstHostID: UInt32? = nil, yieldCPUToHost: SessionsCPUYield = .never,
         networkNamespacePool: Int = 0, forkServer: Bool? = nil) throws {
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        stateDirectory = "/tmp/cubicle-test-\(tag)"
        cgroupParent = "cubicle-test-\(tag)"
        var config = SandboxHostConfig(initPath: initPath, stateDirectory: stateDirectory, cgroupParent: cgroupParent)
        config.uidRangeCount = uidRangeCount
        config.sessionsYieldCPUToHost = yieldCPUToHost
        config.networkNamespacePool = networkNamespacePool
        // A stand-in init is no fork server; asking it to be one would only cost a failed handshake.
        config.initForkServer = forkServer ?? (initPath == Paths.initBinary)
        // Tests get their own id space, so parallel tests' range exhaustion checks cannot collide.
        config.firstHostID = firstHostID ?? (2_000_000_000 - UInt32.random(in: 0..<2000) * 65536 * 8)
        self.config = config
        launcher = SandboxLauncher(host: config)
        // The code directory: world-readable, with the probe in it, as an operator would lay one out.
        codeDirectory = stateDirectory + "-code"
        try FileManager.default.createDirectory(atPath: codeDirectory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        try FileManager.default.copyItem(atPath: Paths.probe, toPath: codeDirectory + "/cubicle-probe")
    }

    func spec(_ edit: (inout SandboxSpec) -> Void = { _ in }) -> SandboxSpec {
        var s = SandboxSpec(seccompProgram: defaultSeccomp)
        s.codeDirectory = codeDirectory
        s.limits = CgroupLimits(memoryBytes: 256 << 20, cpuQuotaMicros: 100_000, pids: 128)
        s.tmpBytes = 32 << 20
        edit(&s)
        return s
    }

    /// A sandbox with the root `kind` names; nil when this host cannot make image sandboxes (said why).
    func launch(_ kind: RootKind, _ edit: (inout SandboxSpec) -> Void = { _ in }) async throws -> Sandbox? {
        var layers: [String]?
        if kind == .image {
            guard let l = try await TestImage.layers() else { return nil }
            layers = l
        }
        return try await launch { spec in
            spec.imageLayers = layers
            edit(&spec)
        }
    }

    func launch(_ edit: (inout SandboxSpec) -> Void = { _ in }) async throws -> Sandbox {
        let s = try await launcher.launch(spec(edit))
        sandboxes.append(s)
        return s
    }

    /// The sessions' parent's cpu.idle, or nil (printed, for `test`) on a kernel before 5.15, which has none.
    func sessionsCPUIdlePath(test: String) -> String? {
        let path = "\(config.cgroupRoot)/\(config.cgroupVersion == .v1 ? "cpu/" : "")\(cgroupParent)/cpu.idle"
        if Files.exists(path) { return path }
        print("\(test): skipped, this kernel's cgroups have no cpu.idle (before 5.15)")
        return nil
    }

    /// Tears down every sandbox and removes this host's cgroup parents and directories.
    func cleanUp() async {
        for s in sandboxes { _ = await s.teardown() }
        launcher.shutdown()
        for d in Cgroup(version: config.cgroupVersion, root: config.cgroupRoot, path: cgroupParent).directories {
            rmdir(d)
        }
        try? Files.removeTree(stateDirectory)
        try? Files.removeTree(codeDirectory)
    }
}

/// Runs `body` with a fresh TestHost and always cleans it up.
func withHost<T>(_ make: () throws -> TestHost = { try TestHost() }, _ body: (TestHost) async throws -> T) async throws -> T {
    let host = try make()
    do {
        let r = try await body(host)
        await host.cleanUp()
        return r
    } catch {
        await host.cleanUp()
        throw error
    }
}

/// Reads a descriptor to its end (or `limit` bytes) and closes it.
func readAll(_ fd: Int32, limit: Int = 1 << 22) -> String {
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: 65536)
    while out.count < limit {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        out.append(contentsOf: buf[0..<n])
    }
    close(fd)
    return String(decoding: out, as: UTF8.self)
}

let sandboxEnv = ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/home/agent", "LANG=C.UTF-8"]

struct CommandResult {
    var stdout: String
    var stderr: String
    var exit: CommandExit
}

extension Sandbox {
    /// Runs `sh -c script` inside with the agent's identity and collects its output and exit.
    func sh(_ script: String, timeoutSeconds: Int = 30) async throws -> CommandResult {
        try await run(["/bin/sh", "-c", script], timeoutSeconds: timeoutSeconds)
    }

    static func readOffPool(_ fd: Int32) async -> String {
        await withCheckedContinuation { c in DispatchQueue.global().async { c.resume(returning: readAll(fd)) } }
    }

    func run(_ argv: [String], timeoutSeconds: Int = 30) async throws -> CommandResult {
        let p = try await runCommand(ProcessParams(argv: argv, env: sandboxEnv, cwd: "/home/agent"), timeoutSeconds: timeoutSeconds)
        // The blocking reads run on Dispatch's threads: on the cooperative pool (one thread per core) two
        // of them would stall every other task in this process until the command ends.
        async let out = Self.readOffPool(p.stdout)
        async let err = Self.readOffPool(p.stderr)
        let exit = await waitForCommand(pid: p.pid)
        return CommandResult(stdout: await out, stderr: await err, exit: exit)
    }
}
