/// AWS `application/vnd.amazon.eventstream` framing (big-endian):
/// `[total u32][headers length u32][CRC32 of the 8 bytes][headers][payload][CRC32 of all before]`.
public enum EventStream {
    public static let contentType = "application/vnd.amazon.eventstream"
    static let preludeBytes = 12
    static let maxMessageBytes = 16 << 20
    static let maxHeaderBytes = 128 << 10

    public struct Message: Equatable, Sendable {
        /// String headers only (type 7), in order; that is all AgentCore sends.
        public var headers: [(String, String)]
        public var payload: [UInt8]

        public init(headers: [(String, String)], payload: [UInt8]) {
            self.headers = headers
            self.payload = payload
        }

        public static func == (a: Self, b: Self) -> Bool {
            a.payload == b.payload && a.headers.map(\.0) == b.headers.map(\.0) && a.headers.map(\.1) == b.headers.map(\.1)
        }

        public func encoded() -> [UInt8] {
            var headerBytes: [UInt8] = []
            for (name, value) in headers {
                let n = Array(name.utf8), v = Array(value.utf8)
                precondition(n.count <= 255 && v.count <= 0xFFFF, "event stream header too long")
                headerBytes.append(UInt8(n.count))
                headerBytes += n
                headerBytes.append(7)
                headerBytes += be16(UInt16(v.count))
                headerBytes += v
            }
            let total = EventStream.preludeBytes + headerBytes.count + payload.count + 4
            var out: [UInt8] = []
            out.reserveCapacity(total)
            out += be32(UInt32(total))
            out += be32(UInt32(headerBytes.count))
            out += be32(CRC32.checksum(out))
            out += headerBytes
            out += payload
            out += be32(CRC32.checksum(out))
            return out
        }

        /// An `event` message of type `eventType` with a JSON payload.
        public static func event(_ eventType: String, json payload: [UInt8]) -> Message {
            Message(headers: [(":message-type", "event"), (":event-type", eventType), (":content-type", "application/json")], payload: payload)
        }

        /// A modelled exception mid-stream; the client raises it as the named exception.
        public static func exception(_ error: AgentCoreError) -> Message {
            Message(headers: [(":message-type", "exception"), (":exception-type", error.kind.eventStreamMember),
                              (":content-type", "application/json")], payload: error.body)
        }
    }

    public struct DecodeError: Error, Equatable, Sendable {
        public var message: String
    }

    /// Decodes whole messages from the front of `buffer`, leaving a partial one for later.
    public static func decode(_ buffer: inout [UInt8]) throws(DecodeError) -> [Message] {
        var messages: [Message] = []
        var offset = 0
        while buffer.count - offset >= preludeBytes {
            let total = Int(readBE32(buffer, offset)), headersLength = Int(readBE32(buffer, offset + 4))
            guard CRC32.checksum(buffer[offset..<offset + 8]) == readBE32(buffer, offset + 8) else { throw DecodeError(message: "prelude CRC mismatch") }
            guard total >= preludeBytes + 4, total <= maxMessageBytes, headersLength <= maxHeaderBytes,
                  headersLength <= total - preludeBytes - 4 else { throw DecodeError(message: "bad lengths \(total)/\(headersLength)") }
            guard buffer.count - offset >= total else { break }
            guard CRC32.checksum(buffer[offset..<offset + total - 4]) == readBE32(buffer, offset + total - 4) else {
                throw DecodeError(message: "message CRC mismatch")
            }
            var headers: [(String, String)] = []
            var h = offset + preludeBytes
            let headersEnd = h + headersLength
            while h < headersEnd {
                let nameLength = Int(buffer[h]); h += 1
                guard h + nameLength + 3 <= headersEnd else { throw DecodeError(message: "truncated header") }
                // Strict: a lenient decode would repair bad bytes into U+FFFD, and a header would not read
                // back as the bytes that were sent (the event-stream fuzzer found it).
                guard let name = String(validating: buffer[h..<h + nameLength], as: UTF8.self) else {
                    throw DecodeError(message: "header name is not UTF-8")
                }
                h += nameLength
                guard buffer[h] == 7 else { throw DecodeError(message: "header type \(buffer[h]) unsupported") }
                let valueLength = Int(buffer[h + 1]) << 8 | Int(buffer[h + 2]); h += 3
                guard h + valueLength <= headersEnd else { throw DecodeError(message: "truncated header value") }
                guard let value = String(validating: buffer[h..<h + valueLength], as: UTF8.self) else {
                    throw DecodeError(message: "header \(name) is not UTF-8")
                }
                headers.append((name, value)); h += valueLength
            }
            messages.append(Message(headers: headers, payload: Array(buffer[headersEnd..<offset + total - 4])))
            offset += total
        }
        buffer.removeFirst(offset)
        return messages
    }

    static func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xFF)] }
    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 0xFF), UInt8((v >> 8) & 0xFF), UInt8(v & 0xFF)] }
    static func readBE32(_ b: [UInt8], _ i: Int) -> UInt32 {
        UInt32(b[i]) << 24 | UInt32(b[i + 1]) << 16 | UInt32(b[i + 2]) << 8 | UInt32(b[i + 3])
    }
}

/// The events of an InvokeAgentRuntimeCommand response stream.
public enum CommandEvent: Equatable, Sendable {
    case start
    case stdout(String)
    case stderr(String)
    case stop(exitCode: Int, timedOut: Bool)

    public var message: EventStream.Message {
        let body: JSON = switch self {
        case .start: ["contentStart": [:]]
        case .stdout(let s): ["contentDelta": ["stdout": .string(s)]]
        case .stderr(let s): ["contentDelta": ["stderr": .string(s)]]
        case .stop(let code, let timedOut): ["contentStop": ["exitCode": .int(Int64(code)), "status": .string(timedOut ? "TIMED_OUT" : "COMPLETED")]]
        }
        return .event("chunk", json: body.serialized())
    }
}

import CubicleJSON

/// CRC-32 (IEEE 802.3, reflected, as zlib), which the event stream uses for both checksums.
public enum CRC32 {
    static let table: [UInt32] = (0..<256).map { i in
        var c = UInt32(i)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    public static func checksum(_ bytes: some Sequence<UInt8>) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes { c = table[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}
