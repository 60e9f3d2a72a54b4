#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import CubicleLinux
import CubicleRPC

/// The host's end of one sandbox's control channel. Everything arriving on it is hostile: frames are
/// bounded and strictly decoded, descriptors are counted against what the message declares, and any
/// violation closes this connection (ending this sandbox) and nothing else. All state lives on `queue`.
public final class InitConnection: @unchecked Sendable {
    public typealias Reply = (value: JSON, fds: [Int32])

    public enum CloseReason: Sendable, Equatable {
        case eof
        case violation(String)
        case closedByHost
    }

    let fd: Int32
    let queue: DispatchQueue
    private var source: DispatchSourceRead?
    private var decoder: FrameDecoder
    private var pendingFDs: [Int32] = []
    private var pending: [Int64: CheckedContinuation<Reply, Error>] = [:]
    private var nextID: Int64 = 1
    private var closeReason: CloseReason?
    private var buffer = [UInt8](repeating: 0, count: 65536)
    private let onNotification: @Sendable (String, JSON) -> Void
    private let onClose: @Sendable (CloseReason) -> Void

    /// Notifications init may send; none carries descriptors.
    static let notifications: Set<String> = [RPCMethod.ready, RPCMethod.failed, RPCMethod.agentExited, RPCMethod.commandExited]

    public init(fd: Int32, label: String, maxFrameSize: Int = Frame.defaultMaxSize,
                onNotification: @escaping @Sendable (String, JSON) -> Void,
                onClose: @escaping @Sendable (CloseReason) -> Void) {
        self.fd = fd
        self.queue = DispatchQueue(label: "cubicle.init.\(label)")
        self.decoder = FrameDecoder(maxSize: maxFrameSize)
        self.onNotification = onNotification
        self.onClose = onClose
    }

    public func start() {
        try? Descriptors.setNonBlocking(fd)
        let source = DispatchSource.makeReadSource(fileDescriptor: fd, queue: queue)
        source.setEventHandler { [weak self] in self?.readAvailable() }
        source.setCancelHandler { [fd] in Glibc.close(fd) }
        self.source = source
        source.resume()
    }

    private func readAvailable() {
        while closeReason == nil {
            let r: (count: Int, truncated: Bool)
            do {
                r = try Descriptors.receive(fd, into: &buffer, fds: &pendingFDs, flags: Int32(MSG_DONTWAIT))
            } catch {
                if error.errno == EAGAIN { return }
                shut(.violation("recvmsg: \(error)"))
                return
            }
            if r.truncated { shut(.violation("more descriptors than one message may carry")); return }
            if pendingFDs.count > RPCMessage.maxFDs * 2 { shut(.violation("descriptors without a message")); return }
            if r.count == 0 { shut(.eof); return }
            decoder.append(buffer[0..<r.count])
            do {
                while let payload = try decoder.next() {
                    try deliver(RPCMessage.decode(payload))
                    if closeReason != nil { return }
                }
            } catch {
                shut(.violation("\(error)"))
                return
            }
        }
    }

    private func takeFDs(_ n: Int) throws(SandboxError) -> [Int32] {
        guard pendingFDs.count >= n else { throw .protocolViolation("message declares \(n) descriptors, \(pendingFDs.count) arrived") }
        let fds = Array(pendingFDs.prefix(n))
        pendingFDs.removeFirst(n)
        return fds
    }

    private func deliver(_ message: RPCMessage) throws {
        switch message {
        case .notification(let method, let params, let n):
            guard n == 0, Self.notifications.contains(method) else {
                throw SandboxError.protocolViolation("unexpected notification \(method)")
            }
            onNotification(method, params)
        case .result(let id, let value, let n):
            let fds = try takeFDs(n)
            guard let c = pending.removeValue(forKey: id) else {
                fds.forEach { Glibc.close($0) }  // an answer to a call that already timed out
                return
            }
            c.resume(returning: (value, fds))
        case .error(let id, let err):
            guard let id, let c = pending.removeValue(forKey: id) else { return }
            c.resume(throwing: SandboxError.rpc(err))
        case .request(_, let method, _, _):
            throw SandboxError.protocolViolation("init may not call the host (\(method))")
        }
    }

    private func shut(_ reason: CloseReason) {
        guard closeReason == nil else { return }
        closeReason = reason
        source?.cancel()
        for f in pendingFDs { Glibc.close(f) }
        pendingFDs.removeAll()
        let waiting = pending
        pending.removeAll()
        for (_, c) in waiting { c.resume(throwing: SandboxError.ended(Self.describe(reason))) }
        onClose(reason)
    }

    static func describe(_ reason: CloseReason) -> String {
        switch reason {
        case .eof: "cubicle-init closed its control channel"
        case .violation(let why): "protocol violation: \(why)"
        case .closedByHost: "closed by the host"
        }
    }

    public func shutdown() {
        queue.sync { shut(.closedByHost) }
    }

    /// Writes one frame. Frames are small and init reads promptly, so a full socket buffer is waited out
    /// briefly rather than queued; an init that will not read for a second is treated as broken.
    private func write(_ message: RPCMessage) throws(SandboxError) {
        let bytes = Frame.encode(message.encoded())
        var offset = 0
        var waited = 0
        while offset < bytes.count {
            do {
                offset += try Descriptors.send(fd, bytes[offset...], fds: [], flags: Int32(MSG_DONTWAIT))
            } catch {
                guard error.errno == EAGAIN, waited < 1000 else { throw .system(error) }
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1)
                waited += 1
            }
        }
    }

    public func call(_ method: String, _ params: JSON, timeoutMilliseconds: Int = 10_000) async throws -> Reply {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Reply, Error>) in
            queue.async { [self] in
                if let r = closeReason { c.resume(throwing: SandboxError.ended(Self.describe(r))); return }
                let id = nextID
                nextID += 1
                pending[id] = c
                do {
                    try write(.request(id: id, method: method, params: params, fds: 0))
                } catch {
                    pending.removeValue(forKey: id)
                    c.resume(throwing: error)
                    return
                }
                queue.asyncAfter(deadline: .now() + .milliseconds(timeoutMilliseconds)) { [weak self] in
                    guard let self, let c = self.pending.removeValue(forKey: id) else { return }
                    c.resume(throwing: SandboxError.initTimeout(method))
                }
            }
        }
    }
}
