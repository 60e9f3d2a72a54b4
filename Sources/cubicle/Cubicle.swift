#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import CubicleAgentCore
import CubicleCLI
import CubicleJSON

@main
struct Cubicle: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cubicle",
        abstract: "See and control cubicled's live sessions.",
        subcommands: [PS.self, Inspect.self, Logs.self, Exec.self, Stop.self, Runtimes.self, Images.self, Storage.self, Events.self, Top.self, Invoke.self])

    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let e as CLIError {
            FileHandleOut.stderr("cubicle: \(e.description)\n")
            Glibc.exit(e.exitCode)
        } catch {
            exit(withError: error)
        }
    }
}

struct Options: ParsableArguments {
    @Option(name: .customLong("admin-socket"), help: "cubicled's admin socket (env CUBICLE_ADMIN_SOCKET).")
    var adminSocket: String = getenv("CUBICLE_ADMIN_SOCKET").map { String(cString: $0) } ?? "/run/cubicle/admin.sock"

    @Flag(name: .customLong("json"), help: "JSON for scripts instead of a table.")
    var json = false

    var client: AdminClient { AdminClient(socketPath: adminSocket) }
}

enum FileHandleOut {
    static func stdout(_ text: String) { write(1, Array(text.utf8)) }
    static func stderr(_ text: String) { write(2, Array(text.utf8)) }
    static func write(_ fd: Int32, _ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n <= 0 { if errno == EINTR { continue }; return }
            offset += n
        }
    }
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

func path(_ id: String, _ suffix: String = "") -> String {
    "/v1/sessions/" + PercentEncoding.encode(id) + suffix
}

struct PS: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "ps", abstract: "List live sessions and warm-pool sandboxes (with --all, ended sessions too).")
    @OptionGroup var options: Options
    @Flag(name: .shortAndLong, help: "Include ended sessions still retained, with their end reason.") var all = false

    func run() throws {
        let reply = try options.client.get("/v1/sessions" + (all ? "?all=true" : ""))
        if options.json { return FileHandleOut.stdout(reply.text + "\n") }
        FileHandleOut.stdout(SessionTable.render(reply["sessions"]?.arrayValue ?? [], warm: reply["warm"]?.arrayValue ?? [], now: now(), all: all))
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Everything about one session: pids, namespaces, cgroup, ids, limits, usage, lifecycle.")
    @OptionGroup var options: Options
    @Argument(help: "Session id or unique prefix.") var id: String

    func run() throws {
        let reply = try options.client.get(path(id))
        if options.json { return FileHandleOut.stdout(reply.text + "\n") }
        FileHandleOut.stdout(Self.describe(reply, indent: ""))
    }

    static func describe(_ json: JSON, indent: String) -> String {
        guard case .object(let members) = json else { return indent + json.text + "\n" }
        var out = ""
        for key in members.keys.sorted() {
            let value = members[key]!
            if case .object = value {
                out += "\(indent)\(key):\n" + describe(value, indent: indent + "  ")
            } else if case .string(let s) = value {
                out += "\(indent)\(key): \(s)\n"
            } else {
                out += "\(indent)\(key): \(value.text)\n"
            }
        }
        return out
    }
}

struct Logs: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The agent's stdout and stderr.")
    @OptionGroup var options: Options
    @Flag(name: .shortAndLong, help: "Keep printing new lines until the session ends.") var follow = false
    @Option(name: .customLong("tail"), help: "Only the last N lines kept.") var tail: Int?
    @Argument(help: "Session id or unique prefix.") var id: String

    func run() throws {
        var query: [String] = []
        if follow { query.append("follow=true") }
        if let tail { query.append("tail=\(max(0, tail))") }
        let c = try options.client.open("GET", path(id, "/logs") + (query.isEmpty ? "" : "?" + query.joined(separator: "&")))
        while let line = try c.nextJSONLine() {
            if options.json { FileHandleOut.stdout(line.text + "\n"); continue }
            let text = (line["text"]?.stringValue ?? "") + "\n"
            if line["stream"]?.stringValue == "stderr" { FileHandleOut.stderr(text) } else { FileHandleOut.stdout(text) }
        }
    }
}

