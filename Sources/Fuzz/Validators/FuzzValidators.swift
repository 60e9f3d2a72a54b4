// libFuzzer target for both planes' request validators: routes and ARNs (the control plane's too), session ids, command bodies,
// shell frames and shellIds,
// percent-decoding and the JSON parser. Each must accept or throw its typed error, and what it accepts must
// keep its promise (a session id is 33...256 printable ASCII; a runtime name is valid).
// Built with -D CUBICLE_FUZZ -sanitize=fuzzer (make fuzz); without them it replays the files it is given.
import CubicleAgentCore
import FuzzReplay
import CubicleJSON

func fuzzOne(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    let fields = text.split(separator: "\n", maxSplits: 4, omittingEmptySubsequences: false).map(String.init)
    func field(_ i: Int) -> String { i < fields.count ? fields[i] : "" }

    if let route = try? Route.parse(method: field(0), path: field(1), query: field(2).isEmpty ? nil : field(2)) {
        _ = route
    }
    if let address = try? RuntimeAddress.parse(field(1), accountId: field(2).isEmpty ? nil : field(2), qualifier: nil) {
        precondition(RuntimeAddress.isValidName(address.name), "accepted an invalid runtime name: \(address.name)")
    }
    if let id = try? Validate.sessionID(field(3)) {
        precondition((33...256).contains(id.utf8.count) && id.utf8.allSatisfy { $0 >= 0x21 && $0 <= 0x7E },
                     "accepted a bad session id")
    }
    if let decoded = PercentEncoding.decode(field(1)) { _ = decoded }
    // The control plane's routes: what they accept carries identifiers that match the model's patterns.
    if let control = try? ControlRoute.parse(method: field(0), path: field(1)) {
        switch control {
        case .getRuntime(let id), .updateRuntime(let id), .deleteRuntime(let id), .listVersions(let id), .createEndpoint(let id), .listEndpoints(let id):
            precondition(RuntimeAddress.isValidName(id), "accepted a bad runtime id")
        case .getEndpoint(let id, let name), .updateEndpoint(let id, let name), .deleteEndpoint(let id, let name):
            precondition(RuntimeAddress.isValidName(id) && ControlRoute.isEndpointName(name), "accepted a bad endpoint")
        case .tagResource(let arn), .untagResource(let arn), .listTags(let arn):
            precondition((20...1011).contains(arn.utf8.count), "accepted a bad resource ARN")
        case .createRuntime, .listRuntimes: break
        }
    }
    _ = QueryString.parseAll(field(2))
    if let command = try? CommandRequest(body: Array(field(4).utf8)) {
        precondition(!command.command.isEmpty && !command.command.utf8.contains(0), "accepted a bad command")
    }
    // A shell client's frames: whatever parses has a known channel; a resize is within a terminal's range.
    if let (channel, payload) = ShellProtocol.parse(bytes) {
        if channel == .resize, let size = ShellProtocol.size(fromResize: payload) {
            precondition((1...1000).contains(size.rows) && (1...1000).contains(size.cols), "accepted an impossible terminal size")
        }
        _ = ShellProtocol.exitCode(fromStatus: payload)
    }
    if ShellProtocol.validShellID(field(2)) {
        precondition(!field(2).contains("&") && !field(2).contains("?") && !field(2).contains("#"), "accepted a shellId a query would split")
    }
    if let json = try? JSON.parse(bytes) {
        let again = try? JSON.parse(json.serialized())
        precondition(again == json, "JSON did not survive serialize/parse")
    }
}

@main
struct Fuzz {
    static func main() { FuzzReplay.main(fuzzOne) }
}
