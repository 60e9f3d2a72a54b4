import Testing
@testable import CubicleRPC

struct JSONTests {
    @Test func roundTripsValues() throws {
        let v: JSON = ["a": [1, "two", true, nil], "b": ["c": .double(1.5)], "s": "quote\" slash\\ nl\n \u{1} ü 🎉"]
        #expect(try JSON.parse(v.serialized()) == v)
    }

    @Test(arguments: ["", "{", "[1,]", "{\"a\":1,}", "01", "1.", "\"\\x\"", "\"\u{01}\"", "[1] x", "{\"a\":1,\"a\":2}",
                      "\"\\ud800\"", "nul", "1e999", "{'a':1}"])
    func refusesMalformedInput(_ text: String) {
        #expect(throws: JSONError.self) { try JSON.parse(text) }
    }

    @Test func refusesInvalidUTF8AndDeepNesting() {
        #expect(throws: JSONError.self) { try JSON.parse([0x22, 0xFF, 0xFE, 0x22]) }
        #expect(throws: JSONError.self) { try JSON.parse(String(repeating: "[", count: 100) + String(repeating: "]", count: 100)) }
        #expect((try? JSON.parse(String(repeating: "[", count: 20) + String(repeating: "]", count: 20))) != nil)
    }

    @Test func decodesSurrogatePairs() throws {
        #expect(try JSON.parse("\"\\ud83c\\udf89\"") == .string("🎉"))
    }
}

struct FrameTests {
    @Test func splitsAndJoinsFrames() throws {
        var d = FrameDecoder()
        let a = Frame.encode(Array("hello".utf8)), b = Frame.encode(Array("world!".utf8))
        let all = a + b
        for byte in all.prefix(3) { d.append([byte]) }
        #expect(try d.next() == nil)
        d.append(all.dropFirst(3))
        #expect(try d.next() == Array("hello".utf8))
        #expect(try d.next() == Array("world!".utf8))
        #expect(try d.next() == nil)
    }

    @Test func rejectsOversizedAtTheHeader() {
        var d = FrameDecoder(maxSize: 1024)
        d.append([0x00, 0x00, 0x04, 0x01])
        #expect(throws: FrameError.oversized(1025, max: 1024)) { try d.next() }
        var e = FrameDecoder()
        e.append([0, 0, 0, 0])
        #expect(throws: FrameError.empty) { try e.next() }
    }
}

struct MessageTests {
    @Test func roundTripsEveryShape() throws {
        let messages: [RPCMessage] = [
            .request(id: 7, method: RPCMethod.connect, params: ["port": 8080], fds: 0),
            .notification(method: RPCMethod.ready, params: [:], fds: 0),
            .result(id: 7, value: ["pid": 3], fds: 2),
            .error(id: 7, RPCError(code: RPCError.failed, message: "nope", step: "exec", errno: 2)),
            // Found by the rpc-frames fuzzer: a step without an errno came back with errno 0, and an errno
            // without a step was dropped.
            .error(id: 8, RPCError(code: RPCError.failed, message: "refused", step: "connect")),
            .error(id: 9, RPCError(code: RPCError.failed, message: "refused", errno: 111)),
            .error(id: nil, RPCError(code: RPCError.invalidRequest, message: "bad")),
        ]
        for m in messages { #expect(try RPCMessage.decode(m.encoded()) == m) }
    }

    @Test(arguments: [
        #"{"id":1,"method":"x"}"#, #"{"jsonrpc":"1.0","id":1,"method":"x"}"#, #"{"jsonrpc":"2.0","id":"1","method":"x"}"#,
        #"{"jsonrpc":"2.0","id":1,"result":{},"fds":99}"#, #"{"jsonrpc":"2.0","method":"x","params":[1]}"#,
        #"{"jsonrpc":"2.0","result":{}}"#, #"{"jsonrpc":"2.0","id":1}"#, #"[]"#,
    ])
    func refusesMalformedMessages(_ text: String) {
        #expect(throws: RPCDecodeError.self) { try RPCMessage.decode(Array(text.utf8)) }
    }

    @Test func initConfigRoundTripsAndRejectsBadFields() throws {
        var c = InitConfig()
        c.hostname = "h"
        c.mounts = [.init(target: "/usr", kind: .bindReadOnly(sourceIndex: 0, directory: true)), .init(target: "/bin", kind: .symlink(destination: "usr/bin"))]
        c.seccompProgram = [1, 2, 3, 4, 5, 6, 7, 8]
        #expect(try InitConfig(json: JSON.parse(c.json.serialized())) == c)
        var bad = c.json
        if case .object(var o) = bad { o["mounts"] = [["target": "/../etc", "source": 0, "directory": true]]; bad = .object(o) }
        #expect(throws: RPCError.self) { try InitConfig(json: bad) }
        #expect(throws: RPCError.self) { try ProcessParams(json: ["argv": [], "env": [], "cwd": "/"]) }
        #expect(throws: RPCError.self) { try ProcessParams(json: ["argv": ["a\u{0}b"], "env": [], "cwd": "/"]) }
    }

    @Test func hexRoundTrips() {
        let bytes: [UInt8] = [0, 1, 0xAB, 0xFF]
        #expect(Hex.decode(Hex.encode(bytes)) == bytes)
        #expect(Hex.decode("abc") == nil)
        #expect(Hex.decode("zz") == nil)
    }
}
