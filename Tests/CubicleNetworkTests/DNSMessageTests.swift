@testable import CubicleDNSWire
import Testing

/// The session DNS's wire format: what a session sends is hostile bytes, what it gets back is written fresh.
@Suite struct DNSMessageTests {
    func query(_ name: [UInt8], id: UInt16 = 0x1234, flags: UInt16 = 0x0100, qd: UInt16 = 1, type: UInt16 = 1, klass: UInt16 = 1) -> [UInt8] {
        [UInt8(id >> 8), UInt8(id & 255), UInt8(flags >> 8), UInt8(flags & 255), 0, UInt8(qd), 0, 0, 0, 0, 0, 0]
            + name + [UInt8(type >> 8), UInt8(type & 255), UInt8(klass >> 8), UInt8(klass & 255)]
    }
    let apiExample: [UInt8] = [3] + Array("API".utf8) + [7] + Array("example".utf8) + [4] + Array("test".utf8) + [0]

    @Test func aPlainQueryIsReadLowercased() throws {
        let q = try #require(DNSMessage.parseQuery(query(apiExample)))
        #expect(q == DNSMessage.Question(id: 0x1234, name: "api.example.test", type: 1, recursionDesired: true))
    }

    @Test func anythingElseIsNotAQuery() {
        #expect(DNSMessage.parseQuery(query(apiExample, flags: 0x8100)) == nil, "a response")
        #expect(DNSMessage.parseQuery(query(apiExample, flags: 0x2900)) == nil, "opcode UPDATE")
        #expect(DNSMessage.parseQuery(query(apiExample, qd: 2)) == nil, "two questions")
        #expect(DNSMessage.parseQuery(query(apiExample, klass: 3)) == nil, "class CHAOS")
        #expect(DNSMessage.parseQuery(query([0xC0, 12])) == nil, "a pointer in a query")
        #expect(DNSMessage.parseQuery(query([3, 0x61, 0x2F, 0x62, 0])) == nil, "a slash in a label")
        #expect(DNSMessage.parseQuery(query([5, 0x61, 0x62])) == nil, "a label past the end")
        #expect(DNSMessage.parseQuery(query([UInt8](repeating: 63, count: 1) + [UInt8](repeating: 0x61, count: 63) + [0x40])) == nil, "label length 64")
        let long: [UInt8] = (0..<5).flatMap { _ -> [UInt8] in [60] + [UInt8](repeating: 0x61, count: 60) } + [0]
        #expect(DNSMessage.parseQuery(query(long)) == nil, "a name over 255 bytes")
        #expect(DNSMessage.parseQuery(Array(query(apiExample).prefix(20))) == nil, "truncated")
        #expect(DNSMessage.parseQuery([UInt8](repeating: 0, count: 600)) == nil, "over 512 bytes")
    }

    @Test func upstreamAnswersFollowPointersAndKeepOnlyARecords() throws {
        let q = try #require(DNSMessage.query(id: 7, name: "api.example.test", type: DNSMessage.typeA))
        var r = Array(q)
        r[2] = 0x81; r[3] = 0x80; r[7] = 3
        // A CNAME from the question's name (a pointer to it) to x.test, then x.test's A record, then an AAAA.
        r += [0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 8, 1, 0x78, 4] + Array("test".utf8) + [0]
        let target = r.count - 8
        r += [0xC0, UInt8(target), 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 198, 19, 1, 10]
        r += [0xC0, UInt8(target), 0, 28, 0, 1, 0, 0, 1, 44, 0, 16] + [UInt8](repeating: 1, count: 16)
        let (rcode, answers) = try #require(DNSMessage.parseResponse(r, id: 7, name: "api.example.test"))
        #expect(rcode == 0)
        #expect(answers == [DNSMessage.Answer(address: 0xC613_010A, ttl: 300)])
        #expect(DNSMessage.parseResponse(r, id: 8, name: "api.example.test") == nil, "another id")
        #expect(DNSMessage.parseResponse(r, id: 7, name: "other.test") == nil, "another question")
    }

    @Test func hostileUpstreamPointersAreRefused() throws {
        var r = try #require(DNSMessage.query(id: 7, name: "a.test", type: 1))
        r[2] = 0x81; r[7] = 1
        let loop = r.count
        r += [0xC0, UInt8(loop), 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4]
        #expect(DNSMessage.parseResponse(r, id: 7, name: "a.test") == nil, "a pointer to itself")
        var r2 = try #require(DNSMessage.query(id: 7, name: "a.test", type: 1))
        r2[2] = 0x81; r2[7] = 1
        r2 += [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 40, 1, 2, 3, 4]
        #expect(DNSMessage.parseResponse(r2, id: 7, name: "a.test") == nil, "rdata past the end")
    }

    @Test func theSessionsAnswerIsWrittenFresh() throws {
        let q = DNSMessage.Question(id: 0xBEEF, name: "api.example.test", type: 1, recursionDesired: true)
        let bytes = DNSMessage.response(to: q, rcode: .noError, answers: [.init(address: 0xC613_010A, ttl: 60)])
        let (rcode, answers) = try #require(DNSMessage.parseResponse(bytes, id: 0xBEEF, name: "api.example.test"))
        #expect(rcode == 0 && answers == [.init(address: 0xC613_010A, ttl: 60)])
        let nx = DNSMessage.response(to: q, rcode: .nameError)
        #expect(nx[3] & 0x0F == 3 && nx[7] == 0)
    }
}