struct Exec: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a command in a session, as InvokeAgentRuntimeCommand does; exits with its exit code.")
    @OptionGroup var options: Options
    @Option(name: .customLong("timeout"), help: "Seconds before the command is killed (1...3600).") var timeout = 300
    @Flag(name: .customShort("i"), help: "Interactive: keep stdin open to the command (with -t).") var interactive = false
    @Flag(name: .customShort("t"), help: "A terminal: the command runs on a terminal of its own, this one in raw mode (with -i).") var tty = false
    @Argument(help: "Session id or unique prefix.") var id: String
    @Argument(parsing: .postTerminator, help: "The command and its arguments, after --.") var command: [String] = []

    func run() throws {
        if interactive || tty {
            guard interactive && tty else { throw CLIError("exec takes -i and -t together (-it): an interactive shell on a terminal", exitCode: 2) }
            let code = try InteractiveShell.run(socketPath: options.adminSocket, session: id, command: command)
            if code != 0 { throw ExitCode(code) }
            return
        }
        guard !command.isEmpty else { throw CLIError("usage: cubicle exec ID -- COMMAND [ARG...]", exitCode: 2) }
        let c = try options.client.open("POST", path(id, "/exec"),
                                        body: ["command": .string(ShellQuote.join(command)), "timeout": .int(Int64(timeout))])
        var code: Int32 = 255
        while let event = try c.nextJSONLine() {
            if options.json { FileHandleOut.stdout(event.text + "\n") }
            if let s = event["stdout"]?.stringValue, !options.json { FileHandleOut.stdout(s) }
            if let s = event["stderr"]?.stringValue, !options.json { FileHandleOut.stderr(s) }
            if let exit = event["exitCode"]?.intValue {
                code = Int32(clamping: exit)
                if event["timedOut"] == .bool(true), !options.json { FileHandleOut.stderr("cubicle: command timed out after \(timeout)s\n") }
            }
        }
        if code != 0 { throw ExitCode(code) }
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "End a session now: kill everything in it and wipe its files.")
    @OptionGroup var options: Options
    @Argument(help: "Session id or unique prefix.") var id: String

    func run() throws {
        let reply = try options.client.request("POST", path(id, "/stop"))
        if options.json { return FileHandleOut.stdout(reply.text + "\n") }
        FileHandleOut.stdout("\(reply["id"]?.stringValue ?? id) stopped\n")
    }
}

struct Runtimes: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The runtimes cubicled serves.")
    @OptionGroup var options: Options

    func run() throws {
        let reply = try options.client.get("/v1/runtimes")
        if options.json { return FileHandleOut.stdout(reply.text + "\n") }
        var t = Table(["RUNTIME", "STATUS", "VERSIONS (SESSIONS)", "ENDPOINTS", "PROTOCOL", "MEMORY", "CPUS", "IDLE TIMEOUT", "MAX LIFETIME", "ARTIFACT"])
        for r in reply["runtimes"]?.arrayValue ?? [] {
            // v1(0) v2(3): each version and its live sessions; DEFAULT=2 named=1: where each endpoint points.
            let versions = (r["versions"]?.arrayValue ?? []).map { v in
                "v\(v["version"]?.intValue ?? 0)(\(v["sessions"]?.intValue ?? 0))" + (v["status"]?.stringValue == "READY" ? "" : ":" + (v["status"]?.stringValue ?? "?"))
            }.joined(separator: " ")
            let endpoints = (r["endpoints"]?.arrayValue ?? []).map { e in
                "\(e["name"]?.stringValue ?? "?")=\(e["liveVersion"]?.intValue.map { String($0) } ?? "-")"
                    + (e["targetVersion"]?.intValue != e["liveVersion"]?.intValue ? "->\(e["targetVersion"]?.intValue.map { String($0) } ?? "-")" : "")
            }.joined(separator: " ")
            let status = (r["status"]?.stringValue ?? "?") + (r["declared"]?.boolValue == true ? " (declared)" : "")
            let artifact = r["containerUri"]?.stringValue ?? (r["command"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: " ")
            t.rows.append([r["name"]?.stringValue ?? "?", status, versions, endpoints, r["protocol"]?.stringValue ?? "-",
                           Format.bytes(r["limits"]?["memoryBytes"]?.intValue), r["limits"]?["cpus"]?.doubleValue.map { Format.oneDecimal($0) } ?? "-",
                           r["idleRuntimeSessionTimeout"]?.intValue.map { Format.duration(Double($0)) } ?? "-",
                           r["maxLifetime"]?.intValue.map { Format.duration(Double($0)) } ?? "-", artifact])
        }
        FileHandleOut.stdout(t.render())
    }
}

