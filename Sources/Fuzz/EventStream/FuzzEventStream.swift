// libFuzzer target for the AWS event-stream codec: any bytes through the decoder must fail cleanly or give
// messages that re-encode to the bytes they came from; and a message built from the input must round-trip.
// Built with -D CUBICLE_FUZZ -sanitize=fuzzer (make fuzz); without them it replays the files it is given.
import CubicleAgentCore
import FuzzReplay

func fuzzOne(_ bytes: [UInt8]) {
    var buffer = bytes
    if let messages = try? EventStream.decode(&buffer) {
        var consumed: [UInt8] = []
        for m in messages { consumed += m.encoded() }
        precondition(Array(bytes.prefix(consumed.count)) == consumed || messages.isEmpty,
                     "decoded messages do not re-encode to their bytes")
        precondition(consumed.count + buffer.count == bytes.count, "decode lost or invented bytes")
    }
    // Round trip: headers and payload cut out of the input.
    let text = String(decoding: bytes, as: UTF8.self)
    let parts = text.split(separator: "\u{1}", omittingEmptySubsequences: false).map(String.init)
    var headers: [(String, String)] = []
    var i = 0
    while i + 1 < parts.count - 1, headers.count < 8 {
        let name = String(parts[i].utf8.prefix(255)) ?? ""
        if !name.isEmpty { headers.append((name, String(parts[i + 1].utf8.prefix(4096)) ?? "")) }
        i += 2
    }
    let payload = Array((parts.last ?? "").utf8)
    let message = EventStream.Message(headers: headers, payload: payload)
    var encoded = message.encoded()
    let decoded = try? EventStream.decode(&encoded)
    precondition(decoded == [message] && encoded.isEmpty, "event-stream message did not round-trip")
}

@main
struct Fuzz {
    static func main() { FuzzReplay.main(fuzzOne) }
}
