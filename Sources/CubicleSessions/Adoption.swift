#if canImport(Glibc)
import Glibc
#endif
import CubicleAgentCore
import CubicleLinux
import CubicleNetwork
import CubicleRPC
import CubicleSandbox
import CubicleStorage

/// Taking over from a cubicled that died: each sandbox it left whose session record names a configured
/// runtime and a live agent is reconnected through its reconnect socket and served again under its id;
/// anything else (a warm sandbox, a half-built one, a dead init, a runtime no longer configured) is removed.
struct Adoption {
    let supervisor: SessionSupervisor

    /// Every sandbox in the state directory, adopted or removed. `isLive` says whether a key is already served.
    func takeOver(isLive: (SessionKey) -> Bool) async -> (sessions: [Session], removed: Int) {
        let launcher = supervisor.launcher, logger = supervisor.logger
        var sessions: [Session] = []
        var removed = 0
        for name in launcher.host.state.sandboxIDs() {
            let directory = launcher.host.state.sandbox(name)
            if let session = await adopt(directory, isLive: isLive) {
                sessions.append(session)
            } else {
                let left = await launcher.removeLeftovers(stateDirectory: directory.path)
                if !left.isEmpty { logger.error("could not remove a dead sandbox", metadata: ["sandbox": "\(name)", "left": "\(left)"]) }
                removed += 1
            }
        }
        return (sessions, removed)
    }

    private func adopt(_ directory: SandboxDirectory, isLive: (SessionKey) -> Bool) async -> Session? {
        let config = supervisor.config, catalog = supervisor.catalog
        guard let facts = try? JSON.parse(try Files.read(directory.sessionRecord)),
              let id = facts["session"]?.stringValue, (try? Validate.sessionID(id)) != nil,
              let runtime = facts["runtime"]?.stringValue.flatMap({ catalog.adoptable($0, version: Int(facts["version"]?.intValue ?? 1)) }),
              let created = facts["created"]?.intValue else { return nil }
        // Records from before sessions had owners were everyone's: the anonymous caller's.
        let owner = facts["owner"]?.stringValue ?? SessionKey.anonymousOwner
        guard !owner.isEmpty, owner.utf8.count <= 1024, !isLive(SessionKey(runtime: runtime.name, owner: owner, id: id)) else { return nil }
        let sandbox: Sandbox
        let agentPID: pid_t
        do {
            let found = try await supervisor.launcher.adopt(stateDirectory: directory.path)
            guard let pid = found.agentPID else {
                _ = await found.sandbox.teardown()
                return nil
            }
            (sandbox, agentPID) = (found.sandbox, pid)
        } catch {
            supervisor.logger.warning("sandbox could not be adopted", metadata: ["path": "\(directory.path)", "error": "\(error)"])
            return nil
        }
        let logs: (stdout: Int32, stderr: Int32)
        do { logs = try await sandbox.agentLogs() } catch {
            _ = await sandbox.teardown()
            return nil
        }
        // A PUBLIC session's link outlived its daemon; its policy goes back into the new daemon's table.
        var link: SessionLink?
        if runtime.networkMode == .public {
            guard let network = supervisor.network, let index = facts["link"]?.intValue else {
                _ = await sandbox.teardown()
                return nil
            }
            do {
                let role = runtime.roleArn.flatMap { arn in config.roleCredentials.first { $0.roleArn == arn } }
                try network.adopt(index: Int(index), runtime: runtime.name, sessionID: id, policy: runtime.egress, role: role)
                link = network.link(index: Int(index))
            } catch {
                supervisor.logger.warning("session's link could not be adopted", metadata: ["session": "\(id)", "error": "\(error)"])
                _ = await sandbox.teardown()
                return nil
            }
        }
        // Its storage stayed mounted inside it and on the host: held again, released at its end.
        var lease: SessionStorage.Lease?
        if facts["storage"]?.boolValue == true, runtime.sessionStorage != nil {
            lease = await supervisor.storage?.adopt(SessionStorage.Key(runtime: runtime.name, owner: owner, id: id))
        }
        let session = supervisor.resume(sandbox, id: id, owner: owner, runtime: runtime, agentPID: agentPID, created: Int(created), logs: logs, link: link, storage: lease)
        supervisor.events.publish("adopted", session: session, ["initPID": .int(Int64(sandbox.initPID)), "agentPID": .int(Int64(agentPID))])
        supervisor.logger.notice("session adopted from a previous cubicled", metadata: ["session": "\(id)", "runtime": "\(runtime.name)",
                                                                                        "sandbox": "\(sandbox.id)"])
        return session
    }
}
