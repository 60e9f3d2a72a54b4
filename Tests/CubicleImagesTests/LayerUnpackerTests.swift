#if canImport(Glibc)
import Glibc
#endif
@testable import CubicleImages
import CubicleLinux
import Foundation
import Testing

/// Layers unpacked as overlayfs reads them, and hostile layers refused with nothing written outside. The
/// archives are written by Python's tarfile (the test's tool, not the code under test).
@Suite(.serialized) struct LayerUnpackerTests {
    let dir: String

    init() throws {
        dir = "/tmp/cubicle-layer-test-\(UInt32.random(in: 0...UInt32.max))"
        try Files.makeDirectories(dir + "/out", mode: 0o700)
        try Files.makeDirectories(dir + "/outside", mode: 0o700)
    }

    func cleanup() { try? Files.removeTree(dir) }

    /// Runs `script` with `tarfile`, `io`, `gzip` imported and `path` bound to the archive to write.
    func archive(_ name: String, _ script: String) throws -> String {
        let path = "\(dir)/\(name)"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = ["-c", "import tarfile, io, gzip\npath = \(String(reflecting: path))\n" + script]
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "python3 could not write \(name)")
        return path
    }

    func unpack(_ path: String, limits: LayerUnpacker.Limits = .init()) throws -> String {
        let out = "\(dir)/out/\(UUID().uuidString)"
        try Files.makeDirectories(out, mode: 0o700)
        try LayerUnpacker(limits: limits).unpack(archivePath: path, into: out)
        return out
    }

    func lstatOf(_ p: String) -> stat? {
        var st = stat()
        return lstat(p, &st) == 0 ? st : nil
    }

    @Test func aLayerIsUnpackedWithOwnersModesLinksAndOverlayWhiteouts() throws {
        defer { cleanup() }
        let tar = try archive("good.tar.gz", """
        with tarfile.open(path, "w:gz") as t:
            def add(name, type=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, link=""):
                i = tarfile.TarInfo(name); i.type = type; i.mode = mode; i.uid = uid; i.gid = gid; i.linkname = link; i.size = len(data)
                t.addfile(i, io.BytesIO(data) if type == tarfile.REGTYPE else None)
            add("./usr/", tarfile.DIRTYPE, mode=0o755)
            add("./usr/bin/tool", data=b"#!/bin/sh\\n", mode=0o4755)
            add("usr/bin/tool-link", tarfile.SYMTYPE, link="tool")
            add("usr/bin/tool-hard", tarfile.LNKTYPE, link="usr/bin/tool")
            add("home/agent/notes", data=b"mine", mode=0o600, uid=1000, gid=1000)
            add("run/fifo", tarfile.FIFOTYPE, mode=0o600)
            add("etc/.wh.motd")
            add("var/cache/.wh..wh..opq")
        """)
        let out = try unpack(tar)
        let tool = try #require(lstatOf(out + "/usr/bin/tool"))
        #expect(tool.st_mode & 0o7777 == 0o4755 && tool.st_uid == 0 && tool.st_nlink == 2, "setuid kept, hard-linked")
        #expect(try Files.read(out + "/usr/bin/tool-hard") == "#!/bin/sh\n")
        #expect(lstatOf(out + "/usr/bin/tool-link").map { $0.st_mode & S_IFMT } == S_IFLNK)
        let notes = try #require(lstatOf(out + "/home/agent/notes"))
        #expect(notes.st_uid == 1000 && notes.st_gid == 1000 && notes.st_mode & 0o777 == 0o600)
        #expect(lstatOf(out + "/run/fifo").map { $0.st_mode & S_IFMT } == S_IFIFO)
        let whiteout = try #require(lstatOf(out + "/etc/motd"))
        #expect(whiteout.st_mode & S_IFMT == S_IFCHR && whiteout.st_rdev == 0, "a whiteout is a 0/0 character device")
        #expect(LayerUnpacker.xattr(out + "/var/cache", "trusted.overlay.opaque") == "y")
        #expect(lstatOf(out + "/var/cache/.wh..wh..opq") == nil)
    }

    @Test(arguments: [
        ("dotdot", #"i = tarfile.TarInfo("../../outside/evil"); i.size = 4; t.addfile(i, io.BytesIO(b"evil"))"#),
        ("symlink-parent", #"""
        i = tarfile.TarInfo("escape"); i.type = tarfile.SYMTYPE; i.linkname = OUTSIDE; t.addfile(i)
        i = tarfile.TarInfo("escape/evil"); i.size = 4; t.addfile(i, io.BytesIO(b"evil"))
        """#),
        ("hardlink-out", #"i = tarfile.TarInfo("passwd"); i.type = tarfile.LNKTYPE; i.linkname = "../outside/secret"; t.addfile(i)"#),
        ("hardlink-host", #"i = tarfile.TarInfo("passwd"); i.type = tarfile.LNKTYPE; i.linkname = "/etc/passwd"; t.addfile(i)"#),
        ("device", #"i = tarfile.TarInfo("dev/sda"); i.type = tarfile.BLKTYPE; i.devmajor = 8; i.devminor = 0; t.addfile(i)"#),
        ("chardev", #"i = tarfile.TarInfo("mem"); i.type = tarfile.CHRTYPE; i.devmajor = 1; i.devminor = 1; t.addfile(i)"#),
        ("owner", #"i = tarfile.TarInfo("f"); i.uid = 70000; i.size = 1; t.addfile(i, io.BytesIO(b"x"))"#),
    ])
    func hostileLayersAreRefusedAndNothingIsWrittenOutside(name: String, script: String) throws {
        defer { cleanup() }
        try Files.write(dir + "/outside/secret", "secret", flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
        let tar = try archive(name + ".tar", "OUTSIDE = \(String(reflecting: dir + "/outside"))\nwith tarfile.open(path, \"w\") as t:\n"
                              + script.split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
        let error = #expect(throws: LayerUnpacker.Failure.self) { try unpack(tar) }
        guard case .hostile = error else { Issue.record("refused for another reason: \(String(describing: error))"); return }
        #expect(try Files.listDirectory(dir + "/outside") == ["secret"], "nothing written beside the layer")
        #expect(try Files.read(dir + "/outside/secret") == "secret")
        #expect(lstatOf("/etc/passwd")?.st_nlink == 1, "the host's file was not linked")
    }

    @Test func absurdSizesAndDecompressionBombsAreRefusedBeforeTheyFillTheStore() throws {
        defer { cleanup() }
        // A header claiming a 1 TiB file, followed by almost nothing.
        let huge = try archive("huge.tar", """
        i = tarfile.TarInfo("huge"); i.size = 1 << 40
        with open(path, "wb") as f: f.write(i.tobuf(tarfile.GNU_FORMAT) + b"x" * 512)
        """)
        #expect(throws: LayerUnpacker.Failure.tooLarge("huge is 1099511627776 bytes (at most 8589934592 a file)")) { try unpack(huge) }
        // 256 MiB of zeros in a few hundred KiB of gzip, under a 64 MiB layer limit.
        let bomb = try archive("bomb.tar.gz", """
        class Zeros(io.RawIOBase):
            def __init__(self, n): self.left = n
            def readable(self): return True
            def readinto(self, b):
                k = min(len(b), self.left); b[:k] = bytes(k); self.left -= k; return k
        with tarfile.open(path, "w:gz", compresslevel=1) as t:
            for n in range(4):
                i = tarfile.TarInfo(f"zeros{n}"); i.size = 64 << 20; t.addfile(i, io.BufferedReader(Zeros(64 << 20)))
        """)
        #expect(try Files.readBytes(bomb, limit: 8 << 20).count < 2 << 20)
        var limits = LayerUnpacker.Limits()
        limits.maxLayerBytes = 64 << 20
        #expect(throws: LayerUnpacker.Failure.tooLarge("more than 67108864 bytes unpacked")) { try unpack(bomb, limits: limits) }
    }

    @Test func namesAreComponentsBelowTheRoot() throws {
        #expect(try LayerUnpacker.components("./usr//bin/./x") == ["usr", "bin", "x"])
        #expect(try LayerUnpacker.components("/etc/passwd") == ["etc", "passwd"], "absolute names are the layer's")
        #expect(throws: LayerUnpacker.Failure.self) { try LayerUnpacker.components("a/../../b") }
    }
}
