#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
@testable import CubicleRuntimes
import Testing

/// The embedded store on a real SQLite file: what is written survives a reopen, a write that lost a race
/// changes nothing, names and client tokens are unique, and the file is root's alone.
@Suite struct SQLiteRuntimeStoreTests {
    final class Directory {
        let path: String
        init() {
            var template = Array("/tmp/cubicle-store-test-XXXXXX".utf8CString)
            path = String(cString: mkdtemp(&template)!)
        }
        deinit {
            for name in ["runtimes.db", "runtimes.db-wal", "runtimes.db-shm"] { unlink(path + "/" + name) }
            rmdir(path)
        }
        var db: String { path + "/runtimes.db" }
    }

    func record(_ id: String, name: String) -> RuntimeRecord {
        let doc: JSON = ["agentRuntimeArtifact": ["containerConfiguration": ["containerUri": "registry.example.com/a:1"]]]
        var r = RuntimeRecord(id: id, name: name, createdAt: 1000, status: .creating, tags: ["team": "a"],
                              versions: [RuntimeVersionRecord(version: 1, createdAt: 1000, status: .creating, document: doc)])
        r.endpoints = [RuntimeEndpointRecord(name: "DEFAULT", id: "DEFAULT-0123456789", liveVersion: nil, targetVersion: 1, status: .creating, createdAt: 1000)]
        return r
    }

    @Test func aRecordSurvivesAReopenWhole() async throws {
        let dir = Directory()
        let store = try SQLiteRuntimeStore(path: dir.db)
        var written = try await store.put(record("a-0123456789", name: "a"), expecting: nil)
        written.status = .ready
        written.versions[0].status = .ready
        written.endpoints[0].liveVersion = 1
        written.endpoints[0].status = .ready
        written = try await store.put(written, expecting: written.revision)
        #expect(written.revision == 2)
        await store.close()
        let again = try SQLiteRuntimeStore(path: dir.db)
        let loaded = try await again.runtime(id: "a-0123456789")
        #expect(loaded == written)
        #expect(try await again.all().map(\.id) == ["a-0123456789"])
        var st = stat()
        #expect(stat(dir.db, &st) == 0 && st.st_mode & 0o077 == 0, "nobody but root reads the store")
        await again.close()
    }

    @Test func aWriteThatLostARaceChangesNothing() async throws {
        let dir = Directory()
        let store = try SQLiteRuntimeStore(path: dir.db)
        let first = try await store.put(record("a-0123456789", name: "a"), expecting: nil)
        var mine = first, theirs = first
        theirs.tags["who"] = "them"
        _ = try await store.put(theirs, expecting: first.revision)
        mine.tags["who"] = "me"
        mine.versions.append(RuntimeVersionRecord(version: 2, createdAt: 1001, status: .updating, document: [:]))
        await #expect(throws: StoreError.self) { _ = try await store.put(mine, expecting: first.revision) }
        let stored = try #require(try await store.runtime(id: "a-0123456789"))
        #expect(stored.tags["who"] == "them" && stored.versions.count == 1, "the loser's version and tags were not written")
        // The same name under another id, and a second create of the same id, are conflicts too.
        await #expect(throws: StoreError.self) { _ = try await store.put(record("a-9999999999", name: "a"), expecting: nil) }
        await #expect(throws: StoreError.self) { _ = try await store.put(record("a-0123456789", name: "b"), expecting: nil) }
        await #expect(throws: StoreError.self) { try await store.delete(id: "a-0123456789", expecting: first.revision) }
        try await store.delete(id: "a-0123456789", expecting: stored.revision)
        #expect(try await store.all().isEmpty)
        await store.close()
    }

    @Test func clientTokensAreRecordedOnce() async throws {
        let dir = Directory()
        let store = try SQLiteRuntimeStore(path: dir.db)
        let token = ClientTokenRecord(token: String(repeating: "t", count: 40), fingerprint: "f1", runtimeID: "a-0123456789", result: "1", createdAt: 1)
        try await store.saveClientToken(token)
        await #expect(throws: StoreError.self) { try await store.saveClientToken(ClientTokenRecord(token: token.token, fingerprint: "f2", runtimeID: "b", result: nil, createdAt: 2)) }
        #expect(try await store.clientToken(token.token) == token)
        #expect(try await store.clientToken("other") == nil)
        await store.close()
    }

    @Test func storeLocations() {
        #expect(StoreLocation.parse("sqlite:/var/lib/cubicle/runtimes.db") == .sqlite(path: "/var/lib/cubicle/runtimes.db"))
        #expect(StoreLocation.parse("sqlite:relative.db") == nil)
        guard case .postgres(let p)? = StoreLocation.parse("postgres://cubicle:s%40cret@db.example.com:6432/fleet?sslmode=disable") else {
            Issue.record("not parsed")
            return
        }
        #expect((p.user, p.password, p.host, p.port, p.database) == ("cubicle", "s@cret", "db.example.com", 6432, "fleet"))
        #expect(StoreLocation.parse("postgres://cubicle:s%40cret@db.example.com:6432/fleet")?.description == "postgres://cubicle@db.example.com:6432/fleet",
                "the password never reaches a log")
        #expect(StoreLocation.parse("postgres://db.example.com/fleet") == nil)
        #expect(StoreLocation.parse("mysql://u@h/d") == nil)
    }
}
