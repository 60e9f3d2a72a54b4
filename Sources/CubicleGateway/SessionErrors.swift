import CubicleAgentCore
import CubicleSessions

extension AgentCoreError {
    /// The wire error AgentCore answers where the registry or a session refuses (botocore's model names
    /// the types; AWS's own message where the contract fixes one).
    init(_ error: SessionError) {
        switch error {
        case .runtimeNotFound, .sessionNotFound, .endpointNotFound: self.init(.resourceNotFound, error.description)
        case .shuttingDown: self.init(.throttling, error.description)
        case .quotaReached: self.init(.serviceQuotaExceeded, error.description)
        case .couldNotStart: self.init(.runtimeClient, error.description)
        case .initializationTimedOut(_, let isAWSDefault):
            self = isAWSDefault ? .initializationTimeout : AgentCoreError(.runtimeClient, error.description)
        case .unexpected: self.init(.internalServer, error.description)
        }
    }
}

extension SessionManager {
    /// `acquire`, answering in AgentCore's errors.
    func session(_ address: RuntimeAddress, owner: String, sessionID: String) async throws(AgentCoreError) -> Session {
        do { return try await acquire(runtime: address.name, qualifier: address.qualifier, owner: owner, sessionID: sessionID) } catch { throw AgentCoreError(error) }
    }
}
