#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux

/// A block of host uids and gids that one sandbox's user namespace maps 0..<size onto. Never host root.
public struct UIDRange: Equatable, Sendable {
    public var slot: Int
    public var hostBase: UInt32
    public var size: UInt32
    public func host(_ inside: UInt32) -> UInt32 { hostBase + inside }
}

/// Hands out disjoint host id ranges. A slot is taken by creating `<dir>/<slot>` with O_EXCL, so two
/// daemons, or a daemon and the one it replaced, never give one range to two sandboxes.
public struct UIDRangeAllocator: Sendable {
    public let directory: String
    public let firstHostID: UInt32
    public let size: UInt32
    public let count: Int

    public init(directory: String, firstHostID: UInt32 = 1_000_000, size: UInt32 = 65536, count: Int = 4096) {
        precondition(firstHostID > 0 && UInt64(firstHostID) + UInt64(size) * UInt64(count) < UInt64(UInt32.max))
        self.directory = directory
        self.firstHostID = firstHostID
        self.size = size
        self.count = count
    }

    public func allocate(owner: String) throws(SandboxError) -> UIDRange {
        do { try Files.makeDirectories(directory, mode: 0o700) } catch { throw .system(error) }
        // Start at a random slot so allocation stays O(1) on average with many live sandboxes.
        let start = Int.random(in: 0..<count)
        for i in 0..<count {
            let slot = (start + i) % count
            let path = "\(directory)/\(slot)"
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
            if fd < 0 {
                if errno == EEXIST { continue }
                throw .system(.lastError("create \(path)"))
            }
            _ = try? Files.writeAll(fd, Array(owner.utf8), step: "write \(path)")
            close(fd)
            return UIDRange(slot: slot, hostBase: firstHostID + UInt32(slot) * size, size: size)
        }
        throw .uidRangesExhausted(count)
    }

    public func release(_ range: UIDRange) {
        unlink("\(directory)/\(range.slot)")
    }

    /// Releases the slot only if `owner` still holds it: a leftover found after a crash may name a slot that
    /// has since been leased to another sandbox.
    public func release(_ range: UIDRange, ifOwnedBy owner: String) {
        let path = "\(directory)/\(range.slot)"
        guard (try? Files.read(path, limit: 256)) == owner else { return }
        unlink(path)
    }

    public func allocated() -> [Int] {
        ((try? Files.listDirectory(directory)) ?? []).compactMap { Int($0) }.sorted()
    }
}
