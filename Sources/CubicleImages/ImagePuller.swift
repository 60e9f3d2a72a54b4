#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import CubicleLinux
import Synchronization

/// Where an image's documents and blobs come from: a registry, an OCI layout directory, or an archive.
public protocol ImageSource: Sendable {
    /// The manifest or index that `reference` (a tag or a digest) names, its media type if known, and the
    /// digest the source says it has (a layout's index entry, a registry's Docker-Content-Digest), if any.
    func manifest(_ reference: String) async throws -> (bytes: [UInt8], mediaType: String?, digest: Digest?)
    /// Writes the blob `digest` names to `path` (a new file); the store verifies it.
    func fetchBlob(_ digest: Digest, size: Int64, to path: String) async throws
}

/// Brings an image into the store from a source: the manifest (an index resolved to this host's platform),
/// the config and every layer not there yet, each verified against its digest before it is used, then the
/// layers unpacked once per digest, and last the image's record. Pulls of one name share one task.
public final class ImagePuller: Sendable {
    public let store: ImageStore
    public let platform: OCI.Platform
    private let inFlight = Mutex<[String: Task<ImageStore.Image, any Error>]>([:])

    public init(store: ImageStore, platform: OCI.Platform = .host) {
        self.store = store
        self.platform = platform
    }

    /// Pulls `reference` from `source` and records it as `name` (what the runtime's containerUri says).
    public func pull(_ reference: String, as name: String, from source: some ImageSource, pinned: Digest? = nil) async throws -> ImageStore.Image {
        let task = inFlight.withLock { running -> Task<ImageStore.Image, any Error> in
            if let t = running[name] { return t }
            let t = Task { try await self.fetch(reference, as: name, from: source, pinned: pinned) }
            running[name] = t
            return t
        }
        defer { inFlight.withLock { _ = $0.removeValue(forKey: name) } }
        return try await task.value
    }

    private func fetch(_ reference: String, as name: String, from source: some ImageSource, pinned: Digest?) async throws -> ImageStore.Image {
        var (bytes, type, claimed) = try await source.manifest(reference)
        var manifestDigest = Digest.of(bytes)
        for expected in [pinned, claimed, try? Digest(reference)].compactMap({ $0 }) where expected != manifestDigest {
            throw Digest.Failure.mismatch(expected: expected.description, actual: manifestDigest.description, what: "manifest of \(name)")
        }
        try keep(bytes, as: manifestDigest)
        var document = try OCI.document(bytes, mediaType: type)
        if case .index(let entries) = document {
            let chosen = try OCI.choose(entries, for: platform)
            (bytes, type, _) = try await source.manifest(chosen.digest.description)
            guard Digest.of(bytes) == chosen.digest else {
                throw Digest.Failure.mismatch(expected: chosen.digest.description, actual: Digest.of(bytes).description, what: "manifest for \(platform)")
            }
            manifestDigest = chosen.digest
            try keep(bytes, as: manifestDigest)
            document = try OCI.document(bytes, mediaType: chosen.mediaType.isEmpty ? type : chosen.mediaType)
        }
        guard case .manifest(let config, let layers) = document else { throw OCI.Failure("an index inside an index") }
        try await fetchIfMissing(config, from: source, what: "config of \(name)")
        let imageConfig = try OCI.ImageConfig(try store.readVerified(config.digest))
        if let p = imageConfig.platform, p.os != platform.os || p.architecture != platform.architecture {
            throw OCI.Failure("\(name) is an image for \(p), not for this host (\(platform))")
        }
        for (i, layer) in layers.enumerated() { try await fetchIfMissing(layer, from: source, what: "layer \(i) of \(name)") }
        for layer in layers { try store.unpackLayer(layer.digest) }
        let image = ImageStore.Image(reference: name, manifest: manifestDigest, config: config.digest, layers: layers.map(\.digest),
                                     size: Int64(bytes.count) + config.size + layers.reduce(0) { $0 + $1.size })
        try store.record(image)
        return image
    }

    private func keep(_ bytes: [UInt8], as digest: Digest) throws {
        guard !store.hasBlob(digest) else { return }
        let path = store.temporary("manifest")
        try Files.writeAtomically(path, bytes, mode: 0o600, durable: false)
        try store.commitBlob(from: path, as: digest, what: "manifest")
    }

    private func fetchIfMissing(_ d: OCI.Descriptor, from source: some ImageSource, what: String) async throws {
        guard !store.hasBlob(d.digest) else { return }
        let path = store.temporary("blob")
        do {
            try await source.fetchBlob(d.digest, size: d.size, to: path)
            var st = stat()
            guard stat(path, &st) == 0, Int64(st.st_size) == d.size else {
                throw OCI.Failure("\(what): \(Int64(st.st_size)) bytes, its descriptor says \(d.size)")
            }
            try store.commitBlob(from: path, as: d.digest, what: what)
        } catch {
            unlink(path)
            throw error
        }
    }
}

/// An OCI image layout directory (`oci:PATH[:TAG]`, what `skopeo copy ... oci:` and `docker save` since
/// Docker 25 write), for hosts without a registry. Its index.json is read as any other index; a tag picks the
/// entry annotated `org.opencontainers.image.ref.name`.
public struct OCILayoutSource: ImageSource {
    public let directory: String

    public init(directory: String) { self.directory = directory }

