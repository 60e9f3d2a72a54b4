import Glibc

/// Starts a detached thread of this process's own for `body`: for work that must stay on one thread
/// (namespace changes) or that waits on a timer for the daemon's lifetime, where a Dispatch queue would
/// keep waking and retiring pool threads.
public func startThread(_ what: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
    final class Box: Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { raw in
        Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
        return nil
    }, box)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(box).release()
        throw SystemError("start the \(what) thread", errno: rc)
    }
    pthread_detach(thread)
}
