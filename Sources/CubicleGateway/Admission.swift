#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleAgentLink
import CubicleAuth
import CubicleLinux
import CubicleRuntimes
import HTTPTypes
import Hummingbird
import NIOCore

/// Who may call: every request on the data plane's listener, both planes, is admitted here before any of it
/// reaches a session, an agent or the control plane. A signed request's body is read and hashed before a
/// byte of it goes on; a bearer token is checked against its runtime's JWT authorizer.
public struct Admission: Sendable {
    public let authenticator: Authenticator
    public let tokens: JWTVerifier
    /// Where an invocation's body larger than `SpooledBody.memoryLimit` waits while its signature is checked.
    let spoolDirectory: String

    public init(authenticator: Authenticator, tokens: JWTVerifier, spoolDirectory: String) {
        self.authenticator = authenticator
        self.tokens = tokens
        self.spoolDirectory = spoolDirectory
    }

    /// What the head carries.
    enum Credential: Sendable {
        /// No principals file, no bearer token: the anonymous caller (loopback only).
        case none
        case signature(PendingSignature)
        case bearer(String)
    }

    /// Reads the head's credential; throws the 403s that need no body.
    func credential(_ request: HTTPRequest, path: String, query: String) throws(AgentCoreError) -> Credential {
        let headers = request.headerFields
        let authorization = headers[values: .authorization]
        if let first = authorization.first, first.hasPrefix("Bearer ") {
            guard authorization.count == 1 else { throw AgentCoreError(.accessDenied, "Only one Authorization header is allowed") }
            return .bearer(String(first.dropFirst("Bearer ".count)))
        }
        // Without principals nothing is checked: no copy of the fields for a lookup that would not happen.
        guard authenticator.requiresSignatures else { return .none }
        let pending = try authenticator.begin(method: request.method.rawValue, path: path, query: query, authority: request.authority,
                                              headers: Self.lowercased(headers))
        return pending.map { .signature($0) } ?? .none
    }

    /// The fields by lowercased name, in order, for SigV4's lookups: a scan of a few fields costs less
    /// than a field name made and validated per lookup (perf, a warm signed invoke).
    static func lowercased(_ fields: HTTPFields) -> [(name: String, value: String)] {
        fields.map { ($0.name.canonicalName, $0.value) }
    }

    /// The caller of an operation on `runtime`, with `payloadHash` the body's SHA-256 where a signature
    /// needs it. A signature is verified before the runtime is looked up, so an unsigned caller cannot learn
    /// which runtimes exist; a bearer token needs the runtime first, for its authorizer. Checks that the
    /// runtime is called the way it is configured to be (a JWT authorizer takes bearer tokens only; without
    /// one, bearer tokens are refused, as AgentCore answers) and that the caller may do `actions` on it.
    func caller(_ credential: Credential, payloadHash: String?, runtime: String, actions: [String],
                config: () throws(AgentCoreError) -> RuntimeConfig) async throws(AgentCoreError) -> Caller {
        let caller: Caller
        switch credential {
        case .bearer(let token):
            guard let authorizer = try config().authorizer else { throw Self.mismatch }
            caller = try await tokens.verify(token, for: authorizer)
        case .signature(let pending):
            caller = try pending.verify(payloadHash: payloadHash ?? PayloadHash.empty)
            guard try config().authorizer == nil else { throw Self.mismatch }
        case .none:
            guard try config().authorizer == nil else { throw Self.mismatch }
            caller = .anonymous
        }
        let arn = authenticator.runtimeARN(runtime)
        for action in actions { try authenticator.authorize(caller, action, arn) }
        return caller
    }

    /// AgentCore's answer to SigV4 on a runtime with a JWT authorizer, and to a bearer token on one without.
    static let mismatch = AgentCoreError(.accessDenied, "Authorization method mismatch. The agent is configured for a different authorization method than what was used in your request.")

    /// A control-plane operation's caller: SigV4 only.
    func controlCaller(_ credential: Credential, payloadHash: String, action: String, resource: String) throws(AgentCoreError) -> Caller {
        let caller: Caller
        switch credential {
        case .bearer: throw AgentCoreError(.accessDenied, "The control plane takes SigV4-signed requests, not bearer tokens")
        case .signature(let pending): caller = try pending.verify(payloadHash: payloadHash)
        case .none: caller = .anonymous
        }
        try authenticator.authorize(caller, action, resource)
        return caller
    }
}

