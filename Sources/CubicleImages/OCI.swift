#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import CubicleLinux

/// The OCI image format's documents (and Docker's schema 2, which registries still serve), read strictly:
/// what the store needs of each, every digest checked for form, sizes bounded.
public enum OCI {
    public static let indexTypes: Set<String> = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"]
    public static let manifestTypes: Set<String> = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"]
    public static let layerTypes: Set<String> = [
        "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    ]
    /// What a registry is asked for, in the order preferred.
    public static let acceptedManifests = (Array(indexTypes) + Array(manifestTypes)).joined(separator: ", ")
    /// Manifests and configs are small; anything larger is refused before it is parsed.
    public static let maxDocumentBytes = 4 << 20

    public struct Failure: Error, Equatable, CustomStringConvertible, Sendable {
        public var message: String
        public init(_ message: String) { self.message = message }
        public var description: String { message }
    }

    public struct Platform: Equatable, Sendable, CustomStringConvertible {
        public var os: String
        public var architecture: String
        public var variant: String?
        public init(os: String, architecture: String, variant: String? = nil) { self.os = os; self.architecture = architecture; self.variant = variant }
        public var description: String { "\(os)/\(architecture)" + (variant.map { "/" + $0 } ?? "") }

        /// This host's, as OCI names architectures.
        public static var host: Platform {
#if arch(x86_64)
            Platform(os: "linux", architecture: "amd64")
#elseif arch(arm64)
            Platform(os: "linux", architecture: "arm64")
#else
            Platform(os: "linux", architecture: "unknown")
#endif
        }
    }

    public struct Descriptor: Equatable, Sendable {
        public var mediaType: String
        public var digest: Digest
        public var size: Int64
        public var platform: Platform?
        public var annotations: [String: String] = [:]

        init(_ json: JSON, what: String) throws(Failure) {
            guard let d = json["digest"]?.stringValue, let digest = try? Digest(d) else { throw Failure("\(what): no valid digest") }
            guard let size = json["size"]?.intValue, size >= 0 else { throw Failure("\(what): no valid size") }
            self.digest = digest
            self.size = size
            mediaType = json["mediaType"]?.stringValue ?? ""
            if let p = json["platform"], let os = p["os"]?.stringValue, let arch = p["architecture"]?.stringValue {
                platform = Platform(os: os, architecture: arch, variant: p["variant"]?.stringValue)
            }
            for (k, v) in json["annotations"]?.objectValue ?? [:] { if let s = v.stringValue { annotations[k] = s } }
        }
    }

    public enum Document: Sendable {
        case index([Descriptor])
        case manifest(config: Descriptor, layers: [Descriptor])
    }

    /// A manifest or an index, told apart by its media type (or, where it has none, by its fields).
    public static func document(_ bytes: [UInt8], mediaType: String? = nil) throws(Failure) -> Document {
        guard bytes.count <= maxDocumentBytes else { throw Failure("manifest larger than \(maxDocumentBytes) bytes") }
        let json: JSON
        do { json = try JSON.parse(bytes) } catch { throw Failure("manifest is not JSON: \(error)") }
        let type = json["mediaType"]?.stringValue ?? mediaType ?? ""
        if indexTypes.contains(type) || (type.isEmpty && json["manifests"] != nil) {
            guard let list = json["manifests"]?.arrayValue else { throw Failure("index without manifests") }
            var out: [Descriptor] = []
            for (i, m) in list.enumerated() { out.append(try Descriptor(m, what: "manifests[\(i)]")) }
            return .index(out)
        }
        if manifestTypes.contains(type) || (type.isEmpty && json["layers"] != nil) {
            guard json["schemaVersion"]?.intValue == 2 else { throw Failure("manifest schemaVersion is not 2") }
            guard let c = json["config"], let layerList = json["layers"]?.arrayValue else { throw Failure("manifest without config or layers") }
            let config = try Descriptor(c, what: "config")
            var layers: [Descriptor] = []
            for (i, l) in layerList.enumerated() {
                let d = try Descriptor(l, what: "layers[\(i)]")
                guard layerTypes.contains(d.mediaType) else { throw Failure("layers[\(i)]: unsupported media type \(d.mediaType)") }
                layers.append(d)
            }
            guard layers.count <= 128 else { throw Failure("more than 128 layers") }
            return .manifest(config: config, layers: layers)
        }
        throw Failure("unsupported manifest media type \(type.isEmpty ? "(none)" : type)")
    }

    /// The entry of an index for `platform`, or an error naming the platforms the index offers.
    public static func choose(_ entries: [Descriptor], for platform: Platform) throws(Failure) -> Descriptor {
        let candidates = entries.filter { $0.platform?.os == platform.os && $0.platform?.architecture == platform.architecture }
        if let exact = candidates.first(where: { platform.variant == nil || $0.platform?.variant == platform.variant }) ?? candidates.first {
            return exact
        }
        let offered = entries.compactMap { $0.platform?.description }.filter { $0 != "unknown/unknown" }
        throw Failure("no image for \(platform) in this index; it offers \(offered.isEmpty ? "no platform" : offered.joined(separator: ", "))")
    }

    /// An image's `User` as the ids the agent runs as: numeric `UID[:GID]`, or a name (and group) looked up in
    /// the image's own /etc/passwd and /etc/group (the top layer that has each file). Root, an unknown name
    /// or ids outside the sandbox's range give nil: Cubicle's unprivileged agent user (1000) then.
    public static func user(_ spec: String?, layers: [String]) -> (uid: UInt32, gid: UInt32)? {
        guard let spec, !spec.isEmpty else { return nil }
        let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
        func file(_ name: String) -> String? {
            for layer in layers.reversed() {
                var st = stat()
                let path = "\(layer)/etc/\(name)"
                // Only a regular file of the layer itself: a symlink in an image is never followed on the host.
                if lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFREG { return try? Files.read(path, limit: 1 << 20) }
            }
            return nil
        }
        func lookup(_ text: String?, _ key: String, field: Int) -> [Substring]? {
            text?.split(separator: "\n").map { $0.split(separator: ":", omittingEmptySubsequences: false) }.first { $0.count > field && $0[0] == key }
        }
        var uid: UInt32?, gid: UInt32?
        if let n = UInt32(parts[0]) { uid = n } else if let entry = lookup(file("passwd"), parts[0], field: 3) {
            uid = UInt32(entry[2]); gid = UInt32(entry[3])
        }
        if parts.count == 2 {
            if let n = UInt32(parts[1]) { gid = n } else { gid = lookup(file("group"), parts[1], field: 2).flatMap { UInt32($0[2]) } }
        }
        guard let u = uid, u != 0, u < 65_536 else { return nil }
        let g = gid ?? u
        guard g < 65_536 else { return nil }
        return (u, g)
    }

    /// What the runtime takes from an image's config.
    public struct ImageConfig: Equatable, Sendable {
        public var entrypoint: [String] = []
        public var cmd: [String] = []
        public var env: [String] = []
        public var workingDir: String?
        public var user: String?
        public var platform: Platform?

        public init(_ bytes: [UInt8]) throws(Failure) {
            guard bytes.count <= maxDocumentBytes else { throw Failure("image config larger than \(maxDocumentBytes) bytes") }
            let json: JSON
            do { json = try JSON.parse(bytes) } catch { throw Failure("image config is not JSON: \(error)") }
            let c = json["config"] ?? JSON.object([:])
            entrypoint = c["Entrypoint"]?.arrayValue?.compactMap(\.stringValue) ?? []
            cmd = c["Cmd"]?.arrayValue?.compactMap(\.stringValue) ?? []
            env = c["Env"]?.arrayValue?.compactMap(\.stringValue) ?? []
            workingDir = c["WorkingDir"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 }
            user = c["User"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 }
            if let os = json["os"]?.stringValue, let arch = json["architecture"]?.stringValue {
                platform = Platform(os: os, architecture: arch, variant: json["variant"]?.stringValue)
            }
        }
    }
}
