/// The few DNS messages the session DNS reads and writes (RFC 1035): a session's query, read as hostile
/// bytes; the upstream's answer, read for its A records; and the answer the session gets, written fresh
/// (nothing of either input is copied through but the question's name, re-encoded).
public enum DNSMessage {
    public struct Question: Equatable, Sendable {
        public var id: UInt16
        /// Lowercased, without the trailing dot.
        public var name: String
        public var type: UInt16
        public var recursionDesired: Bool
        public init(id: UInt16, name: String, type: UInt16, recursionDesired: Bool) {
            self.id = id; self.name = name; self.type = type; self.recursionDesired = recursionDesired
        }
    }

    public struct Answer: Equatable, Sendable {
        public var address: UInt32
        public var ttl: UInt32
        public init(address: UInt32, ttl: UInt32) { self.address = address; self.ttl = ttl }
    }

    public static let typeA: UInt16 = 1
    public static let typeAAAA: UInt16 = 28
    public static let classIN: UInt16 = 1

    public enum Rcode: UInt8, Sendable { case noError = 0, formatError = 1, serverFailure = 2, nameError = 3, notImplemented = 4, refused = 5 }

    /// A session's query: one question of class IN, a standard query, no compression. Nil for anything else
    /// (the server then stays silent, as for garbage).
    public static func parseQuery(_ bytes: [UInt8]) -> Question? {
        guard bytes.count >= 12, bytes.count <= 512 else { return nil }
        let flags = UInt16(bytes[2]) << 8 | UInt16(bytes[3])
        // QR must be 0 (a query) and the opcode 0 (QUERY).
        guard flags & 0x8000 == 0, (flags >> 11) & 0xF == 0 else { return nil }
        guard u16(bytes, 4) == 1, u16(bytes, 6) == 0, u16(bytes, 8) == 0 else { return nil }
        var at = 12
        guard let name = readName(bytes, &at, allowPointers: false), at + 4 <= bytes.count else { return nil }
        guard u16(bytes, at + 2) == classIN else { return nil }
        return Question(id: u16(bytes, 0), name: name, type: u16(bytes, at), recursionDesired: flags & 0x0100 != 0)
    }

