#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed syscall: which step of which operation failed, and the errno it failed with.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public var step: String
    public var errno: Int32

    public init(_ step: String, errno: Int32) {
        self.step = step
        self.errno = errno
    }

    /// Captures the calling thread's errno; call it straight after the failing syscall.
    public static func lastError(_ step: String) -> SystemError {
        SystemError(step, errno: Glibc.errno)
    }

    public var description: String {
        "\(step): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// Runs a syscall that returns -1 on failure, retrying on EINTR.
@discardableResult
public func sys<T: BinaryInteger>(_ step: @autoclosure () -> String, _ call: () -> T) throws(SystemError) -> T {
    while true {
        let result = call()
        if result != -1 { return result }
        let e = Glibc.errno
        if e == EINTR { continue }
        throw SystemError(step(), errno: e)
    }
}