    public func manifest(_ reference: String) async throws -> (bytes: [UInt8], mediaType: String?, digest: Digest?) {
        if let d = try? Digest(reference) { return (try blob(d, limit: OCI.maxDocumentBytes), nil, d) }
        let index = try Files.readBytes(directory + "/index.json", limit: OCI.maxDocumentBytes)
        guard case .index(let entries) = try OCI.document(index, mediaType: OCI.indexTypes.first) else { throw OCI.Failure("index.json is not an index") }
        let named = entries.filter { $0.annotations["org.opencontainers.image.ref.name"] == reference }
        guard let entry = named.first ?? (entries.count == 1 && reference == "latest" ? entries.first : nil) else {
            let tags = entries.compactMap { $0.annotations["org.opencontainers.image.ref.name"] }
            throw OCI.Failure("no image tagged \(reference) in \(directory) (it has \(tags.isEmpty ? "no tags" : tags.joined(separator: ", ")))")
        }
        return (try blob(entry.digest, limit: OCI.maxDocumentBytes), entry.mediaType, entry.digest)
    }

    public func fetchBlob(_ digest: Digest, size: Int64, to path: String) async throws {
        try Self.copy("\(directory)/blobs/sha256/\(digest.hex)", to: path, atMost: size)
    }

    /// Copies a file in the kernel (sendfile), never more than `atMost` bytes (one more, and the
    /// store's size check refuses it).
    static func copy(_ source: String, to path: String, atMost: Int64) throws {
        let from = open(source, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard from >= 0 else { throw SystemError.lastError("open \(source)") }
        defer { close(from) }
        let to = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard to >= 0 else { throw SystemError.lastError("create \(path)") }
        defer { close(to) }
        var left = atMost + 1
        while left > 0 {
            let n = sendfile(to, from, nil, Int(min(left, 1 << 30)))
            if n < 0 { if errno == EINTR { continue }; throw SystemError.lastError("copy \(source)") }
            if n == 0 { break }
            left -= Int64(n)
        }
    }

    private func blob(_ d: Digest, limit: Int) throws -> [UInt8] {
        try Files.readBytes("\(directory)/blobs/sha256/\(d.hex)", limit: limit)
    }
}

/// A `docker save` archive (`docker-archive:PATH[:TAG]`) or a tar of an OCI layout (`oci-archive:PATH[:TAG]`),
/// for hosts without a registry. The archive is unpacked into the store's tmp/ under the same rules as a layer
/// (it is as untrusted), then read as a layout when it is one (Docker 25 and later write both), or else
/// through its manifest.json (the format before): the config and each layer tar named there, their digests
/// computed, under Docker's schema 2 media types. `close` removes what was unpacked.
public final class ArchiveSource: ImageSource {
    let directory: String
    let layout: OCILayoutSource?
    private let synthetic: (manifest: [UInt8], files: [Digest: String])?

    public init(archive: String, tag: String?, store: ImageStore) throws {
        directory = store.temporary("archive")
        try Files.makeDirectories(directory, mode: 0o700)
        do {
            var limits = LayerUnpacker.Limits()
            limits.maxLayerBytes = 64 << 30
            try LayerUnpacker(limits: limits).unpack(archivePath: archive, into: directory)
            if Files.exists(directory + "/index.json") {
                layout = OCILayoutSource(directory: directory)
                synthetic = nil
                return
            }
            layout = nil
            synthetic = try Self.legacy(directory, tag: tag)
        } catch {
            try? Files.removeTree(directory)
            throw error
        }
    }

    public func close() { try? Files.removeTree(directory) }

    public func manifest(_ reference: String) async throws -> (bytes: [UInt8], mediaType: String?, digest: Digest?) {
        if let layout { return try await layout.manifest(reference) }
        let bytes = synthetic!.manifest
        return (bytes, "application/vnd.docker.distribution.manifest.v2+json", Digest.of(bytes))
    }

    public func fetchBlob(_ digest: Digest, size: Int64, to path: String) async throws {
        if let layout { return try await layout.fetchBlob(digest, size: size, to: path) }
        guard let file = synthetic!.files[digest] else { throw OCI.Failure("the archive has no blob \(digest)") }
        try OCILayoutSource.copy(file, to: path, atMost: size)
    }

    /// manifest.json's entry for `tag` (or its only entry): a schema 2 manifest of its config and layers.
    static func legacy(_ dir: String, tag: String?) throws -> (manifest: [UInt8], files: [Digest: String]) {
        let json = try JSON.parse(try Files.readBytes(dir + "/manifest.json", limit: OCI.maxDocumentBytes))
        guard let entries = json.arrayValue, !entries.isEmpty else { throw OCI.Failure("the archive's manifest.json lists no image") }
        let entry = try tag.map { t -> JSON in
            guard let e = entries.first(where: { ($0["RepoTags"]?.arrayValue ?? []).contains { $0.stringValue?.hasSuffix(":" + t) == true } }) else {
                throw OCI.Failure("no image tagged \(t) in the archive")
            }
            return e
        } ?? entries[0]
        guard let config = entry["Config"]?.stringValue, let layers = entry["Layers"]?.arrayValue?.compactMap(\.stringValue), !layers.isEmpty else {
            throw OCI.Failure("the archive's manifest.json entry has no Config or Layers")
        }
        var files: [Digest: String] = [:]
        func describe(_ name: String, type: String) throws -> JSON {
            let parts = try LayerUnpacker.components(name)
            guard !parts.isEmpty else { throw OCI.Failure("empty path in manifest.json") }
            let path = dir + "/" + parts.joined(separator: "/")
            let (digest, size) = try Digest.of(file: path)
            files[digest] = path
            return ["mediaType": .string(type), "digest": .string(digest.description), "size": .int(size)]
        }
        let manifest: JSON = ["schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                              "config": try describe(config, type: "application/vnd.docker.container.image.v1+json"),
                              "layers": .array(try layers.map { try describe($0, type: "application/vnd.docker.image.rootfs.diff.tar") })]
        return (manifest.serialized(), files)
    }
}
