import Testing
@testable import CubicleSessions

@Suite struct TelemetryTests {
    /// Made per request, the handles went through the metrics factory's lock and registry on every invoke.
    @Test func invocationHandlesAreMadeOncePerRuntimeAndStatus() {
        let runtime = "telemetry-\(UInt32.random(in: 0...UInt32.max))"
        let first = Telemetry.invocationHandles(runtime: runtime, status: 200)
        let again = Telemetry.invocationHandles(runtime: runtime, status: 200)
        #expect(first.duration === again.duration && first.received === again.received && first.sent === again.sent)
        let failed = Telemetry.invocationHandles(runtime: runtime, status: 424)
        #expect(failed.duration !== first.duration)
    }
}
