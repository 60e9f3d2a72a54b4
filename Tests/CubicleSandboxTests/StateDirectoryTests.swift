import CubicleLinux
import Foundation
import Testing
@testable import CubicleSandbox

/// The on-disk layout has one owner: paths, the sandbox id scheme, and what a restarted daemon lists.
@Suite struct StateDirectoryTests {
    @Test func layoutAndIDs() throws {
        let state = StateDirectory("/run/cubicle")
        #expect(state.sandboxes == "/run/cubicle/sandboxes" && state.runtime("demo") == "/run/cubicle/runtimes/demo")
        #expect(state.uidLeases == "/run/cubicle/uid-ranges")
        let id = StateDirectory.newSandboxID()
        #expect(StateDirectory.isSandboxID(id) && id != StateDirectory.newSandboxID())
        let sandbox = state.sandbox(id)
        #expect(sandbox.path == "/run/cubicle/sandboxes/\(id)" && sandbox.facts == sandbox.path + "/sandbox.json")
        #expect(SandboxDirectory(path: sandbox.path) == sandbox)
        for bad in ["sb-", "sb-0123", "sb-0123456789abcdeF", "sb-0123456789abcdef0", "xx-0123456789abcdef", "../sb-0123456789abcdef/.."] {
            #expect(!StateDirectory.isSandboxID(bad), "\(bad)")
            #expect(SandboxDirectory(path: "/run/cubicle/sandboxes/" + bad) == nil, "\(bad)")
        }
    }

    /// What a daemon that starts finds: sandbox directories only, sorted; anything else there is left alone.
    @Test func listsOnlySandboxDirectories() throws {
        let root = NSTemporaryDirectory() + "cubicle-state-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let state = StateDirectory(root)
        #expect(state.sandboxIDs().isEmpty, "no directory yet")
        let ids = (0..<3).map { _ in StateDirectory.newSandboxID() }
        for name in ids + ["sb-junk", "notes"] {
            try FileManager.default.createDirectory(atPath: state.sandboxes + "/" + name, withIntermediateDirectories: true)
        }
        #expect(state.sandboxIDs() == ids.sorted())
        try FileManager.default.createDirectory(atPath: state.runtime("demo"), withIntermediateDirectories: true)
        state.removeAll()
        #expect(!FileManager.default.fileExists(atPath: root))
    }
}
