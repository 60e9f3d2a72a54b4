import CubicleCLI
import CubicleJSON
import Testing

struct RenderTests {
    @Test func tableColumnsLineUp() {
        var t = Table(["A", "LONGER"])
        t.rows = [["xyz", "1"], ["q", "22"]]
        #expect(t.render() == "A    LONGER\nxyz  1\nq    22\n")
    }

    @Test func bytesAndDurationsReadLikeDocker() {
        #expect(Format.bytes(512) == "512B")
        #expect(Format.bytes(1536) == "1.5KiB")
        #expect(Format.bytes(512 << 20) == "512.0MiB")
        #expect(Format.bytes(nil) == "-")
        #expect(Format.duration(59.9) == "59s")
        #expect(Format.duration(61) == "1m1s")
        #expect(Format.duration(7260) == "2h1m")
    }

    @Test func shellQuotingKeepsEachWordWhole() {
        #expect(ShellQuote.join(["printf", "%s|", "two words", "it's", ""]) == #"printf '%s|' 'two words' 'it'\''s' ''"#)
        #expect(ShellQuote.quote("/usr/bin/env") == "/usr/bin/env")
    }

    @Test func psListsWarmSandboxesAfterSessionsWithoutAnID() {
        let session: JSON = ["id": "session-0123456789abcdef", "runtime": "sdk", "owner": "alice", "state": "ready", "created": 1000, "invocations": 1,
                             "usage": ["memoryBytes": 1048576, "pids": 3]]
        let warm: JSON = ["id": "", "runtime": "sdk", "state": "warm", "created": 1005, "invocations": 0,
                          "usage": ["memoryBytes": 2097152, "pids": 2]]
        let lines = SessionTable.render([session], warm: [warm], now: 1010, all: false).split(separator: "\n").map { $0.split(separator: " ") }
        #expect(lines.count == 3)
        #expect(lines[1][1...3] == ["sdk", "alice", "ready"] && lines[1][0] != "-")
        #expect(lines[2].prefix(6) == ["-", "sdk", "-", "warm", "5s", "-"])
    }

    /// CPU % is the CPU seconds used between two frames over the wall time between them.
    @Test func topComputesCPUPercentBetweenFrames() {
        func session(cpu: Double) -> JSON {
            ["id": "session-0123456789abcdef", "runtime": "demo", "state": "ready", "created": 1000, "invocations": 3,
             "idleSeconds": .double(4), "usage": ["cpuSeconds": .double(cpu), "memoryBytes": 2097152, "pids": 4]]
        }
        var screen = TopScreen()
        let first = screen.render([session(cpu: 1.0)], now: 1010)
        #expect(first.contains("1 live session"))
        let row1 = first.split(separator: "\n").first { $0.hasPrefix("session-0123") }!
        #expect(row1.split(separator: " ", omittingEmptySubsequences: true).map(String.init) == ["session-0123", "demo", "ready", "10s", "4s", "-", "2.0MiB", "4", "3"])
        let second = screen.render([session(cpu: 1.5)], now: 1012)
        let row2 = second.split(separator: "\n").first { $0.hasPrefix("session-0123") }!
        #expect(row2.split(separator: " ", omittingEmptySubsequences: true)[5] == "25.0")
    }
}
