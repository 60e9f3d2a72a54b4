#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux
import CubicleStorage
import Testing

/// Real loop devices and ext4: root only (loop-control, mount).
let canMount = getuid() == 0 && access("/dev/loop-control", R_OK | W_OK) == 0

/// A directory of its own per test, removed with whatever is left in it.
final class Scratch {
    let path: String
    init() {
        var template = Array("/tmp/cubicle-storage-test-XXXXXX".utf8CString)
        path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }
    deinit {
        _ = umount2(path + "/mnt", Int32(MNT_DETACH))
        _ = umount2(path + "/mnt2", Int32(MNT_DETACH))
        let p = Glibc.popen("rm -rf '\(path)'", "r")
        if let p { _ = pclose(p) }
    }
    func file(_ name: String) -> String { path + "/" + name }
}

@Suite(.enabled(if: canMount, "needs root and /dev/loop-control: session storage is an ext4 image on a loop device"))
struct StorageVolumeTests {
    /// A new volume of `limits` in a scratch directory, mounted at its `mnt`.
    func mountedVolume(_ limits: StorageVolume.Limits) throws -> (scratch: Scratch, image: String, mnt: String) {
        let s = Scratch()
        let image = s.file("session.img"), mnt = s.file("mnt")
        mkdir(mnt, 0o700)
        try StorageVolume.create(at: image, limits: limits)
        try StorageVolume.mount(image: image, at: mnt)
        return (s, image, mnt)
    }
    func put(_ path: String, _ text: String) throws {
        let fd = try sys("create \(path)") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        try sys("write \(path)") { write(fd, bytes, bytes.count) }
    }

    /// Writes `bytes` to `path` until it is full or done; the errno that stopped it (0: all written).
    func fill(_ path: String, bytes: Int) -> Int32 {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        let chunk = [UInt8](repeating: 0x5A, count: 1 << 20)
        var left = bytes
        while left > 0 {
            let n = write(fd, chunk, min(chunk.count, left))
            if n < 0 { return errno }
            left -= n
        }
        return fsync(fd) == 0 ? 0 : errno
    }

    @Test func whatIsWrittenSurvivesAnUnmountAndTheRootIsTheAgents() async throws {
        let s = Scratch()
        let image = s.file("session.img"), mnt = s.file("mnt")
        mkdir(mnt, 0o700)
        try StorageVolume.create(at: image, limits: .forBytes(32 << 20))
        var st = stat()
        #expect(stat(image, &st) == 0 && st.st_mode & 0o777 == 0o600, "the image is root's alone")
        try StorageVolume.mount(image: image, at: mnt)
        #expect(stat(mnt, &st) == 0 && st.st_uid == 1000 && st.st_gid == 1000, "the volume's root is the agent's")
        try put(mnt + "/notes.txt", "kept across sandboxes\n")
        try await StorageVolume.unmount(mnt)
        #expect(!Files.exists(mnt + "/notes.txt"), "unmounted")
        try StorageVolume.mount(image: image, at: mnt)
        #expect(try Files.read(mnt + "/notes.txt") == "kept across sandboxes\n")
        try await StorageVolume.unmount(mnt)
        #expect(throws: SystemError.self, "an existing image is never overwritten") { try StorageVolume.create(at: image, limits: .forBytes(32 << 20)) }
    }

    /// A child forked while a descriptor on the volume was open keeps it until it execs or exits (here
    /// it is exec'd and kept, the longest such a hold can be): the unmount still ends with the image let go.
    @Test func anUnmountOutlastsADescriptorAChildInherited() async throws {
        let (s, image, mnt) = try mountedVolume(.forBytes(16 << 20))
        defer { withExtendedLifetime(s) {} }
        let loop = try #require(StorageVolume.loopDevice(mountedAt: mnt))
        let held = open(mnt + "/held", O_WRONLY | O_CREAT, 0o644)  // no O_CLOEXEC: the child keeps it
        #expect(held >= 0)
        var pid: pid_t = 0
        let rc = withCStrings(["sleep", "0.3"]) { args in posix_spawnp(&pid, "sleep", nil, nil, args, environ) }
        close(held)
        #expect(rc == 0)
        defer { var status: Int32 = 0; _ = waitpid(pid, &status, 0) }
        try await StorageVolume.unmount(mnt)
        #expect(!Files.exists("/sys/block/\(loop)/loop/backing_file"), "the loop device let go of the image")
        try StorageVolume.mount(image: image, at: mnt)
        #expect(Files.exists(mnt + "/held"), "mounted again, with what the first mount wrote")
        try await StorageVolume.unmount(mnt)
    }

    @Test func fillingItGivesENOSPCInsideAndNothingOutside() throws {
        let (s, image, mnt) = try mountedVolume(.forBytes(16 << 20))
        defer { withExtendedLifetime(s) {} }  // its deinit detaches what is still mounted
        #expect(fill(mnt + "/big", bytes: 64 << 20) == ENOSPC, "the byte cap holds")
        let usage = try StorageVolume.usage(mnt)
        #expect(usage.bytesLimit <= 16 << 20 && usage.bytes > 8 << 20)
        #expect(StorageVolume.allocatedBytes(image) <= 16 << 20, "the image never grows past its cap on the host")
        #expect(fill(s.file("outside"), bytes: 1 << 20) == 0, "the host's file system is untouched")
    }

    @Test func anInodeFloodStopsAtItsOwnCap() throws {
        let (scratch, _, mnt) = try mountedVolume(StorageVolume.Limits(bytes: 64 << 20, inodes: 1024))
        defer { withExtendedLifetime(scratch) {} }
        var made = 0, stopped: Int32 = 0
        for i in 0..<5000 {
            let fd = open(mnt + "/f\(i)", O_WRONLY | O_CREAT | O_EXCL, 0o644)
            if fd < 0 { stopped = errno; break }
            close(fd)
            made += 1
        }
        #expect(stopped == ENOSPC && made < 1024, "files stop at the inode cap (\(made) made)")
        let usage = try StorageVolume.usage(mnt)
        #expect(usage.inodesLimit <= 1024)
    }

    @Test func aDestroyedImageLeavesNothingReadable() async throws {
        let (scratch, image, mnt) = try mountedVolume(.forBytes(16 << 20))
        defer { withExtendedLifetime(scratch) {} }
        let canary = "cubicle-storage-canary-" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
        try put(mnt + "/secret", String(repeating: canary + "\n", count: 4096))
        try await StorageVolume.unmount(mnt)
        // Hold the image open through its removal: what the file still holds afterwards is readable no more.
        let held = open(image, O_RDONLY)
        defer { close(held) }
        try StorageVolume.destroy(image: image)
        #expect(!Files.exists(image))
        var st = stat()
        #expect(fstat(held, &st) == 0 && st.st_blocks == 0, "every block was given back before the name went")
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var offset: off_t = 0, found = false
        let needle = Array(canary.utf8)
        while true {
            let n = pread(held, &buffer, buffer.count, offset)
            if n <= 0 { break }
            if buffer[0..<n].firstRange(of: needle) != nil { found = true; break }
            offset += off_t(n)
        }
        #expect(!found, "the canary is nowhere in what the file still holds")
        try StorageVolume.destroy(image: image)  // gone already: nothing to do
    }
}
