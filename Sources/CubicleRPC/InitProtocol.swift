import CubicleJSON

/// What the host asks of a running init, one typed value that both ends encode and decode (as
/// `ForkRequest` is), so a field cannot be spelt one way on one side and another on the other, and init
/// applies no defaults of its own. Framed as JSON-RPC requests (`Message.swift`); descriptors travel
/// beside the reply with SCM_RIGHTS, never inside it.
public enum InitRequest: Equatable, Sendable {
    /// Start the agent. Reply `.started`, descriptors [stdout, stderr] (read ends).
    case startAgent(ProcessParams)
    /// Run a command with the agent's identity; `command.exited` follows. Reply `.started`, [stdout, stderr].
    case runCommand(ProcessParams, timeoutSeconds: Int)
    /// Start a process on a new terminal of its own (its controlling terminal, sized rows x cols), with the
    /// agent's identity; `command.exited` follows, without a deadline. Reply `.started`, [the terminal's master].
    case openShell(ProcessParams, rows: Int, cols: Int)
    /// End a command or shell that init started and that has not been reaped (SIGKILL to its process group,
    /// then to it): its client went away. Never the agent. `command.exited` follows as for any end. Reply `.none`.
    case endCommand(pid: Int32)
    /// A TCP connection to 127.0.0.1:port in the sandbox's network namespace. Reply `.none`, [the socket].
    case connect(port: UInt16)
    /// For a daemon that reconnected: is the agent running. Reply `.status`.
    case status
    /// For a daemon that reconnected: the agent's stdout and stderr again. Reply `.none`, [stdout, stderr].
    case agentLogs

    public static let commandTimeoutRange = 1...86_400
    public static let terminalSizeRange = 1...1000

    public var method: String {
        switch self {
        case .startAgent: RPCMethod.startAgent
        case .runCommand: RPCMethod.runCommand
        case .openShell: RPCMethod.openShell
        case .endCommand: RPCMethod.endCommand
        case .connect: RPCMethod.connect
        case .status: RPCMethod.status
        case .agentLogs: RPCMethod.agentLogs
        }
    }

    public var params: JSON {
        switch self {
        case .startAgent(let p): p.json
        case .runCommand(let p, let timeout):
            ["process": p.json, "timeoutSeconds": .int(Int64(timeout))]
        case .openShell(let p, let rows, let cols):
            ["process": p.json, "rows": .int(Int64(rows)), "cols": .int(Int64(cols))]
        case .endCommand(let pid): ["pid": .int(Int64(pid))]
        case .connect(let port): ["port": .int(Int64(port))]
        case .status, .agentLogs: [:]
        }
    }

    /// How many descriptors the reply carries.
    public var replyDescriptors: Int {
        switch self {
        case .startAgent, .runCommand, .agentLogs: 2
        case .connect, .openShell: 1
        case .status, .endCommand: 0
        }
    }

    public init(method: String, params: JSON) throws(RPCError) {
        switch method {
        case RPCMethod.startAgent:
            self = .startAgent(try ProcessParams(json: params))
        case RPCMethod.runCommand:
            guard let process = params["process"], let timeout = params["timeoutSeconds"]?.intValue,
                  Self.commandTimeoutRange.contains(Int(clamping: timeout)) else {
                throw RPCError(code: RPCError.invalidParams, message: "command.run needs process and timeoutSeconds in \(Self.commandTimeoutRange)")
            }
            self = .runCommand(try ProcessParams(json: process), timeoutSeconds: Int(timeout))
        case RPCMethod.openShell:
            guard let process = params["process"], let rows = params["rows"]?.intValue, let cols = params["cols"]?.intValue,
                  Self.terminalSizeRange.contains(Int(clamping: rows)), Self.terminalSizeRange.contains(Int(clamping: cols)) else {
                throw RPCError(code: RPCError.invalidParams, message: "shell.open needs process, rows and cols in \(Self.terminalSizeRange)")
            }
            self = .openShell(try ProcessParams(json: process), rows: Int(rows), cols: Int(cols))
        case RPCMethod.endCommand:
            guard let pid = params["pid"]?.intValue.flatMap({ Int32(exactly: $0) }), pid > 1 else {
                throw RPCError(code: RPCError.invalidParams, message: "command.end needs the pid of a command (> 1)")
            }
            self = .endCommand(pid: pid)
        case RPCMethod.connect:
            guard let port = params["port"]?.intValue, (1...65535).contains(port) else {
                throw RPCError(code: RPCError.invalidParams, message: "port must be 1..65535")
            }
            self = .connect(port: UInt16(port))
        case RPCMethod.status:
            self = .status
        case RPCMethod.agentLogs:
            self = .agentLogs
        default:
            throw RPCError(code: RPCError.methodNotFound, message: "unknown method \(method.prefix(64))")
        }
    }
}

