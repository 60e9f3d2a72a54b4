// libFuzzer target for what cubicled reads from init: the frame decoder fed in arbitrary pieces, then the
// JSON-RPC decoder on every frame. Whatever decodes must encode and decode to the same message.
// Built with -D CUBICLE_FUZZ -sanitize=fuzzer (make fuzz); without them it replays the files it is given.
import CubicleRPC
import FuzzReplay

func fuzzOne(_ bytes: [UInt8]) {
    guard let first = bytes.first else { return }
    // The first byte picks how the rest arrives: in pieces of 1...256 bytes, as reads from a socket would.
    let piece = Int(first) + 1
    var decoder = FrameDecoder(maxSize: 64 << 10)
    var offset = 1
    while offset < bytes.count {
        let end = min(bytes.count, offset + piece)
        decoder.append(bytes[offset..<end])
        offset = end
        while true {
            let payload: [UInt8]?
            do { payload = try decoder.next() } catch { return }  // a bad frame ends the channel
            guard let payload else { break }
            precondition(payload.count <= 64 << 10, "a frame over the bound was returned")
            guard let message = try? RPCMessage.decode(payload) else { continue }
            let again = try? RPCMessage.decode(message.encoded())
            precondition(again == message, "RPC message did not survive encode/decode: \(message) became \(String(describing: again)) via \(String(decoding: message.encoded(), as: UTF8.self))")
        }
    }
}

@main
struct Fuzz {
    static func main() { FuzzReplay.main(fuzzOne) }
}
