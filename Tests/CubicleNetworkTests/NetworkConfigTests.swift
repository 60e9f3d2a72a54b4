@testable import CubicleNetwork
import Testing

/// What the kernel is told for one session (nftables elements), and where role credentials come from.
@Suite struct EgressFirewallTests {
    func policy(allow: [String] = [], deny: [String] = []) -> EgressPolicy {
        EgressPolicy(allow: allow.map { EgressPolicy.Entry($0)! }, deny: deny.map { EgressPolicy.Entry($0)! })
    }

    @Test func aSessionsElementsSplitPrivateFromPublicAndDropCoveredRanges() {
        let rules = EgressFirewall.SessionRules(link: "cabc1", address: IPAddress("10.9.0.5")!,
                                                policy: policy(allow: ["0.0.0.0/0", "203.0.113.0/24", "10.1.0.0/16", "10.1.2.0/24", "api.example.com", "2001:db8::/32"],
                                                               deny: ["198.51.100.0/24", "198.51.100.7"]))
        let text = rules.elements(table: "cubicle_t", adding: true)
        #expect(text.contains("add element inet cubicle_t links { \"cabc1\" . 10.9.0.5 }"))
        #expect(text.contains("add element inet cubicle_t allow { 10.9.0.5 . 0.0.0.0/0 }"), "203.0.113.0/24 is inside 0/0")
        #expect(text.contains("add element inet cubicle_t allow_private { 10.9.0.5 . 10.1.0.0/16 }"), "the /24 is inside the /16")
        #expect(text.contains("add element inet cubicle_t deny { 10.9.0.5 . 198.51.100.0/24 }"))
        #expect(!text.contains("open"), "an allow list: not open to every public address")
        #expect(!text.contains("2001:db8"), "sessions are IPv4 only")
        let open = EgressFirewall.SessionRules(link: "cabc2", address: IPAddress("10.9.0.6")!, policy: policy())
        #expect(open.elements(table: "t", adding: false).contains("delete element inet t open { 10.9.0.6 }"))
    }

    @Test func sharedCredentialsFilesParseAsTheSDKsDo() {
        let parsed = RoleCredentialSource.parse("""
        # comment
        [default]
        aws_access_key_id=AKIADEFAULT
        [tutor]
          aws_access_key_id = AKIATUTOR
        aws_secret_access_key = se=cret
        ; another comment
        AWS_SESSION_TOKEN = tok
        """)
        #expect(parsed["tutor"] == ["aws_access_key_id": "AKIATUTOR", "aws_secret_access_key": "se=cret", "aws_session_token": "tok"])
        #expect(parsed["default"]?["aws_access_key_id"] == "AKIADEFAULT")
        #expect(RoleCredentialSource(roleArn: "arn:aws:iam::123456789012:role/team/tutor", profile: "p", sharedCredentialsFile: "/x").roleName == "tutor")
    }

    @Test func grantsAreReadBackFromNftsJSON() {
        let listing = """
        {"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"set": {"family": "inet", "name": "resolved", \
        "table": "cubicle_t", "type": ["ipv4_addr", "ipv4_addr"], "flags": ["timeout"], "elem": [{"elem": {"val": {"concat": \
        ["10.9.0.2", "198.19.1.10"]}, "timeout": 300, "expires": 284}}, {"elem": {"val": {"concat": ["10.9.0.3", "bad"]}, \
        "timeout": 300, "expires": 10}}, {"elem": {"val": {"concat": ["10.9.0.2", "198.19.1.11"]}, "timeout": 60, "expires": 0}}]}}]}
        """
        let grants = SessionNetworking.grants(in: listing)
        #expect(grants.count == 1)
        #expect(grants[IPAddress("10.9.0.2")!]?.map { "\($0.0) \($0.1)" } == ["198.19.1.10 284"], "an expired grant and a bad address are dropped")
        #expect(SessionNetworking.grants(in: "not json").isEmpty)
    }
}
