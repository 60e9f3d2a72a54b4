import CubicleSessions
import Testing

/// `sessionsYieldCPUToHost: whileThrottled` on a test clock: the counts are what `cpu.stat` would say.
@Suite struct ThrottleWatchTests {
    @Test func sessionsGoBelowTheHostWhenOneIsThrottledAndComeBackWhenCalm() {
        var w = ThrottleWatch(calmSeconds: 5)
        #expect(w.observe(["a": 0, "b": 0], at: 0) == false, "the first look sets equal weight, whatever a killed daemon left")
        #expect(w.observe(["a": 0, "b": 0], at: 0.2) == nil, "nothing throttled: equal weight stays")
        #expect(w.observe(["a": 0, "b": 3], at: 0.5) == true, "b's count grew: below the host at once")
        #expect(w.sessionsBelowHost == true)
        #expect(w.observe(["a": 0, "b": 3], at: 1) == nil, "no growth, not yet calm")
        #expect(w.observe(["a": 0, "b": 9], at: 4) == nil, "still growing: stays below")
        #expect(w.observe(["a": 0, "b": 9], at: 8.9) == nil, "calm for 4.9 s of 5")
        #expect(w.observe(["a": 0, "b": 9], at: 9) == false, "calm for 5 s: back beside the host")
        #expect(w.sessionsBelowHost == false)
    }

    @Test func aNewSessionAlreadyThrottledCountsAndAnEndedOneIsForgotten() {
        var w = ThrottleWatch(calmSeconds: 5)
        #expect(w.observe(["a": 2], at: 0) == true, "first seen with periods throttled since it started")
        #expect(w.observe([:], at: 6) == false, "a ended; nothing left to watch")
        #expect(w.observe(["a": 2], at: 7) == true, "an id seen again starts from zero, like a new cgroup")
    }
}
