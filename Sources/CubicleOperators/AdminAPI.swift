#if canImport(Glibc)
import Glibc
#endif
import AsyncAlgorithms
import CubicleAgentCore
import CubicleControlPlane
import CubicleJSON
import CubicleImages
import CubicleLinux
import CubicleRuntimes
import CubicleSandbox
import CubicleSessions
import CubicleShells
import HTTPTypes
import Hummingbird
import NIOCore

/// struct ucred, which Glibc's Swift module leaves out (it needs _GNU_SOURCE).
struct PeerCredentials: Sendable {
    var pid: pid_t = 0
    var uid: uid_t = 0
    var gid: gid_t = 0
}

/// Who may use the admin socket: root, or members of one configured group. The socket's mode already keeps
/// others out; this is checked again per request from SO_PEERCRED, so a loosened mode does not open it.
public struct AdminAccess: Sendable {
    public var group: gid_t?

    public init(group: gid_t? = nil) { self.group = group }

    func allows(uid: uid_t, gid: gid_t, pid: pid_t) -> Bool {
        if uid == 0 { return true }
        guard let group else { return false }
        if gid == group { return true }
        // Supplementary groups are not in SO_PEERCRED; the caller's /proc status has them.
        guard let status = try? Files.read("/proc/\(pid)/status") else { return false }
        for line in status.split(separator: "\n") where line.hasPrefix("Groups:") {
            return line.dropFirst(7).split(whereSeparator: { $0 == " " || $0 == "\t" }).contains { gid_t($0) == group }
        }
        return false
    }
}

/// The operator API (HTTP + JSON on the admin Unix socket). Streams (logs, exec output, events) are
/// newline-delimited JSON, one object per line.
public struct AdminAPI: HTTPResponder {
    /// With the connection's channel, so each request can ask the kernel who is on the other end.
    public typealias Context = ConnectionContext

    let sessions: SessionManager
    let group: any EventLoopGroup
    let access: AdminAccess

    let images: PreparedImages?
    /// The control plane, served here too: the socket is root's (or `--admin-group`'s) alone, whatever
    /// address the data plane listens on.
    let controlPlane: ControlPlane?
    /// Interactive shells (`cubicle exec -it`), beside the data plane's.
    let shells: ShellRegistry

    public init(sessions: SessionManager, group: any EventLoopGroup, access: AdminAccess, images: PreparedImages? = nil,
                controlPlane: ControlPlane? = nil, shells: ShellRegistry? = nil) {
        self.shells = shells ?? ShellRegistry(group: group)
        self.sessions = sessions
        self.group = group
        self.access = access
        self.images = images
        self.controlPlane = controlPlane
    }

    struct Failure: Error {
        var status: HTTPResponse.Status
        var message: String
        init(_ status: HTTPResponse.Status, _ message: String) {
            self.status = status
            self.message = message
        }
    }

