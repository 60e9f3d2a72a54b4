#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import GRDB

/// The embedded store: one SQLite file (WAL, synchronous=FULL so an acknowledged change survives a power
/// cut), only root may read it. Migrations run at open.
public final class SQLiteRuntimeStore: RuntimeStore {
    let queue: DatabaseQueue
    public let path: String

    public init(path: String) throws(StoreError) {
        self.path = path
        var configuration = Configuration()
        configuration.foreignKeysEnabled = true
        configuration.busyMode = .timeout(5)
        configuration.prepareDatabase { db in
            try db.execute(sql: "PRAGMA synchronous = FULL")
        }
        do {
            // Made 0600 before SQLite opens it: roles and commands of runtimes are nobody else's business.
            let fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0o600)
            guard fd >= 0 else { throw StoreError.unavailable("cannot open \(path): errno \(errno)") }
            fchmod(fd, 0o600)
            Glibc.close(fd)
            queue = try DatabaseQueue(path: path, configuration: configuration)
            try queue.writeWithoutTransaction { db in try db.execute(sql: "PRAGMA journal_mode = WAL") }
            var migrator = DatabaseMigrator()
            for migration in StoreSchema.migrations {
                migrator.registerMigration(migration.name) { db in
                    for statement in migration.sql { try db.execute(sql: statement) }
                }
            }
            try migrator.migrate(queue)
        } catch let e as StoreError {
            throw e
        } catch {
            throw .unavailable("\(path): \(error)")
        }
    }

    public func all() async throws(StoreError) -> [RuntimeRecord] {
        try await read { db in
            try Row.fetchAll(db, sql: "SELECT id FROM runtimes ORDER BY id").compactMap { row -> RuntimeRecord? in
                try Self.load(db, id: row["id"])
            }
        }
    }

    public func runtime(id: String) async throws(StoreError) -> RuntimeRecord? {
        try await read { db in try Self.load(db, id: id) }
    }

    public func put(_ record: RuntimeRecord, expecting: Int?) async throws(StoreError) -> RuntimeRecord {
        var written = record
        written.revision = (expecting ?? 0) + 1
        let w = written
        try await write { db in
            let header = String(decoding: w.headerJSON.serialized(), as: UTF8.self)
            if let expecting {
                try db.execute(sql: "UPDATE runtimes SET revision = ?, header = ? WHERE id = ? AND revision = ?",
                               arguments: [w.revision, header, w.id, expecting])
                guard db.changesCount == 1 else { throw StoreError.conflict("runtime \(w.id) was changed by another request") }
            } else {
                if try Row.fetchOne(db, sql: "SELECT 1 FROM runtimes WHERE id = ? OR name = ?", arguments: [w.id, w.name]) != nil {
                    throw StoreError.conflict("a runtime named \(w.name) already exists")
                }
                try db.execute(sql: "INSERT INTO runtimes (id, name, revision, header) VALUES (?, ?, ?, ?)",
                               arguments: [w.id, w.name, w.revision, header])
            }
            // Versions are immutable apart from their status; endpoints are few: both rewritten whole.
            try db.execute(sql: "DELETE FROM runtime_versions WHERE runtime_id = ?", arguments: [w.id])
            for v in w.versions {
                try db.execute(sql: "INSERT INTO runtime_versions (runtime_id, version, document) VALUES (?, ?, ?)",
                               arguments: [w.id, v.version, String(decoding: v.json.serialized(), as: UTF8.self)])
            }
            try db.execute(sql: "DELETE FROM runtime_endpoints WHERE runtime_id = ?", arguments: [w.id])
            for e in w.endpoints {
                try db.execute(sql: "INSERT INTO runtime_endpoints (runtime_id, name, document) VALUES (?, ?, ?)",
                               arguments: [w.id, e.name, String(decoding: e.json.serialized(), as: UTF8.self)])
            }
        }
        return written
    }

    public func delete(id: String, expecting: Int) async throws(StoreError) {
        try await write { db in
            try db.execute(sql: "DELETE FROM runtimes WHERE id = ? AND revision = ?", arguments: [id, expecting])
            guard db.changesCount == 1 else { throw StoreError.conflict("runtime \(id) was changed by another request") }
            try db.execute(sql: "DELETE FROM client_tokens WHERE runtime_id = ?", arguments: [id])
        }
    }

    public func clientToken(_ token: String) async throws(StoreError) -> ClientTokenRecord? {
        try await read { db in
            guard let row = try Row.fetchOne(db, sql: "SELECT * FROM client_tokens WHERE token = ?", arguments: [token]) else { return nil }
            return ClientTokenRecord(token: row["token"], fingerprint: row["fingerprint"], runtimeID: row["runtime_id"],
                                     result: row["result"], createdAt: row["created_at"])
        }
    }

    public func saveClientToken(_ r: ClientTokenRecord) async throws(StoreError) {
        try await write { db in
            try db.execute(sql: "INSERT OR IGNORE INTO client_tokens (token, fingerprint, runtime_id, result, created_at) VALUES (?, ?, ?, ?, ?)",
                           arguments: [r.token, r.fingerprint, r.runtimeID, r.result, r.createdAt])
            guard db.changesCount == 1 else { throw StoreError.conflict("client token \(r.token) is already in use") }
        }
    }

    public func changes() -> AsyncStream<StoreChange> { AsyncStream { $0.finish() } }

    public func close() async { try? queue.close() }

    private static func load(_ db: Database, id: String) throws -> RuntimeRecord? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM runtimes WHERE id = ?", arguments: [id]) else { return nil }
        let versions = try String.fetchAll(db, sql: "SELECT document FROM runtime_versions WHERE runtime_id = ? ORDER BY version", arguments: [id])
        let endpoints = try String.fetchAll(db, sql: "SELECT document FROM runtime_endpoints WHERE runtime_id = ?", arguments: [id])
        guard let record = RuntimeRecord(id: row["id"], name: row["name"], revision: row["revision"],
                                         header: try JSON.parseStored(row["header"]),
                                         versions: try versions.map { s throws(StoreError) in try JSON.parseStored(s) },
                                         endpoints: try endpoints.map { s throws(StoreError) in try JSON.parseStored(s) }) else {
            throw StoreError.unavailable("runtime \(id)'s stored record is malformed")
        }
        return record
    }

    private func read<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws(StoreError) -> T {
        do { return try await queue.read(body) } catch let e as StoreError { throw e } catch { throw .unavailable("\(error)") }
    }

    private func write<T: Sendable>(_ body: @escaping @Sendable (Database) throws -> T) async throws(StoreError) -> T {
        do { return try await queue.write(body) } catch let e as StoreError { throw e } catch { throw .unavailable("\(error)") }
    }
}
