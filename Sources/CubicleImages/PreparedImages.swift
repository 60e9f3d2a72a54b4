#if canImport(Glibc)
import Glibc
#endif
import AsyncHTTPClient
import CubicleLinux
import Logging
import Synchronization

/// The images the runtimes name, prepared before any session asks: pulled (or loaded) and unpacked when
/// cubicled starts, never on a session's first call. An image that cannot be prepared leaves its runtime
/// unavailable with the reason, and every other runtime served.
public final class PreparedImages: Sendable {
    public struct Prepared: Sendable {
        public var image: ImageStore.Image
        /// Unpacked layer directories, bottom first.
        public var layers: [String]
        public var config: OCI.ImageConfig
    }

    public let store: ImageStore
    let puller: ImagePuller
    let registries: [RegistryAccess]
    let client: HTTPClient
    let logger: Logger
    private let results = Mutex<[String: Result<Prepared, PreparationError>]>([:])

    public struct PreparationError: Error, CustomStringConvertible, Sendable {
        public var description: String
    }

    public init(store: ImageStore, registries: [RegistryAccess], logger: Logger) {
        self.store = store
        puller = ImagePuller(store: store)
        // Configured hosts first; a Docker config.json's credentials for the others.
        let dockerConfig = (getenv("DOCKER_CONFIG").map { String(cString: $0) } ?? "/root/.docker") + "/config.json"
        let fromDocker = ((try? Files.read(dockerConfig)).map(RegistryAccess.dockerConfig) ?? []).filter { d in !registries.contains { $0.host == d.host } }
        self.registries = registries + fromDocker
        client = HTTPClient(eventLoopGroupProvider: .singleton)
        self.logger = logger
    }

    /// Prepares every image in `uris` at once (the same image once), and waits for all of them.
    public func prepare(_ uris: Set<String>) async {
        await withTaskGroup(of: (String, Result<Prepared, PreparationError>).self) { group in
            for uri in uris {
                group.addTask {
                    do { return (uri, .success(try await self.prepareOne(uri))) } catch {
                        return (uri, .failure(PreparationError(description: "\(error)")))
                    }
                }
            }
            for await (uri, result) in group {
                results.withLock { $0[uri] = result }
                switch result {
                case .success(let p): logger.notice("image ready", metadata: ["image": "\(uri)", "manifest": "\(p.image.manifest)", "layers": "\(p.layers.count)"])
                case .failure(let e): logger.error("image could not be prepared; its runtimes are unavailable", metadata: ["image": "\(uri)", "error": "\(e)"])
                }
            }
        }
    }

    public func prepared(_ uri: String) -> Result<Prepared, PreparationError>? { results.withLock { $0[uri] } }

    public func shutdown() async { try? await client.shutdown() }

    private func prepareOne(_ uri: String) async throws -> Prepared {
        let image: ImageStore.Image
        if let scheme = ["docker-archive:", "oci-archive:"].first(where: { uri.hasPrefix($0) }) {
            var path = String(uri.dropFirst(scheme.count)), tag: String?
            if let colon = path.lastIndex(of: ":"), !path[colon...].contains("/") {
                tag = String(path[path.index(after: colon)...])
                path = String(path[..<colon])
            }
            let source = try ArchiveSource(archive: path, tag: tag, store: store)
            defer { source.close() }
            image = try await puller.pull(tag ?? "latest", as: uri, from: source)
        } else if uri.hasPrefix("oci:") {
            var path = String(uri.dropFirst(4)), tag = "latest"
            if let colon = path.lastIndex(of: ":"), !path[colon...].contains("/") {
                tag = String(path[path.index(after: colon)...])
                path = String(path[..<colon])
            }
            image = try await puller.pull(tag, as: uri, from: OCILayoutSource(directory: path))
        } else {
            let reference = try ImageReference(uri)
            let access = registries.first { $0.host == reference.registry }
            let source = RegistrySource(reference: reference, access: access, client: client)
            image = try await puller.pull(reference.manifestReference, as: uri, from: source, pinned: reference.digest)
        }
        let config = try OCI.ImageConfig(try store.readVerified(image.config))
        return Prepared(image: image, layers: image.layers.map { store.layerPath($0) }, config: config)
    }
}
