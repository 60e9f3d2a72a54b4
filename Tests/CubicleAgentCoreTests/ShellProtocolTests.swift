import CubicleAgentCore
import CubicleJSON
import Testing

/// The shell protocol as the bedrock-agentcore SDK's ShellFramer reads and writes it (runtime/shell/protocol.py).
struct ShellProtocolTests {
    @Test func framesAreAChannelByteAndAPayload() {
        #expect(ShellProtocol.frame(.stdout, Array("hi".utf8)) == [0x01, 0x68, 0x69])
        #expect(ShellProtocol.parse([0x00, 0x61])?.0 == .stdin)
        #expect(ShellProtocol.parse([0xFF])?.0 == .close)
        #expect(ShellProtocol.parse([]) == nil, "an empty frame has no channel")
        #expect(ShellProtocol.parse([0x42, 0x00]) == nil, "an unknown channel is refused")
    }

    @Test func resizesAreCheckedBeforeTheyReachATerminal() {
        #expect(ShellProtocol.size(fromResize: ArraySlice(#"{"width": 120, "height": 40}"#.utf8))! == (40, 120))
        for bad in [#"{"width": 0, "height": 40}"#, #"{"width": 120, "height": 99999}"#, #"{"width": "a", "height": 4}"#, "[1,2]", "{",
                    #"{"width": 120}"#, String(repeating: " ", count: 300) + #"{"width": 1, "height": 1}"#] {
            #expect(ShellProtocol.size(fromResize: ArraySlice(bad.utf8)) == nil, "\(bad)")
        }
    }

    @Test func statusFramesCarryTheConfirmationAndTheExit() throws {
        let confirmation = ShellProtocol.confirmation(shellID: "s-1", reconnected: true)
        #expect(confirmation.first == ShellChannel.status.rawValue)
        let json = try JSON.parse(String(decoding: confirmation.dropFirst(), as: UTF8.self))
        #expect(json["metadata"]?["shellId"]?.stringValue == "s-1" && json["metadata"]?["reconnected"] == .bool(true))
        #expect(ShellProtocol.exitCode(fromStatus: confirmation.dropFirst()) == nil, "a confirmation is not an exit")
        #expect(ShellProtocol.exitCode(fromStatus: ShellProtocol.exitStatus(exitCode: 0, signal: nil).dropFirst()) == 0)
        #expect(ShellProtocol.exitCode(fromStatus: ShellProtocol.exitStatus(exitCode: 3, signal: nil).dropFirst()) == 3)
        let killed = ShellProtocol.exitStatus(exitCode: nil, signal: 9)
        #expect(ShellProtocol.exitCode(fromStatus: killed.dropFirst()) == 137, "a signal is 128 + its number, as a shell reports it")
        #expect(String(decoding: killed, as: UTF8.self).contains(#""reason":"Signal""#))
    }

    @Test func shellIDsFollowTheSDKsRule() {
        #expect(ShellProtocol.validShellID("build-shell_1.2"))
        for bad in ["", String(repeating: "a", count: 129), "a?b", "a#b", "a&b", "a b", "é"] {
            #expect(!ShellProtocol.validShellID(bad), "\(bad)")
        }
    }
}
