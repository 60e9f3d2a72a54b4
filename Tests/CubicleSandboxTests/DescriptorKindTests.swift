#if canImport(Glibc)
import Glibc
#endif
import CCubicleShim
import CubicleLinux
import Testing

/// What init hands back is checked for its kind before it is used: a shell's terminal must be a ptmx
/// master, not any character device a hostile init could send (its /dev/null, a peer end).
struct DescriptorKindTests {
    @Test func onlyAPseudoTerminalMasterIsOne() throws {
        // The way init opens a shell's terminal.
        var master: Int32 = -1, peer: Int32 = -1
        try #require(cubicle_open_pty(24, 80, getuid(), getgid(), &master, &peer) == 0, "no pseudo-terminals on this host: \(String(cString: strerror(errno)))")
        defer { close(master); close(peer) }
        #expect(DescriptorKind.of(master) == .terminalMaster)
        #expect(DescriptorKind.of(peer) != .terminalMaster, "the peer end is not a master")
        let null = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(null) }
        #expect(DescriptorKind.of(null) != .terminalMaster, "another character device is not a terminal")
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        #expect(DescriptorKind.of(fds[0]) == .readablePipe)
        #expect(DescriptorKind.of(fds[1]) != .terminalMaster)
    }
}
