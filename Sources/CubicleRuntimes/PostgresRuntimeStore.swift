import CubicleJSON
import Logging
import PostgresNIO
import Synchronization

/// The fleet's store: one PostgreSQL database every cubicled reads. Each write is a transaction that ends
/// with `pg_notify('cubicle_runtimes', WRITER:ID)`, delivered at commit, so every other daemon reloads
/// that runtime at once (`changes`). Migrations run at connect under an advisory lock, so daemons starting
/// together apply each once.
public final class PostgresRuntimeStore: RuntimeStore {
    static let channel = "cubicle_runtimes"
    let client: PostgresClient
    let logger: Logger
    /// This daemon's mark on its own notifications, which it does not need to hear back.
    let writer: String
    private let running: Task<Void, Never>
    private let listener = Mutex<Task<Void, Never>?>(nil)

    init(client: PostgresClient, logger: Logger) {
        self.client = client
        self.logger = logger
        var rng = SystemRandomNumberGenerator()
        writer = String(rng.next(), radix: 36)
        running = Task { await client.run() }
    }

    public static func connect(_ location: StoreLocation.PostgresLocation, logger: Logger) async throws(StoreError) -> PostgresRuntimeStore {
        let configuration = PostgresClient.Configuration(host: location.host, port: location.port, username: location.user,
                                                         password: location.password, database: location.database, tls: .disable)
        let store = PostgresRuntimeStore(client: PostgresClient(configuration: configuration, backgroundLogger: logger), logger: logger)
        do {
            try await store.client.withTransaction(logger: logger) { c in
                try await c.query("SELECT pg_advisory_xact_lock(7243178)", logger: logger)
                try await c.query("CREATE TABLE IF NOT EXISTS cubicle_schema_migrations (name TEXT PRIMARY KEY)", logger: logger)
                var applied: Set<String> = []
                for try await name in try await c.query("SELECT name FROM cubicle_schema_migrations", logger: logger).decode(String.self) {
                    applied.insert(name)
                }
                for migration in StoreSchema.migrations where !applied.contains(migration.name) {
                    for statement in migration.sql { try await c.query(PostgresQuery(unsafeSQL: statement), logger: logger) }
                    try await c.query("INSERT INTO cubicle_schema_migrations (name) VALUES (\(migration.name))", logger: logger)
                }
            }
        } catch {
            await store.close()
            throw .unavailable("\(location.host):\(location.port)/\(location.database): \(String(reflecting: error))")
        }
        return store
    }

    public func all() async throws(StoreError) -> [RuntimeRecord] {
        try await run { c in
            var ids: [String] = []
            for try await id in try await c.query("SELECT id FROM runtimes ORDER BY id", logger: self.logger).decode(String.self) { ids.append(id) }
            var out: [RuntimeRecord] = []
            for id in ids { if let r = try await self.load(c, id) { out.append(r) } }
            return out
        }
    }

    public func runtime(id: String) async throws(StoreError) -> RuntimeRecord? {
        try await run { c in try await self.load(c, id) }
    }

    public func put(_ record: RuntimeRecord, expecting: Int?) async throws(StoreError) -> RuntimeRecord {
        var written = record
        written.revision = (expecting ?? 0) + 1
        let w = written
        try await transaction { c in
            let header = String(decoding: w.headerJSON.serialized(), as: UTF8.self)
            let revision = Int64(w.revision)
            var changed = 0
            if let expecting {
                let old = Int64(expecting)
                for try await _ in try await c.query("UPDATE runtimes SET revision = \(revision), header = \(header) WHERE id = \(w.id) AND revision = \(old) RETURNING id", logger: self.logger).decode(String.self) { changed += 1 }
                guard changed == 1 else { throw StoreError.conflict("runtime \(w.id) was changed by another request") }
            } else {
                for try await _ in try await c.query("INSERT INTO runtimes (id, name, revision, header) VALUES (\(w.id), \(w.name), \(revision), \(header)) ON CONFLICT DO NOTHING RETURNING id", logger: self.logger).decode(String.self) { changed += 1 }
                guard changed == 1 else { throw StoreError.conflict("a runtime named \(w.name) already exists") }
            }
            try await c.query("DELETE FROM runtime_versions WHERE runtime_id = \(w.id)", logger: self.logger)
            for v in w.versions {
                let doc = String(decoding: v.json.serialized(), as: UTF8.self), n = Int64(v.version)
                try await c.query("INSERT INTO runtime_versions (runtime_id, version, document) VALUES (\(w.id), \(n), \(doc))", logger: self.logger)
            }
            try await c.query("DELETE FROM runtime_endpoints WHERE runtime_id = \(w.id)", logger: self.logger)
            for e in w.endpoints {
                let doc = String(decoding: e.json.serialized(), as: UTF8.self)
                try await c.query("INSERT INTO runtime_endpoints (runtime_id, name, document) VALUES (\(w.id), \(e.name), \(doc))", logger: self.logger)
            }
            try await self.notify(c, w.id)
        }
        return written
    }

