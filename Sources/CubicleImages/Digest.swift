#if canImport(Glibc)
import Glibc
#endif
import Crypto
import CubicleLinux

/// A content digest, `sha256:` and 64 lowercase hex digits: the only algorithm the store accepts.
public struct Digest: Hashable, Sendable, CustomStringConvertible, Comparable {
    public let hex: String

    public enum Failure: Error, Equatable, CustomStringConvertible, Sendable {
        case invalid(String)
        case mismatch(expected: String, actual: String, what: String)
        public var description: String {
            switch self {
            case .invalid(let t): return "\(t) is not a sha256 digest (sha256: and 64 lowercase hex digits)"
            case .mismatch(let e, let a, let what): return "\(what) does not match its digest: expected \(e), got \(a)"
            }
        }
    }

    public init(_ text: String) throws(Failure) {
        guard text.hasPrefix("sha256:") else { throw .invalid(text) }
        let h = String(text.dropFirst(7))
        guard h.utf8.count == 64, h.utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }) else { throw .invalid(text) }
        hex = h
    }

    init(hex: String) { self.hex = hex }

    public var description: String { "sha256:" + hex }
    public static func < (a: Digest, b: Digest) -> Bool { a.hex < b.hex }

    public static func of(_ bytes: some Collection<UInt8>) -> Digest {
        Digest(hex: Hex.encode(Array(SHA256.hash(data: Array(bytes)))))
    }

    /// The digest of a file's contents, read in 1 MiB pieces, and its size.
    public static func of(file path: String) throws(SystemError) -> (Digest, Int64) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { throw SystemError.lastError("open \(path)") }
        defer { close(fd) }
        var hasher = SHA256()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var total: Int64 = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; throw SystemError.lastError("read \(path)") }
            if n == 0 { break }
            hasher.update(data: buffer[0..<n])
            total += Int64(n)
        }
        return (Digest(hex: Hex.encode(Array(hasher.finalize()))), total)
    }

    /// Throws unless `path` holds exactly the content this digest names.
    public func verify(file path: String, what: String) throws -> Int64 {
        let (actual, size) = try Digest.of(file: path)
        guard actual == self else { throw Failure.mismatch(expected: description, actual: actual.description, what: what) }
        return size
    }

}
