import Dispatch

/// Blocking host work — clone and the wait for exec, cgroup freezer waits, the tmpfs wipe, reaping — runs
/// on Dispatch's threads, which grow when they block, never on the executor that serves requests (in
/// cubicled that is NIO's event loops: a millisecond blocked there is a millisecond every connection waits).
enum BlockingWork {
    static let queue = DispatchQueue(label: "cubicle.sandbox.blocking", attributes: .concurrent)

    static func run<T: Sendable, E: Error>(_ body: @escaping @Sendable () throws(E) -> T) async throws(E) -> T {
        let result: Result<T, E> = await withCheckedContinuation { continuation in
            queue.async {
                do throws(E) { continuation.resume(returning: .success(try body())) } catch { continuation.resume(returning: .failure(error)) }
            }
        }
        return try result.get()
    }
}
