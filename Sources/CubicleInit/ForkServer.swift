#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import CubicleRPC

/// cubicle-init as the daemon's fork server (`CUBICLE_INIT_FORK_SERVER=1`, a SOCK_SEQPACKET socket to the
/// daemon on fd 3). Exec'ing a new cubicle-init for every sandbox pays, each time, for glibc's and the
/// Swift runtime's start-up and for faulting in the code that reads the configuration and builds the
/// filesystem: about 0.6 ms before init's first line and more after it. This process pays once. It is
/// single-threaded, so a clone of it may run any code, and each clone goes straight on as a new sandbox's
/// init: the same namespaces, id maps, cgroup and descriptors as an exec'd one, and CLONE_PARENT makes the
/// daemon its parent.
///
/// It holds nothing of any session (it never reads a control channel) and ends when the daemon closes
/// its socket.
enum ForkServer {
    static let socketFD = ForkRequest.serverFD

    static func serve() -> Never {
        // Whatever else the daemon let us inherit is not ours to hold.
        cubicle_close_from(socketFD + 1)
        // Each clone inherits these; with none handled it need not reset 64 of them itself.
        cubicle_default_signals()
        let hostNetwork = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC)
        let hostMounts = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC)
        guard hostNetwork >= 0, hostMounts >= 0, (try? Descriptors.send(socketFD, ForkReply.hello[...], fds: [])) != nil else { exit(1) }
        var buffer = [UInt8](repeating: 0, count: ForkRequest.maxSize)
        var parsed = ParsedConfiguration()
        var templates = TemplateStore(hostNamespace: hostMounts)

        while true {
            var fds: [Int32] = []
            let count: Int
            do {
                count = try Descriptors.receive(socketFD, into: &buffer, fds: &fds).count
            } catch {
                if error.errno == EINTR { continue }
                exit(1)
            }
            if count == 0 { exit(0) }
            // In the clone this does not return: it becomes init.
            let reply = fork(buffer[0..<count], fds: fds, hostNetwork: hostNetwork, parsed: &parsed, templates: &templates)
            fds.forEach { close($0) }
            guard (try? Descriptors.send(socketFD, reply.bytes[...], fds: [])) != nil else { exit(1) }
        }
    }

    static func fork(_ bytes: ArraySlice<UInt8>, fds: [Int32], hostNetwork: Int32, parsed: inout ParsedConfiguration,
                     templates: inout TemplateStore) -> ForkReply {
        guard let (requestBytes, configurationBytes) = ForkRequest.split(bytes),
              let json = try? JSON.parse(Array(requestBytes)), let request = try? ForkRequest(json: json),
              let config = parsed.config(configurationBytes) else {
            return ForkReply(pid: -1, step: Int32(CUBICLE_STEP_PREPARE.rawValue), errno: EPROTO)
        }
        guard fds.count == request.descriptorCount else {
            return ForkReply(pid: -1, step: Int32(CUBICLE_STEP_DUP_FDS.rawValue), errno: EBADF)
        }
        var rest = fds[ForkRequest.placedCount...]
        let netns = request.hasNetworkNamespace ? rest.removeFirst() : -1
        let taskFiles = Array(rest.prefix(request.cgroupTaskFiles))
        rest.removeFirst(request.cgroupTaskFiles)
        let preparation = ForkPreparation(idMap: request.idMap, cgroupProcs: request.hasCgroupProcs ? rest.removeFirst() : -1)
        let placed = Array(fds[0..<ForkRequest.placedCount])
        // With a template the clone starts in a copy of its namespace and opens no sources; without one
        // (it could not be built) the clone builds the whole tree as an exec'd init does.
        // An image root is per sandbox (its layers are idmapped through the sandbox's own user namespace):
        // no template; the clone builds it from the layers the host sends it after the clone.
        let template = config.imageLayers > 0 ? nil : templates.template(config: config, sources: request.sources)
        let fromTemplate = template.map { cubicle_enter_mounts($0.namespace) == 0 } ?? false
        defer {
            if fromTemplate {
                // Back in the host's namespace for the next template build and the sources' checks.
                if cubicle_enter_mounts(templates.hostNamespace) != 0 { exit(1) }
                _ = chdir("/")
            }
        }
        var failure = cubicle_spawn_error()
        var unreaped: pid_t = 0
        let pid = withCStrings(fromTemplate ? [] : request.sources) { sources in
            placed.withUnsafeBufferPointer { placed in taskFiles.withUnsafeBufferPointer { tasks in
                var spawn = cubicle_sandbox_spawn(path: nil, argv: nil, envp: nil, namespaces: request.namespaces,
                                                  unshare_cgroup: request.unshareCgroup ? 1 : 0,
                                                  fds: placed.baseAddress, nfds: Int32(placed.count),
                                                  sources: UnsafeRawPointer(sources).assumingMemoryBound(to: UnsafePointer<CChar>?.self),
                                                  nsources: fromTemplate ? 0 : Int32(request.sources.count), netns_fd: netns, host_netns_fd: hostNetwork,
                                                  cgroup_task_fds: tasks.baseAddress, ncgroup_task_fds: Int32(tasks.count),
                                                  userns_owner: request.usernsOwner)
                return withExtendedLifetime(preparation) {
                    cubicle_sandbox_fork(&spawn, ForkPreparation.run, Unmanaged.passUnretained(preparation).toOpaque(), &failure, &unreaped)
                }
            }}
        }
        if pid == 0 { InitServer.serveSandbox(config: config, fromTemplate: fromTemplate) }
        if pid > 0 { return ForkReply(pid: pid) }
        let prepared = failure.step == Int32(CUBICLE_STEP_PREPARE.rawValue)
        return ForkReply(pid: -1, step: failure.step, errno: prepared ? preparation.errno : failure.err, index: failure.index, unreaped: unreaped)
    }
}

/// The last configuration parsed, kept with its bytes: a runtime's sandboxes all have the same one, so
/// each clone starts with it parsed instead of reading and parsing it (0.15 ms).
struct ParsedConfiguration {
    private var bytes: [UInt8] = []
    private var parsed: InitConfig?

    mutating func config(_ configuration: ArraySlice<UInt8>) -> InitConfig? {
        if let parsed, bytes.count == configuration.count,
           bytes.withUnsafeBytes({ a in configuration.withUnsafeBytes { b in a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }) {
            return parsed
        }
        guard let json = try? JSON.parse(Array(configuration)), let config = try? InitConfig(json: json) else { return nil }
        (bytes, parsed) = (Array(configuration), config)
        return config
    }
}

/// What the server does while a clone waits: its id maps, and on cgroup v2 its cgroup.
final class ForkPreparation {
    let idMap: String
    let cgroupProcs: Int32
    var errno: Int32 = 0

    init(idMap: String, cgroupProcs: Int32) {
        (self.idMap, self.cgroupProcs) = (idMap, cgroupProcs)
    }

    static let run: cubicle_sandbox_prepare = { context, pid in
        let me = Unmanaged<ForkPreparation>.fromOpaque(context!).takeUnretainedValue()
        do throws(SystemError) {
            try IDMaps.write(me.idMap, to: pid)
            if me.cgroupProcs >= 0 { try Files.writeAll(me.cgroupProcs, Array("\(pid)".utf8), step: "cgroup.procs") }
        } catch {
            me.errno = error.errno
            return -1
        }
        return 0
    }
}
