import CCubicleShim
import CubicleLinux
import CubicleRPC

/// Why a sandbox could not be made or used. Every case says what failed in words an operator can act on.
public enum SandboxError: Error, CustomStringConvertible, Sendable {
    case missingCodeDirectory(String)
    case missingBindSource(String)
    case missingInit(String)
    case uidRangesExhausted(Int)
    case seccomp(SeccompError)
    case cgroup(CgroupError)
    case system(SystemError)
    /// The child failed before exec; the step is from the C shim.
    case spawn(step: String, errno: Int32)
    /// init reported a failure while building the sandbox.
    case initFailed(step: String, errno: Int32)
    case initTimeout(String)
    case rpc(RPCError)
    /// init broke the protocol (malformed or oversized frame, wrong descriptor); its sandbox is ended.
    case protocolViolation(String)
    case ended(String)

    public var description: String {
        switch self {
        case .missingCodeDirectory(let p): "code directory \(p) does not exist or is not a directory"
        case .missingBindSource(let p): "read-only mount source \(p) does not exist"
        case .missingInit(let p): "cubicle-init not found at \(p)"
        case .uidRangesExhausted(let n): "all \(n) host uid ranges are in use; end a session or raise the range count"
        case .seccomp(let e): e.description
        case .cgroup(let e): e.description
        case .system(let e): e.description
        case .spawn(let step, let errno): "starting cubicle-init failed at \(step): \(SystemError(step, errno: errno))"
        case .initFailed(let step, let errno): "cubicle-init failed building the sandbox: \(SystemError(step, errno: errno))"
        case .initTimeout(let what): "cubicle-init did not answer in time: \(what)"
        case .rpc(let e): "cubicle-init refused: \(e)"
        case .protocolViolation(let why): "cubicle-init broke the control protocol: \(why)"
        case .ended(let why): "sandbox has ended: \(why)"
        }
    }
}

extension SandboxError {
    /// A child's failure before it became init (a step of the C shim), naming the bind source it could not
    /// open when that was the step.
    static func childFailed(step: Int32, errno: Int32, index: Int32, sources: [String]) -> SandboxError {
        if step == Int32(CUBICLE_STEP_OPEN_SOURCE.rawValue), sources.indices.contains(Int(index)) {
            return .spawn(step: "open \(sources[Int(index)])", errno: errno)
        }
        return .spawn(step: SpawnStep.name(step), errno: errno)
    }
}