struct Images: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The image store: images, their size and the runtimes that use them.",
                                                    subcommands: [List.self, Prune.self], defaultSubcommand: List.self)

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the stored images.")
        @OptionGroup var options: Options

        func run() throws {
            let reply = try options.client.get("/v1/images")
            if options.json { return FileHandleOut.stdout(reply.text + "\n") }
            var t = Table(["IMAGE", "MANIFEST", "LAYERS", "SIZE", "RUNTIMES"])
            for i in reply["images"]?.arrayValue ?? [] {
                t.rows.append([i["reference"]?.stringValue ?? "?", String((i["manifest"]?.stringValue ?? "?").prefix(19)),
                               i["layers"]?.intValue.map { String($0) } ?? "-", Format.bytes(i["size"]?.intValue),
                               (i["runtimes"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")])
            }
            FileHandleOut.stdout(t.render())
        }
    }

    struct Prune: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove the images no runtime names, and the layers only they used.")
        @OptionGroup var options: Options

        func run() throws {
            let reply = try options.client.request("POST", "/v1/images/prune")
            if options.json { return FileHandleOut.stdout(reply.text + "\n") }
            let removed = (reply["removed"]?.arrayValue ?? []).compactMap(\.stringValue)
            FileHandleOut.stdout(removed.isEmpty ? "nothing to prune\n" : removed.map { "removed \($0)\n" }.joined())
        }
    }
}

struct Storage: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Session storage: each session id's kept volume, its size, last use and expiry.",
                                                    subcommands: [List.self, Remove.self], defaultSubcommand: List.self)

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the kept session volumes.")
        @OptionGroup var options: Options

        func run() throws {
            let reply = try options.client.get("/v1/storage")
            if options.json { return FileHandleOut.stdout(reply.text + "\n") }
            let now = Double(time(nil))
            var t = Table(["NAME", "RUNTIME", "SESSION", "OWNER", "SIZE", "LIMIT", "LAST USE", "EXPIRES IN", "MOUNTED"])
            for v in reply["volumes"]?.arrayValue ?? [] {
                let last = Double(v["lastUsed"]?.intValue ?? 0), expires = Double(v["expires"]?.intValue ?? 0)
                t.rows.append([String((v["name"]?.stringValue ?? "?").prefix(12)), v["runtime"]?.stringValue ?? "?", v["session"]?.stringValue ?? "?",
                               v["owner"]?.stringValue ?? "?", Format.bytes(v["bytes"]?.intValue), Format.bytes(v["bytesLimit"]?.intValue),
                               Format.duration(max(0, now - last)) + " ago", Format.duration(max(0, expires - now)),
                               v["mounted"]?.boolValue == true ? "yes" : "no"])
            }
            FileHandleOut.stdout(t.render())
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Remove a session's volume (at once, or when its live sandbox ends), leaving nothing of it readable.")
        @OptionGroup var options: Options
        @Argument(help: "The volume's name (or a unique prefix of it) or its session id.") var volume: String

        func run() throws {
            let reply = try options.client.request("DELETE", "/v1/storage/" + PercentEncoding.encode(volume))
            if options.json { return FileHandleOut.stdout(reply.text + "\n") }
            let name = reply["removed"]?.stringValue ?? volume
            FileHandleOut.stdout(reply["deferred"]?.boolValue == true ? "removing \(name) when its session's sandbox ends\n" : "removed \(name)\n")
        }
    }
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Follow session events: created, ready, ended (with reason), OOM kills, limit hits.")
    @OptionGroup var options: Options

    func run() throws {
        let c = try options.client.open("GET", "/v1/events")
        while let event = try c.nextJSONLine() {
            if options.json { FileHandleOut.stdout(event.text + "\n"); continue }
            var line = "\(event["type"]?.stringValue ?? "?")  \(event["session"]?.stringValue ?? "?")  runtime=\(event["runtime"]?.stringValue ?? "?")"
            if let r = event["reason"]?.stringValue { line += "  reason=\(r)" }
            FileHandleOut.stdout(line + "\n")
        }
    }
}