    public func respond(to request: Request, context: Context) async throws -> Response {
        do {
            try await authorize(context.channel)
            let target = request.head.path ?? "/"
            let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            let query = QueryString.parse(parts.count > 1 ? String(parts[1]) : "")
            let path = parts[0].split(separator: "/").map { PercentEncoding.decode(String($0)) ?? String($0) }
            if path.first != "v1", let controlPlane {
                let body = try await request.body.collect(upTo: ControlPlane.maxBodyBytes)
                if let answer = await controlPlane.serve(method: request.method.rawValue, path: String(parts[0]),
                                                          query: parts.count > 1 ? String(parts[1]) : "", body: Array(body.readableBytesView)) {
                    return answer.response
                }
            }
            guard path.first == "v1" else { throw Failure(.notFound, "no such admin endpoint: \(parts[0])") }
            let rest = Array(path.dropFirst())
            let method = request.method
            if method == .get, rest == ["sessions"] {
                return try await list(all: query["all"] == "true" || query["all"] == "1")
            }
            if rest.count >= 2, rest[0] == "sessions" {
                let id = rest[1]
                switch (method, rest.count > 2 ? rest[2] : nil) {
                case (.get, nil): return try await inspect(id)
                case (.get, "logs"?) where rest.count == 3:
                    return try await logs(id, tail: query["tail"].flatMap { Int($0) }, follow: query["follow"] == "true" || query["follow"] == "1")
                case (.post, "exec"?) where rest.count == 3: return try await exec(id, request, channel: context.channel)
                case (.post, "stop"?) where rest.count == 3: return try await stop(id)
                default: break
                }
            }
            if method == .get, rest == ["runtimes"] {
                return Self.json(.ok, ["runtimes": .array(runtimesJSON())])
            }
            if method == .get, rest == ["events"] { return events() }
            if rest == ["images"], method == .get { return imageList() }
            if rest == ["images", "prune"], method == .post { return try imagePrune() }
            if rest == ["storage"], method == .get { return await storageList() }
            if rest.count == 2, rest[0] == "storage", method == .delete { return try await storageRemove(rest[1]) }
            throw Failure(.notFound, "no such admin endpoint: \(method.rawValue) \(parts[0])")
        } catch let f as Failure {
            return Self.json(f.status, ["error": .string(f.message)])
        }
    }

    /// The store's images: reference, manifest, size, the runtimes that use them, and whether it is ready.
    private func imageList() -> Response {
        guard let images else { return Self.json(.ok, ["images": .array([])]) }
        let runtimes = sessions.catalog.allConfigs
        let list: [JSON] = images.store.images.map { image in
            let users = Set(runtimes.filter { $0.containerUri == image.reference }.map(\.name)).sorted().map { JSON.string($0) }
            return ["reference": .string(image.reference), "manifest": .string(image.manifest.description), "size": .int(image.size),
                    "layers": .int(Int64(image.layers.count)), "runtimes": .array(users)]
        }
        return Self.json(.ok, ["images": .array(list)])
    }

    /// Every kept session volume: runtime, session, owner, size on disk, last use and when it expires.
    private func storageList() async -> Response {
        guard let storage = sessions.storage else { return Self.json(.ok, ["volumes": .array([])]) }
        let expiry = sessions.config.sessionStorageExpirySeconds
        let list: [JSON] = await storage.list().map { e in
            ["name": .string(e.name), "runtime": .string(e.runtime), "session": .string(e.session), "owner": .string(e.owner),
             "endpoint": .string(e.endpoint), "version": .int(Int64(e.version)), "bytes": .int(e.bytes), "bytesLimit": .int(e.bytesLimit),
             "created": .int(Int64(e.created)), "lastUsed": .int(Int64(e.lastUsed)), "expires": .int(Int64(e.lastUsed + expiry)), "mounted": .bool(e.mounted)]
        }
        return Self.json(.ok, ["volumes": .array(list)])
    }

    /// Removes one volume, named by its name (or a unique prefix) or by its session id: at once, or at the
    /// end of the sandbox that has it mounted.
    private func storageRemove(_ which: String) async throws -> Response {
        guard let storage = sessions.storage else { throw Failure(.notFound, "no session storage is kept") }
        let all = await storage.list()
        let matches = all.filter { $0.name.hasPrefix(which) || $0.session == which }
        guard !matches.isEmpty else { throw Failure(.notFound, "no session storage matches \(which)") }
        guard matches.count == 1 else {
            throw Failure(.conflict, "\(which) matches \(matches.count) volumes: give a longer name (\(matches.map { String($0.name.prefix(12)) }.joined(separator: ", ")))")
        }
        let name = matches[0].name
        await storage.remove { $0.name == name }
        return Self.json(.ok, ["removed": .string(name), "deferred": .bool(matches[0].mounted)])
    }

