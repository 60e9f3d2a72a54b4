// cubicle-demo-agent: the embedded `demo` runtime. Serves the AgentCore HTTP contract on $PORT (8080):
// POST /invocations, GET /ping. One thread per connection, blocking I/O: small, and quick to start.
#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON
import Synchronization

struct AgentState: ~Copyable {
    var tutor = Tutor()
    var turns = 0
    var backgroundTasks = 0
    var statusChanged = Int(time(nil))
}

let state = Mutex(AgentState())
let pid = Int(getpid())

func spawnThread(_ body: @escaping () -> Void) {
    final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }
    var thread = pthread_t()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    pthread_attr_setstacksize(&attributes, 256 << 10)
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    let rc = pthread_create(&thread, &attributes, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        box.body()
        return nil
    }, box)
    pthread_attr_destroy(&attributes)
    if rc != 0 { Unmanaged<Box>.fromOpaque(box).release() }
}

func json(_ value: JSON) -> [UInt8] { value.serialized() }

func ping() -> [UInt8] {
    let (busy, changed) = state.withLock { ($0.backgroundTasks > 0, $0.statusChanged) }
    return json(["status": .string(busy ? "HealthyBusy" : "Healthy"), "time_of_last_update": .int(Int64(changed))])
}

func startBackground(seconds: Double) {
    state.withLock { s in
        if s.backgroundTasks == 0 { s.statusChanged = Int(time(nil)) }
        s.backgroundTasks += 1
    }
    spawnThread {
        usleep(useconds_t(max(0, min(seconds, 86_400)) * 1_000_000))
        state.withLock { s in
            s.backgroundTasks -= 1
            if s.backgroundTasks == 0 { s.statusChanged = Int(time(nil)) }
        }
    }
}

func invoke(_ conn: HTTPConnection, _ request: HTTPConnection.Request) -> Bool {
    let contentType = request.headers["content-type"]?.lowercased() ?? ""
    if contentType.hasPrefix("application/octet-stream") { return echo(conn, request) }
    let body: [UInt8]
    do { body = try conn.readWholeBody(limit: 16 << 20) } catch {
        _ = conn.respond(status: 413, contentType: "application/json", body: json(["error": "Payload too large for the demo agent"]), keepAlive: false)
        return false
    }
    let payload: JSON
    do { payload = try JSON.parse(body) } catch {
        return conn.respond(status: 400, contentType: "application/json",
                            body: json(["error": "Invalid JSON", "details": .string("\(error)")]), keepAlive: request.keepAlive)
    }
    let sessionID = request.headers["x-amzn-bedrock-agentcore-runtime-session-id"]
    let userID = payload["user_id"].flatMap { $0.stringValue ?? $0.intValue.map { String($0) } }
    let user = userID.flatMap { Tutor.users[$0] }
    let prompt = payload["prompt"]?.stringValue ?? ""
    // {"log": "text"} writes one line to stdout, which operators read with `cubicle logs`.
    if let line = payload["log"]?.stringValue {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
    }
    let (answer, reply, turn): (JSON, String, Int) = state.withLock { s in
        s.turns += 1
        let (a, m) = s.tutor.answer(prompt, user: user)
        return (a, m, s.turns)
    }
    var message = reply
    let background: Double? = switch payload["background_seconds"] {
    case .double(let d)?: d
    case let v?: v.intValue.map(Double.init)
    case nil: nil
    }
    if let seconds = background, seconds > 0 {
        startBackground(seconds: seconds)
        message = "Background work started for \(Tutor.format(seconds)) s. " + message
    }
    var result: JSON = ["session_id": sessionID.map { .string($0) } ?? .null, "user": user.map { .string($0) } ?? .null,
                        "answer": answer, "turn": .int(Int64(turn)), "pid": .int(Int64(pid)), "message": .string(message)]
    // What reached the agent of the caller's Authorization: only a JWT authorizer's bearer token should.
    if let authorization = request.headers["authorization"], case .object(var o) = result {
        o["authorization"] = .string(authorization)
        result = .object(o)
    }
    // {"delay_seconds": N}: answer only after N seconds (request time limits are tested with it).
    if let delay = payload["delay_seconds"]?.intValue, delay > 0 { sleep(UInt32(min(delay, 3600))) }
    let wantsStream = payload["stream"]?.boolValue == true || (request.headers["accept"]?.contains("text/event-stream") ?? false)
    let keepAlive = request.keepAlive
    if let code = payload["exit_code"]?.intValue {
        _ = conn.respond(status: 200, contentType: "application/json", body: json(result), keepAlive: false)
        exit(Int32(clamping: code))
    }
    if wantsStream {
        let events = Int(payload["stream_events"]?.intValue ?? 3)
        let interval = UInt32(clamping: payload["stream_interval_ms"]?.intValue ?? 50)
        guard conn.startChunked(status: 200, contentType: "text/event-stream", keepAlive: keepAlive) else { return false }
        for i in 0..<max(0, min(events, 100_000)) {
            let event: JSON = ["event": "progress", "index": .int(Int64(i)), "turn": .int(Int64(turn))]
            guard conn.writeChunk(Array("data: ".utf8) + json(event) + Array("\n\n".utf8)) else { return false }
            usleep(interval * 1000)
        }
        guard conn.writeChunk(Array("data: ".utf8) + json(result) + Array("\n\n".utf8)) else { return false }
        return conn.finishChunked() && keepAlive
    }
    return conn.respond(status: 200, contentType: "application/json", body: json(result), keepAlive: keepAlive)
}