struct Top: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Live sessions, refreshing in place: state, age, idle, CPU %, memory, pids, invocations.")
    @OptionGroup var options: Options
    @Option(name: .customLong("interval"), help: "Seconds between refreshes.") var interval = 2.0
    @Option(name: .customLong("iterations"), help: "Stop after N frames (default: until interrupted).") var iterations: Int?

    func run() throws {
        var screen = TopScreen()
        var frame = 0
        while iterations.map({ frame < $0 }) ?? true {
            let reply = try options.client.get("/v1/sessions")
            var ws = winsize()
            let width = ioctl(1, UInt(TIOCGWINSZ), &ws) == 0 && ws.ws_col > 0 ? Int(ws.ws_col) : 120
            // Home, draw, clear what the last frame left below: no flicker, no scrollback spam.
            FileHandleOut.stdout("\u{1B}[H" + screen.render(reply["sessions"]?.arrayValue ?? [], now: now(), width: width)
                .split(separator: "\n", omittingEmptySubsequences: false).joined(separator: "\u{1B}[K\n") + "\u{1B}[J")
            frame += 1
            if iterations.map({ frame >= $0 }) ?? false { break }
            usleep(UInt32(max(0.1, interval) * 1_000_000))
        }
    }
}

struct Invoke: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "InvokeAgentRuntime on the data plane; prints the agent's response.")
    @Option(name: .customLong("endpoint"), help: "cubicled's data plane, HOST:PORT.") var endpoint = "127.0.0.1:8080"
    @Option(name: .customLong("session"), help: "Runtime session id (33+ characters); a new one when omitted.") var session: String?
    @Option(name: .customLong("account-id"), help: "Account id sent with a bare runtime name (an ARN carries its own).") var accountID = "000000000000"
    @Flag(name: .customLong("stream"), help: "Print the response as it arrives.") var stream = false
    @Argument(help: "Runtime name or ARN.") var runtime: String
    @Argument(help: "The payload, sent as is.") var payload: String

    func run() throws {
        guard let colon = endpoint.lastIndex(of: ":"), let port = UInt16(endpoint[endpoint.index(after: colon)...]) else {
            throw CLIError("--endpoint must be HOST:PORT", exitCode: 2)
        }
        let id = session ?? Self.newSessionID()
        let c = try HTTPConnection(.tcp(host: String(endpoint[..<colon]), port: port))
        try c.send(method: "POST", path: "/runtimes/\(PercentEncoding.encode(runtime))/invocations?qualifier=DEFAULT" + (runtime.hasPrefix("arn:") ? "" : "&accountId=\(PercentEncoding.encode(accountID))"),
                   headers: [("Content-Type", "application/json"), ("Accept", stream ? "text/event-stream" : "application/json"),
                             ("X-Amzn-Bedrock-AgentCore-Runtime-Session-Id", id)],
                   body: Array(payload.utf8))
        FileHandleOut.stderr("session \(c.header("x-amzn-bedrock-agentcore-runtime-session-id") ?? id)\n")
        if !(200..<300).contains(c.status) {
            let body = String(decoding: try c.readWholeBody(limit: 1 << 20), as: UTF8.self)
            throw CLIError("\(c.status) \(c.header("x-amzn-errortype") ?? ""): \(body)")
        }
        if stream {
            while let part = try c.readBody() { FileHandleOut.write(1, part) }
        } else {
            FileHandleOut.write(1, try c.readWholeBody())
        }
    }

    static func newSessionID() -> String {
        var rng = SystemRandomNumberGenerator()
        let hex = Array("0123456789abcdef".utf8)
        return "cubicle-cli-" + String(decoding: (0..<32).map { _ in hex[Int(rng.next() % 16)] }, as: UTF8.self)
    }
}