    /// A query for `name` of `type`, with recursion desired, as cubicled sends it upstream.
    public static func query(id: UInt16, name: String, type: UInt16) -> [UInt8]? {
        guard let encoded = encodeName(name) else { return nil }
        var out: [UInt8] = [UInt8(id >> 8), UInt8(id & 255), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
        out += encoded
        out += [UInt8(type >> 8), UInt8(type & 255), 0, 1]
        return out
    }

    /// The upstream's answer to `query(id:name:type: A)`: its rcode and the A records in its answer section
    /// (a CNAME chain's final addresses included). Nil when it is not that answer.
    public static func parseResponse(_ bytes: [UInt8], id: UInt16, name: String) -> (rcode: UInt8, answers: [Answer])? {
        guard bytes.count >= 12, u16(bytes, 0) == id else { return nil }
        let flags = u16(bytes, 2)
        guard flags & 0x8000 != 0 else { return nil }
        let rcode = UInt8(flags & 0xF)
        let qd = Int(u16(bytes, 4)), an = Int(u16(bytes, 6))
        guard qd == 1 else { return nil }
        var at = 12
        guard let qname = readName(bytes, &at, allowPointers: true), qname == name, at + 4 <= bytes.count else { return nil }
        at += 4
        var answers: [Answer] = []
        for _ in 0..<min(an, 256) {
            guard readName(bytes, &at, allowPointers: true) != nil, at + 10 <= bytes.count else { return nil }
            let type = u16(bytes, at), klass = u16(bytes, at + 2)
            let ttl = UInt32(u16(bytes, at + 4)) << 16 | UInt32(u16(bytes, at + 6))
            let length = Int(u16(bytes, at + 8))
            at += 10
            guard at + length <= bytes.count else { return nil }
            if type == typeA, klass == classIN, length == 4 {
                let a = UInt32(bytes[at]) << 24 | UInt32(bytes[at + 1]) << 16 | UInt32(bytes[at + 2]) << 8 | UInt32(bytes[at + 3])
                answers.append(Answer(address: a, ttl: ttl))
            }
            at += length
        }
        return (rcode, answers)
    }

    /// The session's answer: its question, and `answers` as A records of that very name.
    public static func response(to q: Question, rcode: Rcode, answers: [Answer] = []) -> [UInt8] {
        let encoded = encodeName(q.name) ?? [0]
        let shown = answers.prefix(16)
        var flags: UInt16 = 0x8000 | 0x0080 | UInt16(rcode.rawValue)  // QR, RA
        if q.recursionDesired { flags |= 0x0100 }
        var out: [UInt8] = [UInt8(q.id >> 8), UInt8(q.id & 255), UInt8(flags >> 8), UInt8(flags & 255), 0, 1, 0, UInt8(shown.count), 0, 0, 0, 0]
        out += encoded
        out += [UInt8(q.type >> 8), UInt8(q.type & 255), 0, 1]
        for a in shown {
            out += [0xC0, 12, 0, 1, 0, 1]  // the question's name, type A, class IN
            out += [UInt8(a.ttl >> 24), UInt8(a.ttl >> 16 & 255), UInt8(a.ttl >> 8 & 255), UInt8(a.ttl & 255), 0, 4]
            out += [UInt8(a.address >> 24), UInt8(a.address >> 16 & 255), UInt8(a.address >> 8 & 255), UInt8(a.address & 255)]
        }
        return out
    }

    static func u16(_ b: [UInt8], _ i: Int) -> UInt16 { UInt16(b[i]) << 8 | UInt16(b[i + 1]) }

    /// A name in wire form at `at`, advancing past it. Labels of letters, digits, '-' and '_' only (so the
    /// name is safe to log and to match), at most 255 bytes; pointers only where allowed, only backwards.
    static func readName(_ b: [UInt8], _ at: inout Int, allowPointers: Bool) -> String? {
        var labels: [String] = []
        var cursor = at
        var jumped = false
        var total = 0
        var jumps = 0
        while true {
            guard cursor < b.count else { return nil }
            let length = Int(b[cursor])
            if length & 0xC0 == 0xC0 {
                guard allowPointers, cursor + 1 < b.count, jumps < 16 else { return nil }
                let target = (length & 0x3F) << 8 | Int(b[cursor + 1])
                guard target < cursor else { return nil }
                if !jumped { at = cursor + 2 }
                jumped = true
                jumps += 1
                cursor = target
                continue
            }
            guard length & 0xC0 == 0 else { return nil }
            cursor += 1
            if length == 0 { break }
            guard cursor + length <= b.count else { return nil }
            total += length + 1
            guard total <= 254 else { return nil }  // 255 octets on the wire with the root label
            let label = b[cursor..<cursor + length]
            guard label.allSatisfy({ isNameByte($0) }) else { return nil }
            labels.append(String(decoding: label, as: UTF8.self).lowercased())
            cursor += length
        }
        if !jumped { at = cursor }
        return labels.joined(separator: ".")
    }

    public static func isNameByte(_ c: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(c)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) || c == UInt8(ascii: "-") || c == UInt8(ascii: "_")
    }

    static func encodeName(_ name: String) -> [UInt8]? {
        var out: [UInt8] = []
        for label in name.split(separator: ".", omittingEmptySubsequences: false) where !name.isEmpty {
            let bytes = Array(label.utf8)
            guard !bytes.isEmpty, bytes.count <= 63, bytes.allSatisfy(isNameByte) else { return nil }
            out.append(UInt8(bytes.count))
            out += bytes
        }
        out.append(0)
        return out.count <= 255 ? out : nil
    }
}