/// A request body read whole before any of it goes on, because the signature that covers it must be
/// checked first: up to `memoryLimit` in memory, the rest in an unlinked file in the spool directory, so a
/// 100 MB invocation does not hold 100 MB of cubicled's memory while it waits.
final class SpooledBody: @unchecked Sendable {
    static let memoryLimit = 1 << 20
    private(set) var memory = ByteBuffer()
    private var file: Int32 = -1
    private(set) var length = 0
    let hash: String

    private init(hash: String) { self.hash = hash }
    deinit { if file >= 0 { close(file) } }

    static func read(_ body: RequestBody, limit: Int, directory: String) async throws(AgentCoreError) -> SpooledBody {
        var hasher = PayloadHash()
        var memory = ByteBuffer()
        var file: Int32 = -1
        var length = 0
        do {
            for try await buffer in body {
                length += buffer.readableBytes
                guard length <= limit else {
                    throw AgentCoreError.invalidField("payload", "Member must have length less than or equal to \(limit)")
                }
                buffer.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) }
                if file < 0, memory.readableBytes + buffer.readableBytes <= memoryLimit {
                    var b = buffer
                    memory.writeBuffer(&b)
                    continue
                }
                if file < 0 { file = try openSpool(directory) }
                if memory.readableBytes > 0 {
                    try writeAll(file, memory)
                    memory.clear()
                }
                try writeAll(file, buffer)
            }
        } catch let e as AgentCoreError {
            if file >= 0 { close(file) }
            throw e
        } catch {
            if file >= 0 { close(file) }
            throw AgentCoreError(.validation, "Could not read request body: \(error)", reason: .cannotParse)
        }
        let spooled = SpooledBody(hash: hasher.finish())
        spooled.memory = memory
        spooled.file = file
        spooled.length = length
        return spooled
    }

    /// A file no one else can open: made 0600 and unlinked at once.
    private static func openSpool(_ directory: String) throws -> Int32 {
        var template = Array("\(directory)/body-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw AgentCoreError(.internalServer, "could not spool the request body: \(SystemError("mkostemp \(directory)", errno: errno))") }
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return fd
    }

    private static func writeAll(_ fd: Int32, _ buffer: ByteBuffer) throws {
        try buffer.withUnsafeReadableBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw AgentCoreError(.internalServer, "could not spool the request body: \(SystemError("write", errno: errno))")
                }
                offset += n
            }
        }
    }

    /// The body, in order, to the agent.
    func write(to writer: AgentBodyWriter, received: (Int) -> Void) async throws {
        if file < 0 {
            received(memory.readableBytes)
            if memory.readableBytes > 0 { try await writer.write(memory) }
            return
        }
        var offset: off_t = 0
        while Int(offset) < length {
            var chunk = ByteBuffer()
            let want = min(256 << 10, length - Int(offset))
            let got = try chunk.writeWithUnsafeMutableBytes(minimumWritableBytes: want) { raw in
                let n = pread(file, raw.baseAddress!, want, offset)
                guard n > 0 else { throw SystemError("pread spooled body", errno: n < 0 ? errno : EIO) }
                return n
            }
            offset += off_t(got)
            received(got)
            try await writer.write(chunk)
        }
    }
}

extension ControlRoute {
    /// The IAM action a control-plane operation is checked for.
    var action: String { "bedrock-agentcore:" + operation }

    /// The resource it is checked on: `runtime/*` for creating and listing runtimes, the runtime's ARN for
    /// the rest (an endpoint's, `.../runtime-endpoint/NAME`, for one endpoint), the ARN given for tags.
    func resource(_ auth: Authenticator) -> String {
        switch self {
        case .createRuntime, .listRuntimes: auth.runtimeARN("*")
        case .getRuntime(let id), .updateRuntime(let id), .deleteRuntime(let id), .listVersions(let id), .createEndpoint(let id), .listEndpoints(let id):
            auth.runtimeARN(id)
        case .getEndpoint(let id, let name), .updateEndpoint(let id, let name), .deleteEndpoint(let id, let name):
            auth.runtimeARN(id) + "/runtime-endpoint/" + name
        case .tagResource(let arn), .untagResource(let arn), .listTags(let arn): arn
        }
    }
}
