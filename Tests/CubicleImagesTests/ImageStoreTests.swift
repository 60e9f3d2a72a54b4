#if canImport(Glibc)
import Glibc
#endif
@testable import CubicleImages
import CubicleLinux
import Foundation
import Synchronization
import Testing

/// The store and the puller against OCI layouts written by Tests/images/make_oci_layout.py.
@Suite(.serialized) struct ImageStoreTests {
    let dir = "/tmp/cubicle-store-test-\(UInt32.random(in: 0...UInt32.max))"

    func layout(_ name: String, platforms: String) throws -> String {
        let path = "\(dir)/\(name)"
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("images/make_oci_layout.py").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = [script, path, "v1", platforms]
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0)
        return path
    }

    func store() throws -> ImageStore { try ImageStore(root: dir + "/store") }

    @Test func anImageFromALayoutIsVerifiedUnpackedAndRecorded() async throws {
        defer { try? Files.removeTree(dir) }
        let source = OCILayoutSource(directory: try layout("single", platforms: "linux/amd64"))
        let s = try store()
        let image = try await ImagePuller(store: s, platform: OCI.Platform(os: "linux", architecture: "amd64"))
            .pull("v1", as: "oci:single:v1", from: source)
        #expect(image.layers.count == 2 && s.image("oci:single:v1") == image)
        let one = s.layerPath(image.layers[0]), two = s.layerPath(image.layers[1])
        #expect(try Files.read(one + "/etc/os-release") == "ID=cubicle-test\n")
        var st = stat()
        #expect(lstat(one + "/srv/note", &st) == 0 && st.st_uid == 1000 && st.st_mode & 0o777 == 0o600)
        #expect(lstat(two + "/etc/motd", &st) == 0 && st.st_mode & S_IFMT == S_IFCHR, "layer two's whiteout")
        let config = try OCI.ImageConfig(try s.readVerified(image.config))
        #expect(config.entrypoint == ["/usr/bin/hello"] && config.cmd == ["--flag"] && config.workingDir == "/srv" && config.user == "worker")
        // The image's User, by name through its own /etc/passwd; root, unknown names and foreign ids are not.
        let layers = image.layers.map { s.layerPath($0) }
        #expect(OCI.user("worker", layers: layers).map { [$0.uid, $0.gid] } == [1500, 1500])
        #expect(OCI.user("1200:1300", layers: layers).map { [$0.uid, $0.gid] } == [1200, 1300])
        #expect(OCI.user("agent:nogroup", layers: layers).map { [$0.uid, $0.gid] } == [1000, 1000], "a group the image does not name: the user's own id")
        for none in ["root", "0", "0:0", "nobody-here", "70000", ""] { #expect(OCI.user(none, layers: layers) == nil, "\(none)") }
        #expect(config.env.contains("GREETING=hi"))
        #expect(lstat(dir + "/store", &st) == 0 && st.st_mode & 0o777 == 0o700, "the store is root's alone")
        #expect(try Files.listDirectory(dir + "/store/tmp").isEmpty)
        // Pulling again downloads nothing and unpacks nothing: the same record.
        #expect(try await ImagePuller(store: s, platform: .init(os: "linux", architecture: "amd64")).pull("v1", as: "oci:single:v1", from: source) == image)
    }

    @Test func anIndexGivesThisHostsPlatformOrNamesTheOnesItHas() async throws {
        defer { try? Files.removeTree(dir) }
        let multi = OCILayoutSource(directory: try layout("multi", platforms: "linux/amd64,linux/arm64"))
        let s = try store()
        let arm = try await ImagePuller(store: s, platform: .init(os: "linux", architecture: "arm64")).pull("v1", as: "arm", from: multi)
        let amd = try await ImagePuller(store: s, platform: .init(os: "linux", architecture: "amd64")).pull("v1", as: "amd", from: multi)
        #expect(arm.manifest != amd.manifest && arm.layers == amd.layers, "one manifest per platform, the layers shared and stored once")
        let armOnly = OCILayoutSource(directory: try layout("armonly", platforms: "linux/arm64"))
        let error = await #expect(throws: OCI.Failure.self) {
            try await ImagePuller(store: s, platform: .init(os: "linux", architecture: "amd64")).pull("v1", as: "x", from: armOnly)
        }
        #expect(error?.message == "x is an image for linux/arm64, not for this host (linux/amd64)")
        let s390 = await #expect(throws: OCI.Failure.self) {
            try await ImagePuller(store: s, platform: .init(os: "linux", architecture: "s390x")).pull("v1", as: "y", from: multi)
        }
        #expect(s390?.message == "no image for linux/s390x in this index; it offers linux/amd64, linux/arm64")
        #expect(s.image("x") == nil && s.image("y") == nil)
    }

    @Test func aTamperedBlobIsRefusedAndNothingOfItIsUsed() async throws {
        defer { try? Files.removeTree(dir) }
        let path = try layout("tampered", platforms: "linux/amd64")
        // Flip a byte of a layer (a gzip blob) in place: its name still claims the old digest.
        let blobs = try Files.listDirectory(path + "/blobs/sha256").map { path + "/blobs/sha256/" + $0 }
        let victim = try #require(blobs.first { (try? Files.readBytes($0, limit: 64 << 20).prefix(2)) == [0x1F, 0x8B] })
        var bytes = try Files.readBytes(victim, limit: 64 << 20)
        bytes[bytes.count / 2] ^= 0xFF
        try Files.writeAtomically(victim, bytes, mode: 0o644, durable: false)
        let s = try store()
        await #expect(throws: Digest.Failure.self) {
            try await ImagePuller(store: s, platform: .init(os: "linux", architecture: "amd64")).pull("v1", as: "t", from: OCILayoutSource(directory: path))
        }
        let victimHex = String(victim.split(separator: "/").last!)
        #expect(!Files.exists(dir + "/store/blobs/sha256/" + victimHex) && !Files.exists(dir + "/store/layers/" + victimHex))
        let left = try Files.listDirectory(dir + "/store/tmp")
        #expect(s.image("t") == nil && left.isEmpty)
    }

    @Test func aTamperedManifestIsRefusedBeforeItIsParsed() async throws {
        defer { try? Files.removeTree(dir) }
        let path = try layout("tamperedmanifest", platforms: "linux/amd64")
        let blobs = try Files.listDirectory(path + "/blobs/sha256").map { path + "/blobs/sha256/" + $0 }
        // The manifest, not the config (which names "config" and "layers" too): only a manifest has a schemaVersion.
        let manifest = try #require(blobs.first { (try? Files.read($0, limit: 64 << 20)).map { $0.contains("\"schemaVersion\"") && $0.contains("\"layers\"") } == true })
        try Files.writeAtomically(manifest, try Files.read(manifest).replacingOccurrences(of: "tar+gzip", with: "tar+gzip "), mode: 0o644, durable: false)
        await #expect(throws: Digest.Failure.self) {
            try await ImagePuller(store: try store(), platform: .init(os: "linux", architecture: "amd64")).pull("v1", as: "m", from: OCILayoutSource(directory: path))
        }
    }

    /// Whatever an interrupted pull left in tmp/ is gone when the store opens again, and never used.
    @Test func anInterruptedPullLeavesNothingHalfUsed() throws {
        defer { try? Files.removeTree(dir) }
        _ = try store()
        try Files.makeDirectories(dir + "/store/tmp/layer-123/usr", mode: 0o755)
        try Files.write(dir + "/store/tmp/blob-456", "half a blob", flags: O_WRONLY | O_CREAT | O_TRUNC)
        _ = try store()
        #expect(try Files.listDirectory(dir + "/store/tmp").isEmpty)
    }

    /// Two pulls of one image at once share one download: every blob is fetched once.
    @Test func concurrentPullsOfOneImageShareOneDownload() async throws {
        defer { try? Files.removeTree(dir) }
        final class Counting: ImageSource, @unchecked Sendable {
            let inner: OCILayoutSource
            let fetched = Mutex<[String]>([])
            init(_ inner: OCILayoutSource) { self.inner = inner }
            func manifest(_ reference: String) async throws -> (bytes: [UInt8], mediaType: String?, digest: Digest?) {
                try await Task.sleep(for: .milliseconds(50))
                return try await inner.manifest(reference)
            }
            func fetchBlob(_ digest: Digest, size: Int64, to path: String) async throws {
                fetched.withLock { $0.append(digest.hex) }
                try await inner.fetchBlob(digest, size: size, to: path)
            }
        }
        let source = Counting(OCILayoutSource(directory: try layout("shared", platforms: "linux/amd64")))
        let puller = ImagePuller(store: try store(), platform: .init(os: "linux", architecture: "amd64"))
        async let a = puller.pull("v1", as: "same", from: source)
        async let b = puller.pull("v1", as: "same", from: source)
        let (x, y) = try await (a, b)
        #expect(x == y)
        let fetched = source.fetched.withLock { $0 }
        #expect(fetched.count == 3 && Set(fetched).count == 3, "config and two layers, once each: \(fetched)")
    }

    /// `docker save` archives, as Docker wrote them before version 25 (manifest.json, uncompressed layer tars)
    /// and as a tar of an OCI layout (Docker 25 and later, `skopeo copy ... oci-archive:`).
    @Test func archivesLoadAsTheirLayoutsDo() async throws {
        defer { try? Files.removeTree(dir) }
        let layoutPath = try layout("archived", platforms: "linux/amd64")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = ["-c", """
        import gzip, io, json, os, sys, tarfile
        layout, legacy, oci = sys.argv[1:4]
        blob = lambda d: open(os.path.join(layout, "blobs", "sha256", d.split(":")[1]), "rb").read()
        manifest = json.loads(blob(json.load(open(os.path.join(layout, "index.json")))["manifests"][0]["digest"]))
        with tarfile.open(legacy, "w") as t:
            def add(name, data):
                i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))
            config = manifest["config"]["digest"].split(":")[1] + ".json"
            add(config, blob(manifest["config"]["digest"]))
            layers = []
            for n, l in enumerate(manifest["layers"]):
                add(f"{n}/layer.tar", gzip.decompress(blob(l["digest"]))); layers.append(f"{n}/layer.tar")
            add("manifest.json", json.dumps([{"Config": config, "RepoTags": ["test/archived:v1"], "Layers": layers}]).encode())
        with tarfile.open(oci, "w") as t:
            t.add(layout, arcname=".")
        """, layoutPath, dir + "/legacy.tar", dir + "/oci.tar"]
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0)
        let s = try store()
        let puller = ImagePuller(store: s, platform: .init(os: "linux", architecture: "amd64"))
        let legacySource = try ArchiveSource(archive: dir + "/legacy.tar", tag: "v1", store: s)
        let legacy = try await puller.pull("v1", as: "docker-archive", from: legacySource)
        legacySource.close()
        let ociSource = try ArchiveSource(archive: dir + "/oci.tar", tag: "v1", store: s)
        let oci = try await puller.pull("v1", as: "oci-archive", from: ociSource)
        ociSource.close()
        #expect(legacy.layers.count == 2 && oci.layers.count == 2)
        #expect(try Files.read(s.layerPath(legacy.layers[0]) + "/etc/os-release") == "ID=cubicle-test\n")
        #expect(try Files.read(s.layerPath(oci.layers[1]) + "/srv/data") == "layer two\n")
        #expect(try OCI.ImageConfig(try s.readVerified(legacy.config)).user == "worker")
        #expect(try Files.listDirectory(dir + "/store/tmp").isEmpty, "the unpacked archives are gone")
        #expect(throws: OCI.Failure.self) { try ArchiveSource(archive: dir + "/legacy.tar", tag: "v9", store: s) }
    }

    @Test func pruneKeepsWhatRemainingImagesUse() async throws {
        defer { try? Files.removeTree(dir) }
        let s = try store()
        let source = OCILayoutSource(directory: try layout("p", platforms: "linux/amd64"))
        let puller = ImagePuller(store: s, platform: .init(os: "linux", architecture: "amd64"))
        let a = try await puller.pull("v1", as: "a", from: source)
        _ = try await puller.pull("v1", as: "b", from: source)
        #expect(try s.prune(keeping: ["b"]) == ["a"])
        #expect(Files.exists(s.layerPath(a.layers[0])), "b uses the same layers")
        #expect(try s.prune(keeping: []) == ["b"])
        let blobs = try Files.listDirectory(dir + "/store/blobs/sha256")
        #expect(!Files.exists(s.layerPath(a.layers[0])) && blobs.isEmpty)
    }

    @Test func referencesReadAsDockerReadsThem() throws {
        let r = try ImageReference("python:3.12-slim")
        #expect(r.registry == "docker.io" && r.repository == "library/python" && r.tag == "3.12-slim")
        let local = try ImageReference("127.0.0.1:5000/agents/tutor@sha256:" + String(repeating: "a", count: 64))
        #expect(local.registry == "127.0.0.1:5000" && local.repository == "agents/tutor" && local.tag == nil && local.manifestReference.hasPrefix("sha256:"))
        #expect(try ImageReference("localhost/x").registry == "localhost")
        #expect(try ImageReference("ghcr.io/org/app").tag == "latest")
        for bad in ["", "UPPER/case", "a//b", "x:bad tag", "x@sha256:short", "host:99999/x", "x:" + String(repeating: "t", count: 129)] {
            #expect(throws: ImageReference.Failure.self, "\(bad)") { try ImageReference(bad) }
        }
    }
}
