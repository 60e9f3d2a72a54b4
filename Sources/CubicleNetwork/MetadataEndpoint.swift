#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import NIOCore
import NIOHTTP1

/// The metadata endpoint a PUBLIC session sees at 169.254.169.254 (DNAT'ed to the gateway): the part of
/// EC2's IMDSv2 that SDKs use for credentials. A token first (`PUT /latest/api/token` with a TTL header),
/// then the role and its credentials with that token. The caller is the session whose address the
/// connection comes from (the kernel ties it to the session's link); a token is good only for that session.
final class MetadataHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let network: SessionNetworking
    private var head: HTTPRequestHead?
    private var bodyBytes = 0

    init(network: SessionNetworking) { self.network = network }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            bodyBytes = 0
        case .body(let b):
            bodyBytes += b.readableBytes
            if bodyBytes > 4096 { context.close(promise: nil) }
        case .end:
            guard let h = head else { return }
            head = nil
            let (status, headers, body) = answer(h, from: context.channel.remoteAddress?.ipAddress.flatMap { IPAddress($0) })
            var responseHeaders = HTTPHeaders([("Content-Type", "text/plain"), ("Content-Length", "\(body.utf8.count)"), ("Server", "EC2ws")])
            for (k, v) in headers { responseHeaders.add(name: k, value: v) }
            if !h.isKeepAlive { responseHeaders.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: h.version, status: status, headers: responseHeaders))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let keepAlive = h.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in if !keepAlive { context.close(promise: nil) } }
        }
    }

    static let tokenTTLHeader = "X-aws-ec2-metadata-token-ttl-seconds"
    static let tokenHeader = "X-aws-ec2-metadata-token"
    static let credentialsPath = "/latest/meta-data/iam/security-credentials/"

    func answer(_ h: HTTPRequestHead, from source: IPAddress?) -> (HTTPResponseStatus, [(String, String)], String) {
        guard let source, let entry = network.entry(source) else { return (.forbidden, [], "Forbidden") }
        let path = String(h.uri.split(separator: "?", maxSplits: 1).first ?? "")
        if path == "/latest/api/token" {
            guard h.method == .PUT else { return (.methodNotAllowed, [], "") }
            // As EC2 does: a forwarded request (a proxy inside the session relaying for someone else) gets no token.
            guard h.headers["X-Forwarded-For"].isEmpty else { return (.forbidden, [], "Forbidden") }
            guard let ttl = h.headers[Self.tokenTTLHeader].first.flatMap({ Int($0) }), (1...21_600).contains(ttl) else {
                return (.badRequest, [], "Bad Request")
            }
            guard let token = network.issueToken(for: source, seconds: ttl) else { return (.tooManyRequests, [], "Too Many Requests") }
            return (.ok, [(Self.tokenTTLHeader, "\(ttl)")], token)
        }
        guard h.method == .GET || h.method == .HEAD else { return (.methodNotAllowed, [], "") }
        guard let token = h.headers[Self.tokenHeader].first, network.tokenValid(token, for: source) else { return (.unauthorized, [], "Unauthorized") }
        switch path {
        case "/latest/meta-data/placement/region":
            return (.ok, [], network.settings.region)
        case Self.credentialsPath, String(Self.credentialsPath.dropLast()):
            guard let role = entry.role else { return (.notFound, [], "Not Found") }
            return (.ok, [], role.roleName)
        case Self.credentialsPath + (entry.role?.roleName ?? "\u{0}"):
            guard let role = entry.role else { return (.notFound, [], "Not Found") }
            let credentials: RoleCredentialSource.Credentials
            do { credentials = try role.load() } catch {
                network.logger.error("metadata endpoint: no credentials for role", metadata: ["role": "\(role.roleArn)", "error": "\(error)"])
                return (.internalServerError, [], "Internal Server Error")
            }
            let now = Timestamp.now()
            var json = "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"\(now.iso8601)\",\n  \"Type\" : \"AWS-HMAC\",\n"
            json += "  \"AccessKeyId\" : \"\(Self.escape(credentials.accessKeyId))\",\n  \"SecretAccessKey\" : \"\(Self.escape(credentials.secretAccessKey))\",\n"
            json += "  \"Token\" : \"\(Self.escape(credentials.sessionToken ?? ""))\",\n  \"Expiration\" : \"\(now.adding(seconds: 3600).iso8601)\"\n}"
            return (.ok, [], json)
        default:
            return (.notFound, [], "Not Found")
        }
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case _ where u.value < 0x20: out += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16)
            default: out.unicodeScalars.append(u)
            }
        }
        return out
    }
}

/// Wall-clock seconds, printed as ISO 8601 UTC.
struct Timestamp {
    var seconds: Int
    static func now() -> Timestamp {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Timestamp(seconds: ts.tv_sec)
    }
    func adding(seconds s: Int) -> Timestamp { Timestamp(seconds: seconds + s) }
    var iso8601: String {
        var t = time_t(seconds)
        var tm = Glibc.tm()
        gmtime_r(&t, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(tm.tm_year + 1900)-\(two(tm.tm_mon + 1))-\(two(tm.tm_mday))T\(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec))Z"
    }
}
