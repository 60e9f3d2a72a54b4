#if canImport(Glibc)
import Glibc
#endif
import AsyncHTTPClient
@testable import CubicleImages
import CubicleLinux
import Foundation
import Testing

/// Pulls from a real registry: Debian's docker-registry (the CNCF distribution registry) on a loopback port
/// of its own, images pushed with skopeo from layouts written by Tests/images/make_oci_layout.py.
@Suite(.serialized) struct RegistryPullTests {
    let dir = "/tmp/cubicle-registry-test-\(UInt32.random(in: 0...UInt32.max))"

    final class Registry {
        let process: Process
        let port: Int
        init(dir: String) throws {
            // A port the kernel picked and released; the registry binds it next (loopback, nothing else here binds it).
            let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var sin = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: 0, sin_addr: in_addr(s_addr: UInt32(0x7F00_0001).bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, len) } }
            _ = withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) } }
            port = Int(UInt16(bigEndian: sin.sin_port))
            close(s)
            try Files.makeDirectories(dir + "/registry", mode: 0o700)
            try Files.write(dir + "/registry.yml", """
            version: 0.1
            log: {level: error}
            storage: {filesystem: {rootdirectory: \(dir)/registry}, delete: {enabled: true}}
            http: {addr: "127.0.0.1:\(port)"}
            """, flags: O_WRONLY | O_CREAT | O_TRUNC)
            process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/docker-registry")
            process.arguments = ["serve", dir + "/registry.yml"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            for _ in 0..<200 {
                let c = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                var a = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: UInt16(port).bigEndian, sin_addr: in_addr(s_addr: UInt32(0x7F00_0001).bigEndian), sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
                let ok = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(c, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
                close(c)
                if ok { return }
                usleep(25_000)
            }
            throw SystemError("docker-registry did not listen on \(port)", errno: ETIMEDOUT)
        }
        deinit { process.terminate(); process.waitUntilExit() }
    }

    func run(_ argv: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "\(argv.joined(separator: " ")) failed")
    }

    /// A layout for `platforms`, pushed as `repo:v1` (every platform of it).
    func push(_ registry: Registry, repo: String, platforms: String) throws {
        let layout = "\(dir)/\(repo.replacingOccurrences(of: "/", with: "-"))"
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("images/make_oci_layout.py").path
        try run(["/usr/bin/python3", script, layout, "v1", platforms])
        try run(["/usr/bin/skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", "oci:\(layout):v1", "docker://127.0.0.1:\(registry.port)/\(repo):v1"])
    }

    func pull(_ text: String, registry: Registry, platform: String = "amd64", store: ImageStore? = nil) async throws -> (ImageStore.Image, ImageStore) {
        let s = try store ?? ImageStore(root: dir + "/store")
        let reference = try ImageReference(text)
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        do {
            let source = RegistrySource(reference: reference, access: RegistryAccess(host: "127.0.0.1:\(registry.port)", insecure: true), client: client)
            let image = try await ImagePuller(store: s, platform: .init(os: "linux", architecture: platform))
                .pull(reference.manifestReference, as: text, from: source, pinned: reference.digest)
            try await client.shutdown()
            return (image, s)
        } catch {
            try await client.shutdown()
            throw error
        }
    }

    @Test func aMultiPlatformImageIsPulledForThisHostAndPinnedByDigest() async throws {
        guard Files.exists("/usr/bin/docker-registry"), Files.exists("/usr/bin/skopeo") else {
            print("skipped: docker-registry or skopeo is not installed (apt-get install docker-registry skopeo)")
            return
        }
        defer { try? Files.removeTree(dir) }
        let registry = try Registry(dir: dir)
        try push(registry, repo: "agents/multi", platforms: "linux/amd64,linux/arm64")
        let (amd, store) = try await pull("127.0.0.1:\(registry.port)/agents/multi:v1", registry: registry)
        let (arm, _) = try await pull("127.0.0.1:\(registry.port)/agents/multi:v1", registry: registry, platform: "arm64", store: store)
        #expect(amd.manifest != arm.manifest && amd.layers == arm.layers)
        #expect(try Files.read(store.layerPath(amd.layers[0]) + "/etc/os-release") == "ID=cubicle-test\n")
        // Pinned by the platform manifest's digest: the same image; by a digest the registry does not have: an error.
        let (pinned, _) = try await pull("127.0.0.1:\(registry.port)/agents/multi@\(amd.manifest)", registry: registry, store: store)
        #expect(pinned.manifest == amd.manifest && pinned.layers == amd.layers)
        let missing = "sha256:" + String(repeating: "0", count: 64)
        await #expect(throws: RegistrySource.Failure(message: "127.0.0.1:\(registry.port)/agents/multi:\(missing) not found in the registry")) {
            _ = try await pull("127.0.0.1:\(registry.port)/agents/multi@\(missing)", registry: registry, store: store)
        }
        await #expect(throws: RegistrySource.Failure(message: "127.0.0.1:\(registry.port)/agents/multi:v2 not found in the registry")) {
            _ = try await pull("127.0.0.1:\(registry.port)/agents/multi:v2", registry: registry, store: store)
        }
        await #expect(throws: OCI.Failure("no image for linux/s390x in this index; it offers linux/amd64, linux/arm64")) {
            _ = try await pull("127.0.0.1:\(registry.port)/agents/multi:v1", registry: registry, platform: "s390x", store: store)
        }
    }

    @Test func challengesAndDockerConfigsParse() {
        let (scheme, p) = RegistrySource.parseChallenge(#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull""#)
        #expect(scheme == "bearer" && p == ["realm": "https://auth.example.com/token", "service": "registry.example.com", "scope": "repository:a/b:pull"])
        #expect(RegistrySource.parseChallenge(#"Basic realm="Registry""#).0 == "basic")
        let access = RegistryAccess.dockerConfig(#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="}, "127.0.0.1:5000": {"auth": "YTpi"}}}"#)
        #expect(access.contains(RegistryAccess(host: "index.docker.io", username: "user", password: "pa:ss")))
        #expect(access.contains(RegistryAccess(host: "127.0.0.1:5000", username: "a", password: "b")))
    }
}
