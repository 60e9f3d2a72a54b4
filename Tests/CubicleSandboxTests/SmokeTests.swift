import Testing
@testable import CubicleSandbox

@Suite(.enabled(if: isRoot, rootReason))
struct SmokeTests {
    @Test func launchRunTeardown() async throws {
        try await withHost { host in
            let s = try await host.launch()
            let r = try await s.sh("id; hostname; cat /proc/self/status | grep -E 'CapEff|NoNewPrivs|Seccomp'; ls /")
            print(r.stdout, r.stderr, r.exit)
            #expect(r.exit.exitCode == 0)
            let report = await s.teardown()
            print(report)
            #expect(report.leftovers.isEmpty)
        }
    }
}