    /// Removes every image no runtime names, and the blobs and layers only they used.
    private func imagePrune() throws -> Response {
        guard let images else { return Self.json(.ok, ["removed": .array([])]) }
        let keep = sessions.catalog.imagesInUse
        do {
            let removed = try images.store.prune(keeping: keep)
            return Self.json(.ok, ["removed": .array(removed.map { .string($0) })])
        } catch {
            throw Failure(.internalServerError, "prune failed: \(error)")
        }
    }

    func authorize(_ channel: any Channel) async throws {
        guard let provider = channel as? any SocketOptionProvider else { throw Failure(.forbidden, "cannot identify the caller") }
        let credentials: PeerCredentials
        do {
            credentials = try await provider.unsafeGetSocketOption(level: .init(rawValue: SOL_SOCKET), name: .init(rawValue: SO_PEERCRED)).get()
        } catch {
            throw Failure(.forbidden, "cannot identify the caller: \(error)")
        }
        guard access.allows(uid: credentials.uid, gid: credentials.gid, pid: credentials.pid) else {
            throw Failure(.forbidden, "uid \(credentials.uid) may not use the admin socket (root\(access.group.map { " or group \($0)" } ?? "") only)")
        }
    }

    // MARK: - Sessions

    private func find(_ id: String) async throws -> SessionManager.FoundSession {
        guard !id.isEmpty, id.utf8.count <= 256 else { throw Failure(.badRequest, "a session id or prefix is required") }
        switch await sessions.find(id) {
        case .success(let found): return found
        case .failure(.notFound): throw Failure(.notFound, "no session matches \(id)")
        case .failure(.ambiguous(let ids)): throw Failure(.conflict, "\(id) matches \(ids.count) sessions: \(ids.prefix(5).joined(separator: ", "))")
        }
    }

    func live(_ id: String) async throws -> Session {
        switch try await find(id) {
        case .live(let s): return s
        case .ended(let summary): throw Failure(.gone, "session \(summary.id) has ended (\(summary.endReason?.name ?? "?"))")
        }
    }

    private func list(all: Bool) async throws -> Response {
        var rows = sessions.liveSessions.map { OperatorJSON.summary($0.summary, timeline: $0.timeline) }
        if all { rows += await sessions.endedSessions.map { OperatorJSON.summary($0, timeline: nil) } }
        // Warm sandboxes are nobody's session yet: listed apart, so scripts reading `sessions` see only sessions.
        let warm = await sessions.warmSessions.map { OperatorJSON.summary($0.summary, timeline: nil) }
        return Self.json(.ok, ["sessions": .array(rows), "warm": .array(warm)])
    }

    private func inspect(_ id: String) async throws -> Response {
        switch try await find(id) {
        case .live(let s): return Self.json(.ok, OperatorJSON.inspect(s, shells: shells.count(in: s)))
        case .ended(let summary): return Self.json(.ok, OperatorJSON.summary(summary, timeline: nil))
        }
    }

    private func stop(_ id: String) async throws -> Response {
        let session = try await live(id)
        let summary = await sessions.end(session, .stopped)
        return Self.json(.ok, OperatorJSON.summary(summary, timeline: nil))
    }

