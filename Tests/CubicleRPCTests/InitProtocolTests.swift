import CubicleJSON
import CubicleRPC
import Testing

/// The host <-> init protocol's typed values: each survives its own encoding through JSON text, as it
/// crosses the socket, and anything malformed from the other end is refused with a typed error.
@Suite struct InitProtocolTests {
    static func overTheWire(_ value: JSON) throws -> JSON { try JSON.parse(Array(value.text.utf8)) }

    static let process = ProcessParams(argv: ["/bin/sh", "-c", "echo hi"], env: ["A=b"], cwd: "/tmp")

    @Test(arguments: [InitRequest.startAgent(process), .runCommand(process, timeoutSeconds: 30), .endCommand(pid: 42), .connect(port: 8080), .status, .agentLogs])
    func requestsRoundTrip(_ request: InitRequest) throws {
        #expect(try InitRequest(method: request.method, params: try Self.overTheWire(request.params)) == request)
    }

    @Test func repliesRoundTripForTheirRequest() throws {
        let cases: [(InitRequest, InitReply)] = [(.startAgent(Self.process), .started(pid: 7)), (.runCommand(Self.process, timeoutSeconds: 1), .started(pid: 9)),
                                                 (.status, .status(agentPID: 12)), (.status, .status(agentPID: nil)), (.connect(port: 1), .none), (.agentLogs, .none),
                                                 (.endCommand(pid: 5), .none)]
        for (request, reply) in cases {
            #expect(try InitReply(json: try Self.overTheWire(reply.json), for: request) == reply)
        }
    }

    @Test func notificationsRoundTrip() throws {
        let all: [InitNotification] = [.ready(timings: [1, 2, 3]), .failed(step: "mount /tmp", errno: 28),
                                       .agentExited(ProcessExit(pid: 3, exitCode: 0, signal: nil)),
                                       .commandExited(ProcessExit(pid: 4, exitCode: nil, signal: 9), timedOut: true)]
        for n in all {
            #expect(try InitNotification(method: n.method, params: try Self.overTheWire(n.params)) == n)
        }
        #expect(ProcessExit(pid: 5, waitStatus: 3 << 8) == ProcessExit(pid: 5, exitCode: 3, signal: nil))
        #expect(ProcessExit(pid: 5, waitStatus: 9) == ProcessExit(pid: 5, exitCode: nil, signal: 9))
    }

    /// What init refuses from the host (with JSON-RPC's codes) and what the host refuses from init.
    @Test func malformedValuesAreRefused() {
        #expect(throws: RPCError.self) { try InitRequest(method: "sandbox.shutdown", params: [:]) }
        #expect(throws: RPCError.self) { try InitRequest(method: RPCMethod.connect, params: ["port": 0]) }
        #expect(throws: RPCError.self) { try InitRequest(method: RPCMethod.connect, params: ["port": 70000]) }
        #expect(throws: RPCError.self) { try InitRequest(method: RPCMethod.runCommand, params: ["process": Self.process.json]) }
        #expect(throws: RPCError.self) { try InitRequest(method: RPCMethod.runCommand, params: ["process": Self.process.json, "timeoutSeconds": 0]) }
        #expect(throws: RPCError.self) { try InitRequest(method: RPCMethod.startAgent, params: ["argv": [], "env": [], "cwd": "/"]) }
        // init itself, every process (-1) and a process group (negative) are never a command's pid.
        for pid: JSON in [1, 0, -1, -7, .int(1 << 40), "9", .null] {
            #expect(throws: RPCError.self) { try InitRequest(method: RPCMethod.endCommand, params: ["pid": pid]) }
        }
        #expect(throws: RPCDecodeError.self) { try InitReply(json: [:], for: .startAgent(Self.process)) }
        #expect(throws: RPCDecodeError.self) { try InitReply(json: ["pid": -1], for: .startAgent(Self.process)) }
        #expect(throws: RPCDecodeError.self) { try InitReply(json: ["agentPID": "x"], for: .status) }
        #expect(throws: RPCDecodeError.self) { try InitNotification(method: RPCMethod.agentExited, params: ["exitCode": 0]) }
        #expect(throws: RPCDecodeError.self) { try InitNotification(method: "agent.exploded", params: [:]) }
        #expect(throws: RPCDecodeError.self) { try InitNotification(method: RPCMethod.ready, params: ["timings": .array(Array(repeating: 1, count: 17))]) }
    }
}