/// Streams an octet-stream body straight back, byte for byte, without holding it.
func echo(_ conn: HTTPConnection, _ request: HTTPConnection.Request) -> Bool {
    if let length = request.contentLength {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: \(length)\r\n\r\n"
        guard conn.write(head) else { return false }
        do {
            while let part = try conn.readBody(max: 256 << 10) { guard conn.write(part) else { return false } }
        } catch { return false }
        return request.keepAlive
    }
    guard conn.startChunked(status: 200, contentType: "application/octet-stream", keepAlive: request.keepAlive) else { return false }
    do {
        while let part = try conn.readBody(max: 256 << 10) { guard conn.writeChunk(part) else { return false } }
    } catch { return false }
    return conn.finishChunked() && request.keepAlive
}

func serve(_ fd: Int32) {
    let conn = HTTPConnection(fd: fd)
    while true {
        let request: HTTPConnection.Request
        do { request = try conn.readRequest() } catch { return }
        let path = request.path.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.path
        let keep: Bool
        switch (request.method, path) {
        case ("GET", "/ping"):
            keep = conn.respond(status: 200, contentType: "application/json", body: ping(), keepAlive: request.keepAlive) && request.keepAlive
        case ("POST", "/invocations"):
            keep = invoke(conn, request)
        default:
            keep = conn.respond(status: 404, contentType: "application/json", body: json(["error": "Not found"]), keepAlive: request.keepAlive) && request.keepAlive
        }
        if !keep { return }
    }
}

signal(SIGPIPE, SIG_IGN)
let port = UInt16(getenv("PORT").flatMap { Int(String(cString: $0)) } ?? 8080)
let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
var one: Int32 = 1
setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
var address = sockaddr_in()
address.sin_family = sa_family_t(AF_INET)
address.sin_port = port.bigEndian
address.sin_addr.s_addr = INADDR_ANY
let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
guard listener >= 0, bound == 0, listen(listener, 512) == 0 else {
    print("cubicle-demo-agent: cannot listen on port \(port): \(String(cString: strerror(errno)))")
    exit(1)
}
let banner = Array("cubicle-demo-agent listening on 0.0.0.0:\(port), pid \(pid)\n".utf8)
_ = banner.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
while true {
    let fd = accept(listener, nil, nil)
    if fd < 0 { if errno == EINTR || errno == ECONNABORTED || errno == EMFILE { usleep(errno == EMFILE ? 10_000 : 0) }; continue }
    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    spawnThread { serve(fd) }
}
