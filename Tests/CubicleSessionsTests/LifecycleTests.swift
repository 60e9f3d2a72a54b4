import CubicleSessions
import Testing

/// The lifecycle rules on a test clock: seconds are plain numbers, nothing sleeps.
@Suite struct LifecycleTests {
    func ready(idle: Double = 60, max: Double = 600) -> Lifecycle {
        var l = Lifecycle(now: 0, idleTimeout: idle, maxLifetime: max)
        l.ready(now: 1)
        return l
    }

    @Test func idleSessionEndsAfterIdleTimeout() {
        let l = ready()
        #expect(l.expiry(now: 60) == nil)
        #expect(l.expiry(now: 61) == .idleTimeout)
        #expect(l.nextDeadline == 61)
    }

    @Test func requestInFlightIsNeverIdle() {
        var l = ready()
        l.requestStarted(now: 10)
        #expect(l.expiry(now: 500) == nil)
        #expect(l.idleDeadline == nil)
        l.requestEnded(now: 500)
        #expect(l.expiry(now: 559) == nil)
        #expect(l.expiry(now: 560) == .idleTimeout)
        #expect(l.invocations == 1)
    }

    @Test func runningCommandIsNeverIdle() {
        var l = ready()
        l.commandStarted(now: 5)
        #expect(l.expiry(now: 300) == nil)
        l.commandEnded(now: 300)
        #expect(l.expiry(now: 360) == .idleTimeout)
    }

    @Test func healthyBusyKeepsSessionAliveUntilIdleAgain() {
        var l = ready()
        l.pinged(busy: true, now: 50)
        #expect(l.expiry(now: 200) == nil)
        l.pinged(busy: true, now: 200)
        l.pinged(busy: false, now: 202)
        #expect(l.expiry(now: 261) == nil)
        #expect(l.expiry(now: 262) == .idleTimeout)
        // A Healthy ping of an already idle session does not postpone the timeout.
        var idle = ready()
        idle.pinged(busy: false, now: 30)
        #expect(idle.expiry(now: 61) == .idleTimeout)
    }

    @Test func maxLifetimeEndsEvenBusySessions() {
        var l = ready(idle: 60, max: 120)
        l.pinged(busy: true, now: 100)
        l.requestStarted(now: 110)
        #expect(l.expiry(now: 119) == nil)
        #expect(l.expiry(now: 120) == .maxLifetime)
    }

    @Test func firstEndReasonWins() {
        var l = ready()
        let first = l.stop(.agentExited(code: 1, signal: nil))
        let second = l.stop(.stopped)
        #expect(first && !second)
        #expect(l.expiry(now: 10_000) == nil)
        l.ended()
        #expect(l.state == .ended(.agentExited(code: 1, signal: nil)))
        #expect(!l.isLive)
    }

    @Test func startingSessionOnlyHitsMaxLifetime() {
        let l = Lifecycle(now: 0, idleTimeout: 60, maxLifetime: 120)
        #expect(l.expiry(now: 100) == nil)
        #expect(l.expiry(now: 121) == .maxLifetime)
    }

    @Test func reasonNames() {
        #expect(EndReason.idleTimeout.name == "idle_timeout")
        #expect(EndReason.outOfMemory.description == "out of memory")
        #expect(EndReason.agentExited(code: nil, signal: 9).description == "agent exited (signal 9)")
    }
}