    private func logs(_ id: String, tail: Int?, follow: Bool) async throws -> Response {
        let ring: LogRing
        switch try await find(id) {
        case .live(let s): ring = s.logs
        case .ended(let summary): throw Failure(.gone, "session \(summary.id) has ended; its logs were wiped with it")
        }
        // Followed from before the tail is taken, and deduplicated by sequence, so no line falls between them.
        let following = follow ? ring.follow() : nil
        let past = ring.tail(tail)
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: ResponseBody { writer in
            var last = -1
            for line in past {
                last = line.sequence
                try await writer.write(Self.line(OperatorJSON.logLine(line)))
            }
            if let following {
                for await line in following where line.sequence > last {
                    try await writer.write(Self.line(OperatorJSON.logLine(line)))
                }
            }
            try await writer.finish(nil)
        })
    }

    private func exec(_ id: String, _ request: Request, channel: any Channel) async throws -> Response {
        let session = try await live(id)
        // The same body, limits and errors as InvokeAgentRuntimeCommand: {"command": "...", "timeout": N}.
        var body = try await request.body.collect(upTo: 256 << 10)
        let command: CommandRequest
        do { command = try CommandRequest(body: body.readBytes(length: body.readableBytes) ?? []) } catch {
            throw Failure(.badRequest, error.message)
        }
        let running: RunningCommand
        do {
            running = try await session.runCommand(command, group: group)
        } catch {
            throw Failure(.badGateway, error.description)
        }
        let clientLeft = await ClientPresence.of(channel)?.probe
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: ResponseBody { writer in
            try await running.stream(clientLeft: clientLeft) { event in
                let line: JSON? = switch event {
                case .start: nil
                case .stdout(let text): ["stdout": .string(text)]
                case .stderr(let text): ["stderr": .string(text)]
                case .stop(let code, let timedOut): ["exitCode": .int(Int64(code)), "timedOut": .bool(timedOut)]
                }
                if let line { try await writer.write(Self.line(line)) }
            }
            try await writer.finish(nil)
        })
    }

    private func events() -> Response {
        let feed = sessions.events.follow()
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: ResponseBody { writer in
            for await event in feed { try await writer.write(Self.line(event)) }
            try await writer.finish(nil)
        })
    }

    // MARK: - Encoding

    /// Every runtime: its status, versions (with their live sessions), endpoints, and DEFAULT's configuration.
    func runtimesJSON() -> [JSON] {
        var live: [String: [Int: Int]] = [:]
        for s in sessions.liveSessions { live[s.runtime.name, default: [:]][s.runtime.version, default: 0] += 1 }
        return sessions.catalog.records.map { record in
            var o = (sessions.catalog.config(record.id, version: record.endpoint("DEFAULT")?.liveVersion ?? 0).map(Self.runtimeJSON) ?? [:]).objectValue ?? [:]
            o["name"] = .string(record.id)
            o["agentRuntimeName"] = .string(record.name)
            o["status"] = .string(record.status.rawValue)
            o["declared"] = .bool(record.declared)
            if let f = record.failureReason { o["failureReason"] = .string(f) }
            o["versions"] = .array(record.versions.map { v in
                var vo: [String: JSON] = ["version": .int(Int64(v.version)), "status": .string(v.status.rawValue),
                                          "sessions": .int(Int64(live[record.id]?[v.version] ?? 0))]
                if let f = v.failureReason { vo["failureReason"] = .string(f) }
                return .object(vo)
            })
            o["endpoints"] = .array(record.endpoints.map { e in
                var eo: [String: JSON] = ["name": .string(e.name), "status": .string(e.status.rawValue)]
                if let v = e.liveVersion { eo["liveVersion"] = .int(Int64(v)) }
                if let v = e.targetVersion { eo["targetVersion"] = .int(Int64(v)) }
                return .object(eo)
            })
            return .object(o)
        }
    }

    static func runtimeJSON(_ r: RuntimeConfig) -> JSON {
        [
            "name": .string(r.name), "version": .int(Int64(r.version)), "command": .array(r.command.map { .string($0) }),
            "codeDirectory": r.codeDirectory.map { .string($0) } ?? .null, "containerUri": r.containerUri.map { .string($0) } ?? .null,
            "networkMode": .string(r.networkMode.rawValue), "protocol": .string(r.serverProtocol.rawValue),
            "idleRuntimeSessionTimeout": .int(Int64(r.idleRuntimeSessionTimeout)), "maxLifetime": .int(Int64(r.maxLifetime)),
            "limits": OperatorJSON.limits(r.limits),
        ]
    }

    static func line(_ json: JSON) -> ByteBuffer {
        var bytes = json.serialized()
        bytes.append(0x0A)
        return ByteBuffer(bytes: bytes)
    }

    static func json(_ status: HTTPResponse.Status, _ json: JSON) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: .init(byteBuffer: line(json)))
    }
}

