import CubicleAgentCore
import CubicleJSON

/// Where runtimes, their versions and endpoints, and client tokens are kept: SQLite embedded (one host),
/// PostgreSQL for a fleet of cubicleds that define runtimes once. Every write is one transaction.
public protocol RuntimeStore: Sendable {
    /// Every runtime, for the catalog at start.
    func all() async throws(StoreError) -> [RuntimeRecord]
    func runtime(id: String) async throws(StoreError) -> RuntimeRecord?
    /// Writes `record` whole if the stored one is at revision `expecting` (nil: none may exist, and no other
    /// runtime may have its name). Returns the record as written (revision bumped).
    func put(_ record: RuntimeRecord, expecting: Int?) async throws(StoreError) -> RuntimeRecord
    /// Removes a runtime, its versions, endpoints and client tokens, if it is at revision `expecting`.
    func delete(id: String, expecting: Int) async throws(StoreError)
    func clientToken(_ token: String) async throws(StoreError) -> ClientTokenRecord?
    /// Records a token's first use; `.conflict` if it was recorded meanwhile.
    func saveClientToken(_ record: ClientTokenRecord) async throws(StoreError)
    /// What other writers changed (PostgreSQL's LISTEN/NOTIFY); a store no one else writes never yields.
    /// Ends with the store.
    func changes() -> AsyncStream<StoreChange>
    func close() async
}

/// A change another writer made.
public enum StoreChange: Equatable, Sendable {
    /// This runtime changed (or went).
    case runtime(String)
    /// Anything may have changed: the feed was (re)connected, and what was written while it was down was
    /// not heard. The reader compares the whole store with what it serves.
    case everything
}

public enum StoreError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Another write came first (the revision moved, the name or token is taken).
    case conflict(String)
    /// The database failed or could not be reached.
    case unavailable(String)

    public var description: String {
        switch self {
        case .conflict(let m): m
        case .unavailable(let m): "runtime store: \(m)"
        }
    }
}

/// `--store`: `sqlite:PATH` (the default, under --data-dir) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`.
public enum StoreLocation: Equatable, Sendable, CustomStringConvertible {
    case sqlite(path: String)
    case postgres(PostgresLocation)

    public struct PostgresLocation: Equatable, Sendable {
        public var host: String
        public var port: Int
        public var user: String
        public var password: String?
        public var database: String
    }

    public static func parse(_ text: String) -> StoreLocation? {
        if text.hasPrefix("sqlite:") {
            let path = String(text.dropFirst(7))
            return path.hasPrefix("/") ? .sqlite(path: path) : nil
        }
        for scheme in ["postgres://", "postgresql://"] where text.hasPrefix(scheme) {
            let rest = text.dropFirst(scheme.count)
            guard let at = rest.lastIndex(of: "@"), let slash = rest[at...].firstIndex(of: "/") else { return nil }
            let credentials = rest[..<at], hostPort = rest[rest.index(after: at)..<slash]
            let database = String(rest[rest.index(after: slash)...].prefix { $0 != "?" })
            let userParts = credentials.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            guard let user = userParts.first.flatMap({ PercentEncoding.decode(String($0)) }), !user.isEmpty, !database.isEmpty else { return nil }
            let password = userParts.count > 1 ? PercentEncoding.decode(String(userParts[1])) : nil
            var host = String(hostPort), port = 5432
            if let colon = hostPort.lastIndex(of: ":"), !hostPort.hasSuffix("]") {
                guard let p = Int(hostPort[hostPort.index(after: colon)...]), (1...65535).contains(p) else { return nil }
                port = p
                host = String(hostPort[..<colon])
            }
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { return nil }
            return .postgres(PostgresLocation(host: host, port: port, user: user, password: password, database: database))
        }
        return nil
    }

    /// For logs: never the password.
    public var description: String {
        switch self {
        case .sqlite(let path): "sqlite:\(path)"
        case .postgres(let p): "postgres://\(p.user)@\(p.host):\(p.port)/\(p.database)"
        }
    }
}

/// The tables both stores have, one migration per schema change, applied in order and recorded.
enum StoreSchema {
    static let migrations: [(name: String, sql: [String])] = [
        ("v1-runtimes", [
            """
            CREATE TABLE runtimes (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                revision BIGINT NOT NULL,
                header TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE runtime_versions (
                runtime_id TEXT NOT NULL REFERENCES runtimes(id) ON DELETE CASCADE,
                version BIGINT NOT NULL,
                document TEXT NOT NULL,
                PRIMARY KEY (runtime_id, version)
            )
            """,
            """
            CREATE TABLE runtime_endpoints (
                runtime_id TEXT NOT NULL REFERENCES runtimes(id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                document TEXT NOT NULL,
                PRIMARY KEY (runtime_id, name)
            )
            """,
            """
            CREATE TABLE client_tokens (
                token TEXT PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                runtime_id TEXT NOT NULL,
                result TEXT,
                created_at DOUBLE PRECISION NOT NULL
            )
            """,
        ]),
    ]
}

extension JSON {
    static func parseStored(_ text: String) throws(StoreError) -> JSON {
        do { return try JSON.parse(text) } catch { throw .unavailable("a stored document is not JSON: \(error)") }
    }
}
