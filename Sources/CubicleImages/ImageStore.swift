#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import CubicleLinux
import Synchronization

/// The content-addressed image store under the data directory (`/var/lib/cubicle/images`), its one owner:
///
///     blobs/sha256/<hex>     manifests, configs and layer archives, each verified against its digest
///     layers/<hex>/          a layer unpacked once, named by its archive's digest
///     images/<hex>.json      an image: its reference, manifest, config and layers (named by the reference's digest)
///     tmp/                   downloads and unpacks in progress, emptied when the store opens
///
/// Everything arrives in tmp/ and is renamed into place only once verified (blobs) or complete (layers), so
/// an interrupted pull leaves nothing half-used: a blob or layer either is there whole or is not there.
/// The store is root's alone (0700): its layers hold the images' setuid files with their real owners.
public final class ImageStore: Sendable {
    public let root: String
    private let unpacker: LayerUnpacker

    public struct Image: Equatable, Sendable {
        public var reference: String
        public var manifest: Digest
        public var config: Digest
        public var layers: [Digest]
        /// Bytes of the blobs it uses (compressed layers, config, manifest).
        public var size: Int64
    }

    public init(root: String, limits: LayerUnpacker.Limits = .init()) throws(SystemError) {
        self.root = root
        unpacker = LayerUnpacker(limits: limits)
        for d in ["", "/blobs/sha256", "/layers", "/images"] { try Files.makeDirectories(root + d, mode: 0o700) }
        // What an interrupted pull or unpack left is never used: start with an empty tmp/.
        if Files.exists(root + "/tmp") { try Files.removeTree(root + "/tmp") }
        try Files.makeDirectories(root + "/tmp", mode: 0o700)
        chmod(root, 0o700)
    }

    public func blobPath(_ d: Digest) -> String { "\(root)/blobs/sha256/\(d.hex)" }
    public func layerPath(_ d: Digest) -> String { "\(root)/layers/\(d.hex)" }
    public func hasBlob(_ d: Digest) -> Bool { Files.exists(blobPath(d)) }

    /// A fresh path under tmp/ for something in progress.
    public func temporary(_ what: String) -> String {
        "\(root)/tmp/\(what)-\(UInt64.random(in: 0...UInt64.max))"
    }

    /// Moves a downloaded file into the store if it is what `digest` names (else removes it and throws).
    public func commitBlob(from path: String, as digest: Digest, what: String) throws {
        do { _ = try digest.verify(file: path, what: what) } catch {
            unlink(path)
            throw error
        }
        if hasBlob(digest) { unlink(path); return }
        chmod(path, 0o600)
        guard rename(path, blobPath(digest)) == 0 else { throw SystemError.lastError("rename into \(blobPath(digest))") }
    }

    /// A stored blob's bytes, checked again against its digest (for manifests and configs, which are small).
    public func readVerified(_ d: Digest, limit: Int = OCI.maxDocumentBytes) throws -> [UInt8] {
        let bytes = try Files.readBytes(blobPath(d), limit: limit + 1)
        guard bytes.count <= limit else { throw OCI.Failure("blob \(d) is larger than \(limit) bytes") }
        guard Digest.of(bytes) == d else { throw Digest.Failure.mismatch(expected: d.description, actual: Digest.of(bytes).description, what: "stored blob") }
        return bytes
    }

    /// The layer unpacked from its stored archive, once per digest: unpacked into tmp/, renamed into place.
    @discardableResult
    public func unpackLayer(_ d: Digest) throws -> String {
        let target = layerPath(d)
        if Files.exists(target) { return target }
        _ = try d.verify(file: blobPath(d), what: "layer \(d)")
        let work = temporary("layer")
        try Files.makeDirectories(work, mode: 0o755)
        do {
            try unpacker.unpack(archivePath: blobPath(d), into: work)
        } catch {
            try? Files.removeTree(work)
            throw error
        }
        guard rename(work, target) == 0 else {
            let e = errno
            try? Files.removeTree(work)
            if e == EEXIST || e == ENOTEMPTY { return target }  // unpacked meanwhile by another pull
            throw SystemError("rename into \(target)", errno: e)
        }
        return target
    }

    /// Records `image` under its reference (replacing what the reference named before).
    public func record(_ image: Image) throws {
        let json: JSON = ["reference": .string(image.reference), "manifest": .string(image.manifest.description),
                          "config": .string(image.config.description), "layers": .array(image.layers.map { .string($0.description) }),
                          "size": .int(image.size)]
        try Files.writeAtomically(recordPath(image.reference), json.text, mode: 0o600)
    }

    public func image(_ reference: String) -> Image? {
        guard let text = try? Files.read(recordPath(reference)), let json = try? JSON.parse(text) else { return nil }
        return Self.image(json)
    }

    public var images: [Image] {
        ((try? Files.listDirectory(root + "/images")) ?? []).filter { $0.hasSuffix(".json") }.compactMap { name in
            (try? Files.read("\(root)/images/\(name)")).flatMap { try? JSON.parse($0) }.flatMap(Self.image)
        }.sorted { $0.reference < $1.reference }
    }

    /// Removes the images whose references are not in `keep`, then every blob and layer no remaining image
    /// uses. Returns the references removed.
    @discardableResult
    public func prune(keeping keep: Set<String>) throws -> [String] {
        let all = images
        let removed = all.filter { !keep.contains($0.reference) }
        for image in removed { unlink(recordPath(image.reference)) }
        let kept = all.filter { keep.contains($0.reference) }
        let used = Set(kept.flatMap { [$0.manifest, $0.config] + $0.layers }.map(\.hex))
        for hex in (try? Files.listDirectory(root + "/blobs/sha256")) ?? [] where !used.contains(hex) { unlink("\(root)/blobs/sha256/\(hex)") }
        for hex in (try? Files.listDirectory(root + "/layers")) ?? [] where !used.contains(hex) { try? Files.removeTree("\(root)/layers/\(hex)") }
        return removed.map(\.reference)
    }

    private func recordPath(_ reference: String) -> String { "\(root)/images/\(Digest.of(Array(reference.utf8)).hex).json" }

    static func image(_ json: JSON) -> Image? {
        guard let reference = json["reference"]?.stringValue,
              let manifest = json["manifest"]?.stringValue.flatMap({ try? Digest($0) }),
              let config = json["config"]?.stringValue.flatMap({ try? Digest($0) }),
              let layers = json["layers"]?.arrayValue?.compactMap({ $0.stringValue.flatMap { try? Digest($0) } }),
              let size = json["size"]?.intValue else { return nil }
        return Image(reference: reference, manifest: manifest, config: config, layers: layers, size: size)
    }
}
