#if canImport(Glibc)
import Glibc
#endif
import CubicleImages
import CubicleLinux
import Foundation
import Testing
@testable import CubicleSandbox

/// A sandbox whose root is an image: the layers from the store (idmapped, read-only) under an overlay
/// whose upper layer is the sandbox's own tmpfs. The image is Tests/images/make_oci_layout.py's, with a
/// static busybox for a userland (Debian's busybox-static).
@Suite(.serialized, .enabled(if: isRoot, rootReason)) struct ImageRootTests {
    static func image(in dir: String) async throws -> (ImageStore, ImageStore.Image) {
        let layout = dir + "/layout"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = [Paths.repo + "/Tests/images/make_oci_layout.py", layout, "v1", "\(OCI.Platform.host.os)/\(OCI.Platform.host.architecture)"]
        try p.run()
        p.waitUntilExit()
        let store = try ImageStore(root: dir + "/store")
        return (store, try await ImagePuller(store: store).pull("v1", as: "test", from: OCILayoutSource(directory: layout)))
    }

    @Test func theImageIsTheRootWithItsOwnersAndWritesStayInTheSandbox() async throws {
        guard Files.exists("/bin/busybox") else {
            print("skipped: no static busybox on this host for the test image's userland (apt-get install busybox-static)")
            return
        }
        let dir = "/tmp/cubicle-image-root-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? Files.removeTree(dir) }
        let (store, image) = try await Self.image(in: dir)
        let layers = image.layers.map { store.layerPath($0) }
        try await withHost { host in
            let a = try await host.launch { $0.imageLayers = layers }
            let b = try await host.launch { $0.imageLayers = layers }
            func sh(_ s: Sandbox, _ script: String) async throws -> String {
                let r = try await s.run(["/bin/sh", "-c", script])
                if !r.stderr.isEmpty { print("[\(script)] stderr: \(r.stderr)") }
                return r.stdout
            }
            #expect(try await sh(a, "cat /etc/os-release") == "ID=cubicle-test\n")
            #expect(try await sh(a, "test -e /etc/motd && echo present || echo gone") == "gone\n", "layer two's whiteout hides layer one's file")
            #expect(try await sh(a, "cat /srv/data") == "layer two\n")
            // Owners as the image gives them, seen inside, though the sandbox's ids are a host range of its own.
            #expect(try await sh(a, "stat -c %u:%g /usr/bin/hello /srv/note; cat /srv/note; id -u") == "0:0\n1000:1000\nfrom the image\n1000\n")
            // Nothing of the host's userland: no /usr/lib, no python, no host /etc/passwd users.
            #expect(try await sh(a, "ls /usr/lib 2>&1 >/dev/null | wc -l; test -e /usr/bin/python3 && echo host || echo none") .hasSuffix("none\n"))
            // Writes land in the sandbox's own upper layer: the other sandbox and the store never see them.
            #expect(try await sh(a, "ls /.cubicle-upper >/dev/null 2>&1; echo $?") == "1\n", "the upper layer's mount is root's alone inside")
            #expect(try await sh(a, "echo mine > /srv/new && cat /srv/new") == "mine\n")
            #expect(try await sh(b, "test -e /srv/new && echo seen || echo unseen") == "unseen\n")
            #expect(!Files.exists(store.layerPath(image.layers[0]) + "/srv/new") && !Files.exists(store.layerPath(image.layers[1]) + "/srv/new"))
            // The image's setuid-root binary grants nothing (no_new_privs).
            #expect(try await sh(a, "/usr/bin/busybox-suid id -u") == "1000\n")
            // The writable layer is the root's tmpfs: bounded by its size (ENOSPC inside, nothing outside).
            let small = try await host.launch { $0.imageLayers = layers; $0.rootBytes = 8 << 20 }
            let fill = try await small.run(["/bin/sh", "-c", "cat /bin/busybox /bin/busybox /bin/busybox /bin/busybox /bin/busybox > /srv/big; echo $?"])
            #expect(fill.stdout == "1\n" && fill.stderr.contains("No space left"), "\(fill.stdout) \(fill.stderr)")
            // Cubicle's own parts over the image: its /proc, /tmp and hostname.
            #expect(try await sh(a, "cat /etc/hostname; echo x > /tmp/t && cat /tmp/t; ls /proc/self/status") == "cubicle\nx\n/proc/self/status\n")
        }
    }
}
