// libFuzzer target for the session DNS's parsers: a session's query (hostile bytes from inside a sandbox)
// and an upstream's answer. Each must return nil or a value that keeps its promise: a name of at most 253
// characters of letters, digits, '-', '_' and dots; answers that the writer and the parser agree on.
// Built with -D CUBICLE_FUZZ -sanitize=fuzzer (make fuzz); without them it replays the files it is given.
import CubicleDNSWire
import FuzzReplay

func fuzzOne(_ bytes: [UInt8]) {
    if let q = DNSMessage.parseQuery(bytes) {
        precondition(q.name.utf8.count <= 253 && q.name.utf8.allSatisfy { $0 == 0x2E || DNSMessage.isNameByte($0) && !(0x41...0x5A).contains($0) },
                     "accepted a bad name: \(q.name)")
        let answer = DNSMessage.response(to: q, rcode: .noError, answers: [.init(address: 0x0A00_0001, ttl: 60)])
        if !q.name.isEmpty {
            let parsed = DNSMessage.parseResponse(answer, id: q.id, name: q.name)
            precondition(parsed.map { $0.answers } == [DNSMessage.Answer(address: 0x0A00_0001, ttl: 60)], "our own answer does not parse back")
        }
    }
    guard bytes.count >= 2 else { return }
    let id = UInt16(bytes[0]) << 8 | UInt16(bytes[1])
    if let (_, answers) = DNSMessage.parseResponse(bytes, id: id, name: "a.test") {
        precondition(answers.count <= 256, "more answers than the bound")
    }
}

@main
struct Fuzz {
    static func main() { FuzzReplay.main(fuzzOne) }
}
