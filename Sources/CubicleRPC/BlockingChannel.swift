#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux

/// The control channel as cubicle-init uses it: blocking, single-threaded, descriptors queued in arrival
/// order and handed to the message that declares them.
public struct BlockingChannel {
    public let fd: Int32
    private var decoder: FrameDecoder
    private var pendingFDs: [Int32] = []
    private var buffer = [UInt8](repeating: 0, count: 16384)

    public init(fd: Int32, maxFrameSize: Int = Frame.defaultMaxSize) {
        self.fd = fd
        self.decoder = FrameDecoder(maxSize: maxFrameSize)
    }

    public enum ReceiveError: Error {
        case closed
        case frame(FrameError)
        case decode(RPCDecodeError)
        case missingDescriptors
        case system(SystemError)
    }

    /// Decodes a frame that is already buffered, without reading.
    public mutating func nextBuffered() throws(ReceiveError) -> (RPCMessage, [Int32])? {
        let payload: [UInt8]?
        do { payload = try decoder.next() } catch { throw .frame(error) }
        guard let payload else { return nil }
        let message: RPCMessage
        do { message = try RPCMessage.decode(payload) } catch { throw .decode(error) }
        let n = message.fdCount
        guard pendingFDs.count >= n else { throw .missingDescriptors }
        let fds = Array(pendingFDs.prefix(n))
        pendingFDs.removeFirst(n)
        return (message, fds)
    }

    /// Reads once (blocking unless `flags` says otherwise) and returns the next whole message, if any.
    public mutating func receive(flags: Int32 = 0) throws(ReceiveError) -> (RPCMessage, [Int32])? {
        if let m = try nextBuffered() { return m }
        let result: (count: Int, truncated: Bool)
        do { result = try Descriptors.receive(fd, into: &buffer, fds: &pendingFDs, flags: flags) } catch { throw .system(error) }
        if result.count == 0 { throw .closed }
        decoder.append(buffer[0..<result.count])
        return try nextBuffered()
    }

    public func send(_ message: RPCMessage, fds: [Int32] = []) throws(SystemError) {
        let bytes = Frame.encode(message.encoded())
        var offset = 0
        while offset < bytes.count {
            offset += try Descriptors.send(fd, bytes[offset...], fds: offset == 0 ? fds : [])
        }
    }

    public mutating func closeDescriptors() {
        for f in pendingFDs { close(f) }
        pendingFDs.removeAll()
    }
}
