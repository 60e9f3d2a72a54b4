#if canImport(Glibc)
import Glibc
#endif

/// One blocking HTTP/1.1 connection: enough of the protocol for the AgentCore contract, strict where it
/// must be (bounded head, exact lengths), nothing more.
final class HTTPConnection {
    struct Request {
        var method: String
        var path: String
        var headers: [String: String]  // lowercased names
        var contentLength: Int?
        var chunked: Bool
        var keepAlive: Bool
    }

    enum Failure: Error { case closed, malformed(String) }

    let fd: Int32
    private var buffer: [UInt8] = []
    private var start = 0
    private var remaining = 0       // body bytes left (Content-Length) or in the current chunk
    private var bodyDone = true
    private var chunked = false
    static let maxHead = 64 << 10

    init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    private var available: Int { buffer.count - start }

    private func fill() throws(Failure) {
        if start > 0 && start == buffer.count { buffer.removeAll(keepingCapacity: true); start = 0 }
        if start > (256 << 10) { buffer.removeFirst(start); start = 0 }
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { throw .closed }
        buffer += chunk[0..<n]
    }

    private func readLine(limit: Int) throws(Failure) -> [UInt8] {
        var scanned = 0  // relative to `start`, which `fill` may move
        while true {
            while start + scanned + 1 < buffer.count {
                let i = start + scanned
                if buffer[i] == 0x0D && buffer[i + 1] == 0x0A {
                    let line = Array(buffer[start..<i])
                    start = i + 2
                    return line
                }
                scanned += 1
            }
            guard buffer.count - start < limit else { throw .malformed("line too long") }
            try fill()
        }
    }

    /// The next request's head, or `.closed` when the peer closed between requests.
    func readRequest() throws(Failure) -> Request {
        while !bodyDone { _ = try readBody(max: 64 << 10) }  // skip what the handler left unread
        var lines: [String] = []
        var total = 0
        while true {
            let line = try readLine(limit: Self.maxHead)
            total += line.count + 2
            guard total <= Self.maxHead, lines.count <= 200 else { throw .malformed("head too large") }
            if line.isEmpty { if lines.isEmpty { continue } else { break } }
            lines.append(String(decoding: line, as: UTF8.self))
        }
        let parts = lines[0].split(separator: " ")
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1.") else { throw .malformed("bad request line") }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { throw .malformed("bad header") }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingCharacters()
            headers[name] = headers[name].map { $0 + ", " + value } ?? value
        }
        let isChunked = headers["transfer-encoding"]?.lowercased().contains("chunked") ?? false
        var length: Int? = nil
        if !isChunked, let cl = headers["content-length"] {
            guard let v = Int(cl), v >= 0 else { throw .malformed("bad content-length") }
            length = v
        }
        chunked = isChunked
        remaining = isChunked ? 0 : (length ?? 0)
        bodyDone = !isChunked && remaining == 0
        if headers["expect"]?.lowercased() == "100-continue" && !bodyDone { _ = write("HTTP/1.1 100 Continue\r\n\r\n") }
        let connection = headers["connection"]?.lowercased() ?? ""
        let keepAlive = parts[2] == "HTTP/1.1" ? !connection.contains("close") : connection.contains("keep-alive")
        return Request(method: String(parts[0]), path: String(parts[1]), headers: headers, contentLength: length,
                       chunked: isChunked, keepAlive: keepAlive)
    }

    /// Up to `max` body bytes; nil at the end of the body.
    func readBody(max: Int) throws(Failure) -> [UInt8]? {
        if bodyDone { return nil }
        if chunked && remaining == 0 {
            let sizeLine = try readLine(limit: 1024)
            let hex = String(decoding: sizeLine, as: UTF8.self).split(separator: ";").first ?? ""
            guard let size = Int(hex.trimmingCharacters(), radix: 16), size >= 0 else { throw .malformed("bad chunk size") }
            if size == 0 {
                while try !readLine(limit: 8192).isEmpty {}  // trailers
                bodyDone = true
                return nil
            }
            remaining = size
        }
        if available == 0 { try fill() }
        let n = min(max, remaining, available)
        let out = Array(buffer[start..<start + n])
        start += n
        remaining -= n
        if remaining == 0 {
            if chunked { guard try readLine(limit: 2).isEmpty else { throw .malformed("chunk not followed by CRLF") } }
            else { bodyDone = true }
        }
        return out
    }

    func readWholeBody(limit: Int) throws(Failure) -> [UInt8] {
        var body: [UInt8] = []
        while let part = try readBody(max: 64 << 10) {
            body += part
            guard body.count <= limit else { throw .malformed("body over \(limit) bytes") }
        }
        return body
    }

    @discardableResult
    func write(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            offset += n
        }
        return true
    }

    func write(_ text: String) -> Bool { write(Array(text.utf8)) }

    static func reason(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 400: "Bad Request"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 413: "Payload Too Large"
        default: "Error"
        }
    }

    func respond(status: Int, contentType: String, body: [UInt8], keepAlive: Bool) -> Bool {
        let head = "HTTP/1.1 \(status) \(Self.reason(status))\r\nContent-Type: \(contentType)\r\nContent-Length: \(body.count)\r\n"
            + (keepAlive ? "" : "Connection: close\r\n") + "\r\n"
        return write(Array(head.utf8) + body)
    }

    func startChunked(status: Int, contentType: String, keepAlive: Bool) -> Bool {
        write("HTTP/1.1 \(status) \(Self.reason(status))\r\nContent-Type: \(contentType)\r\nTransfer-Encoding: chunked\r\n"
              + (keepAlive ? "" : "Connection: close\r\n") + "\r\n")
    }

    func writeChunk(_ bytes: [UInt8]) -> Bool {
        guard !bytes.isEmpty else { return true }
        return write(Array((String(bytes.count, radix: 16) + "\r\n").utf8) + bytes + [0x0D, 0x0A])
    }

    func finishChunked() -> Bool { write("0\r\n\r\n") }
}

extension StringProtocol {
    func trimmingCharacters() -> String {
        let u = Array(utf8)
        var a = 0, b = u.count
        while a < b && (u[a] == 0x20 || u[a] == 0x09) { a += 1 }
        while b > a && (u[b - 1] == 0x20 || u[b - 1] == 0x09) { b -= 1 }
        return String(decoding: u[a..<b], as: UTF8.self)
    }
}
