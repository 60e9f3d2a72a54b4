import CubicleAgentCore
import CubicleJSON
import CubicleSessions
import CubicleShells
import HTTPTypes
import NIOCore
import NIOHTTP1

extension AdminAPI {
    /// `cubicle exec -it`: `GET /v1/sessions/ID/shell?rows=&cols=&term=&command=JSON` upgraded to a
    /// WebSocket speaking the data plane's shell protocol, to a new shell in a live session that ends with
    /// its connection (no reconnect on the admin socket: the terminal is the operator's own).
    public func decideUpgrade(_ head: HTTPRequestHead, channel: any Channel) async -> UpgradeDecision {
        let parts = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = parts[0].split(separator: "/").map { PercentEncoding.decode(String($0)) ?? String($0) }
        guard head.method == .GET, path.count == 4, path[0] == "v1", path[1] == "sessions", path[3] == "shell" else { return .notOurs }
        let query = QueryString.parse(parts.count > 1 ? String(parts[1]) : "")
        do {
            try await authorize(channel)
            let session = try await live(path[2])
            let rows = query["rows"].flatMap { Int($0) } ?? 24, cols = query["cols"].flatMap { Int($0) } ?? 80
            guard (1...1000).contains(rows), (1...1000).contains(cols) else { throw Failure(.badRequest, "rows and cols are 1 to 1000") }
            let term = query["term"].flatMap { $0.utf8.count <= 64 && $0.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F } ? $0 : nil } ?? "xterm-256color"
            var command = ShellRegistry.defaultCommand
            if let text = query["command"] {
                guard case .array(let items)? = try? JSON.parse(text), !items.isEmpty, items.count <= 256,
                      case let argv = items.compactMap(\.stringValue), argv.count == items.count else {
                    throw Failure(.badRequest, "command is a JSON array of strings")
                }
                command = argv
            }
            let shell: Shell
            do {
                (shell, _) = try await shells.open(in: session, shellID: "admin-" + String(UInt64.random(in: 0...UInt64.max), radix: 16), command: command,
                                                   rows: rows, cols: cols, term: term, graceSeconds: 0)
            } catch .tooMany {
                throw Failure(.tooManyRequests, "the session has \(ShellRegistry.maxPerSession) shells already")
            } catch {
                throw Failure(.internalServerError, error.description)
            }
            return .accepted(HTTPHeaders([(ShellProtocol.shellIDHeader, shell.id)]), serve: { client in
                _ = await ShellSocket.serve(client, shell: shell, reconnected: false, seconds: 86_400)
            }, abandon: { shell.hangUp() })
        } catch let f as Failure {
            return .refused(status: f.status.code, headers: [.contentType: "application/json"], body: Array(JSON.object(["error": .string(f.message)]).text.utf8) + [0x0A])
        } catch {
            return .refused(status: 500, headers: [.contentType: "application/json"], body: Array(JSON.object(["error": .string("\(error)")]).text.utf8) + [0x0A])
        }
    }
}
