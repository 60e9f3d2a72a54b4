/// Frames on the control channel: a 4-byte big-endian length, then that many bytes of JSON.
/// Descriptors ride on the first byte of the frame that names them (see `RPCMessage.fdCount`).
public enum Frame {
    public static let headerSize = 4
    /// Control messages are small; anything bigger is a hostile or broken peer, not a big message.
    public static let defaultMaxSize = 256 * 1024

    public static func encode(_ payload: [UInt8]) -> [UInt8] {
        let n = UInt32(payload.count)
        return [UInt8(n >> 24), UInt8(n >> 16 & 0xFF), UInt8(n >> 8 & 0xFF), UInt8(n & 0xFF)] + payload
    }
}

public enum FrameError: Error, Equatable, CustomStringConvertible, Sendable {
    case oversized(Int, max: Int)
    case empty

    public var description: String {
        switch self {
        case .oversized(let n, let max): "frame of \(n) bytes exceeds the \(max)-byte limit"
        case .empty: "empty frame"
        }
    }
}

/// Accumulates stream bytes and yields whole frames. Rejects a too-large length as soon as the header
/// arrives, so a peer cannot make us buffer more than `maxSize` + 4 bytes.
public struct FrameDecoder: Sendable {
    public let maxSize: Int
    private var buffer: [UInt8] = []
    private var start = 0

    public init(maxSize: Int = Frame.defaultMaxSize) {
        self.maxSize = maxSize
    }

    public var bufferedBytes: Int { buffer.count - start }

    public mutating func append(_ bytes: some Collection<UInt8>) {
        if start > 0 && start == buffer.count {
            buffer.removeAll(keepingCapacity: true)
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame's payload, nil when more bytes are needed.
    public mutating func next() throws(FrameError) -> [UInt8]? {
        guard buffer.count - start >= Frame.headerSize else { return nil }
        let n = Int(buffer[start]) << 24 | Int(buffer[start + 1]) << 16 | Int(buffer[start + 2]) << 8 | Int(buffer[start + 3])
        guard n > 0 else { throw .empty }
        guard n <= maxSize else { throw .oversized(n, max: maxSize) }
        guard buffer.count - start - Frame.headerSize >= n else { return nil }
        let payload = Array(buffer[(start + Frame.headerSize)..<(start + Frame.headerSize + n)])
        start += Frame.headerSize + n
        if start > 65536 && start * 2 > buffer.count {
            buffer.removeFirst(start)
            start = 0
        }
        return payload
    }
}
