import NIOCore
import Synchronization

/// The agent's stdout and stderr, kept per session up to a byte budget (oldest lines dropped first),
/// with followers. Bytes come from inside the sandbox, so lines are cut at `maxLineBytes`.
public final class LogRing: Sendable {
    public struct Line: Sendable, Equatable {
        public var stream: String  // "stdout" | "stderr"
        public var text: String
        public var sequence: Int
    }

    public static let maxLineBytes = 16 << 10
    let budget: Int
    private let state = Mutex<(lines: [Line], start: Int, bytes: Int, next: Int, followers: [Int: AsyncStream<Line>.Continuation], nextFollower: Int, closed: Bool)>(([], 0, 0, 0, [:], 0, false))

    public init(budgetBytes: Int = 1 << 20) { budget = budgetBytes }

    func append(stream: String, _ text: String) {
        let followers = state.withLock { s -> [AsyncStream<Line>.Continuation] in
            let line = Line(stream: stream, text: text, sequence: s.next)
            s.next += 1
            s.lines.append(line)
            s.bytes += text.utf8.count
            while s.bytes > budget, s.start < s.lines.count {
                s.bytes -= s.lines[s.start].text.utf8.count
                s.start += 1
            }
            if s.start > 1024 && s.start * 2 > s.lines.count { s.lines.removeFirst(s.start); s.start = 0 }
            return Array(s.followers.values).map { c in c.yield(line); return c }
        }
        _ = followers
    }

    /// The last `count` lines kept (all when nil).
    public func tail(_ count: Int? = nil) -> [Line] {
        state.withLock { s in
            let kept = s.lines[s.start...]
            return Array(count.map { kept.suffix($0) } ?? kept[...])
        }
    }

    /// Lines from now on, until the session ends.
    public func follow() -> AsyncStream<Line> {
        let (stream, continuation) = AsyncStream<Line>.makeStream(bufferingPolicy: .bufferingNewest(4096))
        let id = state.withLock { s -> Int? in
            guard !s.closed else { return nil }
            let id = s.nextFollower
            s.nextFollower += 1
            s.followers[id] = continuation
            return id
        }
        guard let id else { continuation.finish(); return stream }
        continuation.onTermination = { [weak self] _ in _ = self?.state.withLock { $0.followers.removeValue(forKey: id) } }
        return stream
    }

    func close() {
        let followers = state.withLock { s -> [AsyncStream<Line>.Continuation] in
            s.closed = true
            defer { s.followers = [:] }
            return Array(s.followers.values)
        }
        followers.forEach { $0.finish() }
    }

    /// Reads a pipe from the sandbox into the ring until it closes. Takes ownership of `fd`.
    func drain(fd: Int32, stream name: String, group: any EventLoopGroup) async {
        var splitter = LineSplitter(maxLineBytes: Self.maxLineBytes)
        await readSandboxPipe(fd: fd, group: group) { bytes in
            for line in splitter.feed(bytes) { append(stream: name, line) }
        }
        if let rest = splitter.finish() { append(stream: name, rest) }
    }
}

/// Splits bytes into lines, cutting any line at `maxLineBytes`; invalid UTF-8 becomes U+FFFD.
struct LineSplitter {
    let maxLineBytes: Int
    private var pending: [UInt8] = []

    init(maxLineBytes: Int) { self.maxLineBytes = maxLineBytes }

    mutating func feed(_ bytes: some Sequence<UInt8>) -> [String] {
        var out: [String] = []
        for b in bytes {
            if b == 0x0A {
                out.append(String(decoding: pending, as: UTF8.self))
                pending.removeAll(keepingCapacity: true)
            } else {
                pending.append(b)
                if pending.count >= maxLineBytes {
                    out.append(String(decoding: pending, as: UTF8.self))
                    pending.removeAll(keepingCapacity: true)
                }
            }
        }
        return out
    }

    mutating func finish() -> String? {
        defer { pending = [] }
        return pending.isEmpty ? nil : String(decoding: pending, as: UTF8.self)
    }
}

/// Turns a byte stream into UTF-8 text chunks without splitting a character across chunks.
public struct UTF8Chunker: Sendable {
    private var pending: [UInt8] = []
    public init() {}

    public mutating func feed(_ bytes: some Sequence<UInt8>) -> String {
        pending += bytes
        // Keep back an incomplete trailing sequence (at most 3 bytes).
        var cut = pending.count
        var i = pending.count - 1
        var seen = 0
        while i >= 0 && seen < 4 {
            let b = pending[i]
            if b & 0xC0 == 0x80 { seen += 1; i -= 1; continue }
            let need = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : b >= 0xC0 ? 2 : 1
            if need > seen + 1 && b >= 0xC0 { cut = i }
            break
        }
        let text = String(decoding: pending[..<cut], as: UTF8.self)
        pending.removeFirst(cut)
        return text
    }

    public mutating func finish() -> String {
        defer { pending = [] }
        return String(decoding: pending, as: UTF8.self)
    }
}