/// init's answer to an `InitRequest` (descriptors beside it).
public enum InitReply: Equatable, Sendable {
    /// A process started: its pid inside the sandbox.
    case started(pid: Int32)
    /// The agent's pid inside, or nil once it has exited.
    case status(agentPID: Int32?)
    /// Nothing but the descriptors.
    case none

    public var json: JSON {
        switch self {
        case .started(let pid): ["pid": .int(Int64(pid))]
        case .status(let pid): ["agentPID": pid.map { .int(Int64($0)) } ?? .null]
        case .none: [:]
        }
    }

    /// The reply `request` must get; a reply of another shape is a protocol violation.
    public init(json: JSON, for request: InitRequest) throws(RPCDecodeError) {
        switch request {
        case .startAgent, .runCommand, .openShell:
            guard let pid = json["pid"]?.intValue.flatMap({ Int32(exactly: $0) }), pid > 0 else { throw .shape("\(request.method) reply without a pid") }
            self = .started(pid: pid)
        case .status:
            guard let value = json["agentPID"] else { throw .shape("sandbox.status reply without agentPID") }
            if value == .null { self = .status(agentPID: nil); return }
            guard let pid = value.intValue.flatMap({ Int32(exactly: $0) }), pid > 0 else { throw .shape("sandbox.status reply with a bad agentPID") }
            self = .status(agentPID: pid)
        case .connect, .agentLogs, .endCommand:
            self = .none
        }
    }
}

/// What init tells the host unasked.
public enum InitNotification: Equatable, Sendable {
    /// The sandbox is built; init's CLOCK_MONOTONIC marks (main entered, configured, filesystem built).
    case ready(timings: [UInt64])
    /// Building the sandbox failed at `step`.
    case failed(step: String, errno: Int32)
    case agentExited(ProcessExit)
    case commandExited(ProcessExit, timedOut: Bool)

    public var method: String {
        switch self {
        case .ready: RPCMethod.ready
        case .failed: RPCMethod.failed
        case .agentExited: RPCMethod.agentExited
        case .commandExited: RPCMethod.commandExited
        }
    }

    public var params: JSON {
        switch self {
        case .ready(let timings): return ["timings": JSON.array(timings.map { JSON.int(Int64(clamping: $0)) })]
        case .failed(let step, let errno): return ["step": JSON.string(step), "errno": JSON.int(Int64(errno))]
        case .agentExited(let e): return e.json
        case .commandExited(let e, let timedOut):
            if case .object(var o) = e.json { o["timedOut"] = .bool(timedOut); return .object(o) }
            return e.json
        }
    }

    /// Anything malformed is refused: the host treats init as hostile.
    public init(method: String, params: JSON) throws(RPCDecodeError) {
        switch method {
        case RPCMethod.ready:
            // The marks only feed the spawn breakdown: a ready without them is still ready.
            let marks = params["timings"]?.arrayValue ?? []
            guard marks.count <= 16 else { throw .shape("ready with too many timings") }
            self = .ready(timings: marks.compactMap { $0.intValue }.map { UInt64(clamping: $0) })
        case RPCMethod.failed:
            guard let step = params["step"]?.stringValue, let errno = params["errno"]?.intValue else { throw .shape("failed without step and errno") }
            self = .failed(step: String(step.prefix(200)), errno: Int32(clamping: errno))
        case RPCMethod.agentExited:
            self = .agentExited(try ProcessExit(json: params))
        case RPCMethod.commandExited:
            self = .commandExited(try ProcessExit(json: params), timedOut: params["timedOut"]?.boolValue ?? false)
        default:
            throw .shape("unknown notification \(method.prefix(64))")
        }
    }
}

/// How a process init started ended: an exit code or a signal.
public struct ProcessExit: Equatable, Sendable {
    public var pid: Int32
    public var exitCode: Int32?
    public var signal: Int32?

    public init(pid: Int32, exitCode: Int32?, signal: Int32?) {
        (self.pid, self.exitCode, self.signal) = (pid, exitCode, signal)
    }

    /// From a wait status.
    public init(pid: Int32, waitStatus status: Int32) {
        let exited = status & 0x7f == 0
        self.init(pid: pid, exitCode: exited ? (status >> 8) & 0xff : nil, signal: exited ? nil : status & 0x7f)
    }

    public var json: JSON {
        ["pid": .int(Int64(pid)), "exitCode": exitCode.map { .int(Int64($0)) } ?? .null, "signal": signal.map { .int(Int64($0)) } ?? .null]
    }

    public init(json: JSON) throws(RPCDecodeError) {
        guard let pid = json["pid"]?.intValue.flatMap({ Int32(exactly: $0) }), pid > 0 else { throw .shape("exit without a pid") }
        self.init(pid: pid, exitCode: json["exitCode"]?.intValue.map { Int32(clamping: $0) },
                  signal: json["signal"]?.intValue.map { Int32(clamping: $0) })
    }
}
