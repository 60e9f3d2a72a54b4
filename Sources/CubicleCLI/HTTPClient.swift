#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON

/// A small blocking HTTP/1.1 client for the CLI: one request per connection, over the admin Unix socket or
/// TCP to the data plane, with the response body read as it arrives (chunked or sized).
public struct CLIError: Error, CustomStringConvertible {
    public var description: String
    public var exitCode: Int32 = 1
    public init(_ description: String, exitCode: Int32 = 1) {
        self.description = description
        self.exitCode = exitCode
    }
}

public enum Endpoint: Sendable {
    case unix(String)
    case tcp(host: String, port: UInt16)
}

public final class HTTPConnection {
    private let fd: Int32
    private var buffer: [UInt8] = []
    private var position = 0
    public private(set) var status = 0
    public private(set) var headers: [(String, String)] = []
    private var chunked = false
    private var remaining: Int? = nil
    private var chunkLeft = 0
    private var finished = false
    /// Body bytes read past the last whole NDJSON line.
    private var pending: [UInt8] = []

    public init(_ endpoint: Endpoint) throws(CLIError) {
        switch endpoint {
        case .unix(let path):
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw CLIError("socket: \(String(cString: strerror(errno)))") }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw CLIError("admin socket path too long: \(path)") }
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (i, b) in bytes.enumerated() { raw[i] = b }
            }
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if rc != 0 {
                let e = errno
                close(fd)
                let hint = e == EACCES ? " (the admin socket is for root, or its configured group)" :
                    (e == ENOENT || e == ECONNREFUSED) ? " (is cubicled running? --admin-socket or CUBICLE_ADMIN_SOCKET)" : ""
                throw CLIError("cannot connect to \(path): \(String(cString: strerror(e)))\(hint)")
            }
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var result: UnsafeMutablePointer<addrinfo>?
            guard getaddrinfo(host, String(port), &hints, &result) == 0, let first = result else {
                throw CLIError("cannot resolve \(host)")
            }
            defer { freeaddrinfo(result) }
            fd = socket(first.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0, connect(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) == 0 else {
                let e = errno
                if fd >= 0 { close(fd) }
                throw CLIError("cannot connect to \(host):\(port): \(String(cString: strerror(e)))")
            }
        }
    }

    deinit { close(fd) }

    /// Sends the request and reads the status line and headers.
    public func send(method: String, path: String, headers extra: [(String, String)] = [], body: [UInt8] = []) throws(CLIError) {
        var head = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: \(body.count)\r\n"
        for (k, v) in extra { head += "\(k): \(v)\r\n" }
        head += "\r\n"
        try write(Array(head.utf8) + body)
        guard let statusLine = try readLine(), statusLine.hasPrefix("HTTP/1."), statusLine.count >= 12,
              let code = Int(statusLine.dropFirst(9).prefix(3)) else {
            throw CLIError("malformed response from the server")
        }
        status = code
        while let line = try readLine(), !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            let value = String(line[line.index(after: colon)...].drop { $0 == " " })
            headers.append((name, value))
            if name == "transfer-encoding", value.lowercased().contains("chunked") { chunked = true }
            if name == "content-length" { remaining = Int(value) }
        }
    }

    public func header(_ name: String) -> String? { headers.first { $0.0 == name }?.1 }

    /// The next bytes of the body, nil at its end.
    public func readBody() throws(CLIError) -> [UInt8]? {
        if finished { return nil }
        if chunked {
            if chunkLeft == 0 {
                guard let sizeLine = try readLine(), let size = Int(sizeLine.split(separator: ";")[0], radix: 16) else {
                    throw CLIError("malformed chunked body")
                }
                if size == 0 { finished = true; return nil }
                chunkLeft = size
            }
            let bytes = try readSome(max: chunkLeft)
            chunkLeft -= bytes.count
            if chunkLeft == 0 { _ = try readLine() }
            return bytes
        }
        if let r = remaining {
            if r == 0 { finished = true; return nil }
            let bytes = try readSome(max: r)
            remaining = r - bytes.count
            return bytes
        }
        let bytes = try readSome(max: 65536, eofOK: true)
        if bytes.isEmpty { finished = true; return nil }
        return bytes
    }

    public func readWholeBody(limit: Int = 64 << 20) throws(CLIError) -> [UInt8] {
        var out: [UInt8] = []
        while let part = try readBody() {
            out += part
            if out.count > limit { throw CLIError("response too large") }
        }
        return out
    }

    /// Newline-delimited JSON, one value per call, nil at the end of the stream.
    public func nextJSONLine() throws(CLIError) -> JSON? {
        while true {
            if let nl = pending.firstIndex(of: 0x0A) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                if line.isEmpty { continue }
                do { return try JSON.parse(line) } catch { throw CLIError("malformed line from the server: \(error)") }
            }
            guard let more = try readBody() else {
                if pending.isEmpty { return nil }
                defer { pending.removeAll() }
                do { return try JSON.parse(pending) } catch { throw CLIError("malformed line from the server: \(error)") }
            }
            pending += more
        }
    }
    // MARK: - Bytes

    private func write(_ bytes: [UInt8]) throws(CLIError) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CLIError("write: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    private func fill(eofOK: Bool = false) throws(CLIError) -> Bool {
        if position > 0 && position == buffer.count { buffer.removeAll(keepingCapacity: true); position = 0 }
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n < 0 {
                if errno == EINTR { continue }
                throw CLIError("read: \(String(cString: strerror(errno)))")
            }
            if n == 0 {
                if eofOK { return false }
                throw CLIError("the server closed the connection early")
            }
            buffer += chunk[0..<n]
            return true
        }
    }

    private func readLine() throws(CLIError) -> String? {
        while true {
            if let nl = buffer[position...].firstIndex(of: 0x0A) {
                var end = nl
                if end > position && buffer[end - 1] == 0x0D { end -= 1 }
                let line = String(decoding: buffer[position..<end], as: UTF8.self)
                position = nl + 1
                return line
            }
            guard try fill(eofOK: true) else { return nil }
        }
    }

    private func readSome(max: Int, eofOK: Bool = false) throws(CLIError) -> [UInt8] {
        if position == buffer.count {
            guard try fill(eofOK: eofOK) else { return [] }
        }
        let end = min(buffer.count, position + max)
        defer { position = end }
        return Array(buffer[position..<end])
    }
}

/// The admin API as the CLI uses it.
public struct AdminClient {
    public let socketPath: String

    public init(socketPath: String) { self.socketPath = socketPath }

    /// Opens a request whose body the caller reads (streams); fails with the server's message on an error status.
    public func open(_ method: String, _ path: String, body: JSON? = nil) throws(CLIError) -> HTTPConnection {
        let c = try HTTPConnection(.unix(socketPath))
        try c.send(method: method, path: path, headers: body == nil ? [] : [("Content-Type", "application/json")], body: body?.serialized() ?? [])
        guard (200..<300).contains(c.status) else {
            let bytes = try c.readWholeBody(limit: 1 << 20)
            let message = (try? JSON.parse(bytes))?["error"]?.stringValue ?? String(decoding: bytes, as: UTF8.self)
            throw CLIError(message.isEmpty ? "HTTP \(c.status)" : message)
        }
        return c
    }

    public func get(_ path: String) throws(CLIError) -> JSON {
        try request("GET", path)
    }

    public func request(_ method: String, _ path: String, body: JSON? = nil) throws(CLIError) -> JSON {
        let c = try open(method, path, body: body)
        let bytes = try c.readWholeBody()
        do { return try JSON.parse(bytes) } catch { throw CLIError("malformed reply from cubicled: \(error)") }
    }
}
