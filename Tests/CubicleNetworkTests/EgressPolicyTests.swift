import CubicleNetwork
import Testing

/// The egress policy as a value: addresses and ranges parsed strictly, and every decision the issue fixes
/// (always refused, private ranges only when named, names through what the session resolved).
@Suite struct EgressPolicyTests {
    func ip(_ s: String) -> IPAddress { IPAddress(s)! }
    func policy(allow: [String] = [], deny: [String] = []) -> EgressPolicy {
        EgressPolicy(allow: allow.map { EgressPolicy.Entry($0)! }, deny: deny.map { EgressPolicy.Entry($0)! })
    }

    @Test func addressesAndRangesParseStrictly() {
        #expect(IPAddress("192.0.2.1") == .v4(0xC000_0201))
        #expect(IPAddress("2001:db8::1")?.description == "2001:db8:0:0:0:0:0:1")
        #expect(IPAddress("::ffff:192.0.2.1") == .v6(0xFFFF_C000_0201))
        #expect(IPAddress("::") == .v6(0))
        for bad in ["010.0.0.1", "1.2.3", "1.2.3.256", "1:2:3:4:5:6:7:8:9", "1::2::3", "::g", "", ":::", "1.2.3.4 "] {
            #expect(IPAddress(bad) == nil, "\(bad)")
        }
        #expect(CIDR("10.0.0.0/8")?.contains(ip("10.255.1.2")) == true)
        #expect(CIDR("10.0.0.0/8")?.contains(ip("11.0.0.1")) == false)
        #expect(CIDR("fc00::/7")?.contains(ip("fd12::1")) == true)
        #expect(CIDR("0.0.0.0/0")?.contains(ip("2001:db8::1")) == false, "a v4 range holds no v6 address")
        #expect(CIDR("10.1.2.3/8") == nil, "host bits set: a typo, not a range")
        #expect(CIDR("10.0.0.0/33") == nil)
        #expect(CIDR("203.0.113.7")?.prefix == 32)
    }

    @Test func namesAreExactOrBelowAWildcard() {
        let exact = NamePattern("API.Example.com.")!, wild = NamePattern("*.example.com")!
        #expect(exact.matches("api.example.com") && !exact.matches("x.api.example.com"))
        #expect(wild.matches("bedrock.example.com.") && wild.matches("a.b.example.com"))
        #expect(!wild.matches("example.com"), "the wildcard is for names below, not the name itself")
        #expect(!wild.matches("badexample.com"))
        for bad in ["*.com", "-a.example.com", "a..b", "*", "ex ample.com", String(repeating: "a", count: 64) + ".com"] {
            #expect(NamePattern(bad) == nil, "\(bad)")
        }
    }

    @Test func someAddressesAreNeverReachable() {
        let open = policy(allow: ["0.0.0.0/0", "::/0"])
        for refused in ["127.0.0.1", "::1", "169.254.1.1", "fe80::1", "224.0.0.1", "ff02::1", "255.255.255.255", "0.0.0.0", "::ffff:127.0.0.1"] {
            #expect(open.decide(ip(refused)) != .allowed, "\(refused)")
        }
        #expect(open.decide(EgressPolicy.metadataEndpoint) == .allowed, "the metadata endpoint is the one link-local address allowed")
        #expect(open.decide(ip("198.51.100.7"), host: [CIDR("198.51.100.7")!]) != .allowed, "the host's own addresses")
    }

    @Test func privateRangesOpenOnlyToAnEntryInsideThem() {
        #expect(policy().decide(ip("10.1.2.3")) == .refused("private range 10.0.0.0/8"))
        #expect(policy(allow: ["0.0.0.0/0"]).decide(ip("192.168.1.1")) != .allowed, "a range spanning a private one does not name it")
        #expect(policy(allow: ["10.1.0.0/16"]).decide(ip("10.1.2.3")) == .allowed)
        #expect(policy(allow: ["10.1.0.0/16"]).decide(ip("10.2.0.1")) != .allowed)
        #expect(policy().decide(ip("100.64.0.1")) != .allowed, "shared address space")
        #expect(policy().decide(ip("fd00::1")) != .allowed)
    }

    @Test func publicAddressesFollowTheLists() {
        #expect(policy().decide(ip("203.0.113.9")) == .allowed, "PUBLIC without an allow list: any public address")
        let listed = policy(allow: ["203.0.113.0/24", "*.amazonaws.com"], deny: ["203.0.113.66"])
        #expect(listed.decide(ip("203.0.113.9")) == .allowed)
        #expect(listed.decide(ip("203.0.113.66")) == .refused("denied by 203.0.113.66/32"), "deny wins over allow")
        #expect(listed.decide(ip("198.51.100.1")) == .refused("not in the allow list"))
        #expect(listed.decide(ip("198.51.100.1"), names: ["bedrock-runtime.us-east-1.amazonaws.com"]) == .allowed,
                "an address the session resolved for an allowed name")
        #expect(policy(deny: ["*.evil.example"]).decide(ip("198.51.100.2"), names: ["x.evil.example"]) != .allowed)
    }

    @Test func theSessionsDNSAnswersOnlyAllowedNames() {
        let named = policy(allow: ["*.amazonaws.com", "10.0.0.0/8"], deny: ["metrics.amazonaws.com"])
        #expect(named.answers("bedrock-runtime.us-east-1.amazonaws.com"))
        #expect(!named.answers("example.org"), "NXDOMAIN for a name the allow list does not name")
        #expect(!named.answers("metrics.amazonaws.com"), "a denied name")
        #expect(policy(allow: ["203.0.113.0/24"]).answers("example.org"), "ranges alone police connections, not names")
        #expect(policy().answers("example.org"))
    }
}

@Suite struct NetworkTagTests {
    @Test func theTagIsAlwaysFiveCharactersAndStable() {
        // 10.227.89.0/24 hashes to a four-digit number in base 36: the case that once gave a four-character tag.
        #expect(NetworkSettings.tag(forSessionNetwork: "10.227.89.0/24") == "0fljh")
        var seen = Set<String>()
        for a in 0..<64 {
            for b in 0..<16 {
                let tag = NetworkSettings.tag(forSessionNetwork: "10.\(200 + b).\(a).0/24")
                #expect(tag.count == 5 && tag.allSatisfy { $0.isLowercase || $0.isNumber })
                seen.insert(tag)
            }
        }
        #expect(seen.count > 1000, "distinct networks get distinct tags")
        #expect(NetworkSettings.tag(forSessionNetwork: "10.213.0.0/16") == NetworkSettings.tag(forSessionNetwork: "10.213.0.0/16"))
    }
}