    public func delete(id: String, expecting: Int) async throws(StoreError) {
        try await transaction { c in
            var changed = 0
            let old = Int64(expecting)
            for try await _ in try await c.query("DELETE FROM runtimes WHERE id = \(id) AND revision = \(old) RETURNING id", logger: self.logger).decode(String.self) { changed += 1 }
            guard changed == 1 else { throw StoreError.conflict("runtime \(id) was changed by another request") }
            try await c.query("DELETE FROM client_tokens WHERE runtime_id = \(id)", logger: self.logger)
            try await self.notify(c, id)
        }
    }

    public func clientToken(_ token: String) async throws(StoreError) -> ClientTokenRecord? {
        try await run { c in
            for try await (t, f, r, result, at) in try await c.query("SELECT token, fingerprint, runtime_id, result, created_at FROM client_tokens WHERE token = \(token)", logger: self.logger)
                .decode((String, String, String, String?, Double).self) {
                return ClientTokenRecord(token: t, fingerprint: f, runtimeID: r, result: result, createdAt: at)
            }
            return nil
        }
    }

    public func saveClientToken(_ r: ClientTokenRecord) async throws(StoreError) {
        try await run { c in
            var inserted = 0
            for try await _ in try await c.query("INSERT INTO client_tokens (token, fingerprint, runtime_id, result, created_at) VALUES (\(r.token), \(r.fingerprint), \(r.runtimeID), \(r.result), \(r.createdAt)) ON CONFLICT DO NOTHING RETURNING token", logger: self.logger).decode(String.self) { inserted += 1 }
            guard inserted == 1 else { throw StoreError.conflict("client token \(r.token) is already in use") }
        }
    }

    /// Runtime ids other daemons changed, from a connection held for LISTEN; it reconnects after a failure.
    /// Each time LISTEN is in place (the first time too: the daemon loaded the store before it) the reader is
    /// told to compare everything, since NOTIFYs sent while no one listened are gone.
    public func changes() -> AsyncStream<StoreChange> {
        let (stream, continuation) = AsyncStream<StoreChange>.makeStream(bufferingPolicy: .bufferingNewest(1024))
        let client = self.client, logger = self.logger, writer = self.writer
        let task = Task {
            while !Task.isCancelled {
                do {
                    try await client.withConnection { c in
                        try await c.listen(on: Self.channel) { notifications in
                            continuation.yield(.everything)
                            for try await n in notifications {
                                let parts = n.payload.split(separator: ":", maxSplits: 1).map(String.init)
                                guard parts.count == 2, parts[0] != writer else { continue }
                                continuation.yield(.runtime(parts[1]))
                            }
                        }
                    }
                } catch {
                    if Task.isCancelled { break }
                    logger.warning("runtime store: LISTEN lost, reconnecting", metadata: ["error": "\(error)"])
                    try? await Task.sleep(nanoseconds: 500_000_000)
                }
            }
            continuation.finish()
        }
        listener.withLock { $0 = task }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }

    public func close() async {
        listener.withLock { $0 }?.cancel()
        running.cancel()
        await running.value
    }

    private func notify(_ c: PostgresConnection, _ id: String) async throws {
        let payload = "\(writer):\(id)"
        try await c.query("SELECT pg_notify(\(Self.channel), \(payload))", logger: logger)
    }

    private func load(_ c: PostgresConnection, _ id: String) async throws -> RuntimeRecord? {
        var row: (String, String, Int64, String)?
        for try await r in try await c.query("SELECT id, name, revision, header FROM runtimes WHERE id = \(id)", logger: logger)
            .decode((String, String, Int64, String).self) { row = r }
        guard let row else { return nil }
        var versions: [JSON] = [], endpoints: [JSON] = []
        for try await d in try await c.query("SELECT document FROM runtime_versions WHERE runtime_id = \(id) ORDER BY version", logger: logger).decode(String.self) {
            versions.append(try JSON.parseStored(d))
        }
        for try await d in try await c.query("SELECT document FROM runtime_endpoints WHERE runtime_id = \(id)", logger: logger).decode(String.self) {
            endpoints.append(try JSON.parseStored(d))
        }
        guard let record = RuntimeRecord(id: row.0, name: row.1, revision: Int(row.2), header: try JSON.parseStored(row.3),
                                         versions: versions, endpoints: endpoints) else {
            throw StoreError.unavailable("runtime \(id)'s stored record is malformed")
        }
        return record
    }

    private func run<T: Sendable>(_ body: @escaping @Sendable (PostgresConnection) async throws -> T) async throws(StoreError) -> T {
        do { return try await client.withConnection(body) } catch let e as StoreError { throw e } catch { throw .unavailable(String(reflecting: error)) }
    }

    private func transaction<T: Sendable>(_ body: @escaping @Sendable (PostgresConnection) async throws -> T) async throws(StoreError) -> T {
        do { return try await client.withTransaction(logger: logger) { c in try await body(c) } } catch let e as StoreError { throw e } catch {
            // postgres-nio wraps what the closure threw together with the rollback's outcome.
            if let wrapped = error as? PostgresTransactionError, let inner = wrapped.closureError as? StoreError { throw inner }
            throw .unavailable(String(reflecting: error))
        }
    }
}
