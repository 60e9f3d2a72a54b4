import CubicleJSON

/// An error in the exact shape boto3 needs to raise the modelled exception: the status, the
/// `x-amzn-ErrorType` header and a JSON body with `message` (and `reason`/`fieldList` for validation).
public struct AgentCoreError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case validation = "ValidationException"
        case accessDenied = "AccessDeniedException"
        case resourceNotFound = "ResourceNotFoundException"
        case conflict = "RetryableConflictException"
        /// The control plane's: a name taken, a resource busy, a client token reused with another request.
        case controlConflict = "ConflictException"
        case throttling = "ThrottlingException"
        case serviceQuotaExceeded = "ServiceQuotaExceededException"
        case runtimeClient = "RuntimeClientError"
        case internalServer = "InternalServerException"
        // Authentication, as AWS's front door answers it (403 each): no credentials, a malformed
        // Authorization header, an access key it does not know, a signature that does not match or is stale.
        case missingAuthenticationToken = "MissingAuthenticationTokenException"
        case incompleteSignature = "IncompleteSignatureException"
        case unrecognizedClient = "UnrecognizedClientException"
        case invalidSignature = "InvalidSignatureException"

        public var status: Int {
            switch self {
            case .validation: 400
            case .accessDenied, .missingAuthenticationToken, .incompleteSignature, .unrecognizedClient, .invalidSignature: 403
            case .resourceNotFound: 404
            case .conflict, .controlConflict: 409
            case .throttling: 429
            case .serviceQuotaExceeded: 402
            case .runtimeClient: 424
            case .internalServer: 500
            }
        }

        /// The member name an event stream uses for this exception (`:exception-type`).
        public var eventStreamMember: String {
            let name = rawValue
            return name.prefix(1).lowercased() + name.dropFirst()
        }
    }

    public enum ValidationReason: String, Sendable {
        case cannotParse = "CannotParse"
        case fieldValidationFailed = "FieldValidationFailed"
    }

    public var kind: Kind
    public var message: String
    public var reason: ValidationReason?
    /// (field name, message) pairs for ValidationException's `fieldList`.
    public var fields: [(name: String, message: String)]

    public init(_ kind: Kind, _ message: String, reason: ValidationReason? = nil, fields: [(name: String, message: String)] = []) {
        self.kind = kind
        self.message = message
        self.reason = kind == .validation ? (reason ?? .fieldValidationFailed) : nil
        self.fields = fields
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.kind == b.kind && a.message == b.message && a.reason == b.reason
            && a.fields.map(\.name) == b.fields.map(\.name) && a.fields.map(\.message) == b.fields.map(\.message)
    }

    public var description: String { "\(kind.rawValue): \(message)" }
    public var status: Int { kind.status }
    public static let errorTypeHeader = "x-amzn-ErrorType"

    public var body: [UInt8] {
        var o: [String: JSON] = ["message": .string(message)]
        if let reason {
            o["reason"] = .string(reason.rawValue)
            if !fields.isEmpty {
                o["fieldList"] = .array(fields.map { ["name": .string($0.name), "message": .string($0.message)] })
            }
        }
        return JSON.object(o).serialized()
    }

    /// A synchronous invocation the agent did not answer within its runtime's request time limit.
    public static func requestTimeLimit(_ seconds: Int) -> AgentCoreError {
        AgentCoreError(.runtimeClient, "The agent did not answer within the runtime's \(seconds) s limit for a synchronous request; stream the response (text/event-stream) for longer work")
    }

    // The messages AWS itself uses where the contract fixes one.
    public static let initializationTimeout = AgentCoreError(
        .runtimeClient, "Runtime initialization time exceeded. Please make sure that initialization completes in 30s.")

    public static func invalidField(_ name: String, _ message: String) -> AgentCoreError {
        AgentCoreError(.validation, "1 validation error detected: Value at '\(name)' failed to satisfy constraint: \(message)",
                       reason: .fieldValidationFailed, fields: [(name, message)])
    }
}
