// libFuzzer target for SigV4's text: the Authorization header parser, the presigned-URL query parser, X-Amz-Date and the canonical request
// (URI, query and header canonicalisation). Each must accept or throw its typed error, and what it accepts
// must keep its promise: a parsed header has a 32-byte signature, a five-part scope and signs `host`; the
// canonical URI and query contain only unreserved bytes, `%XX` and their separators; the canonical query
// does not depend on the order of its pairs.
// Built with -D CUBICLE_FUZZ -sanitize=fuzzer (make fuzz); without them it replays the files it is given.
import CubicleAgentCore
import FuzzReplay

func fuzzOne(_ bytes: [UInt8]) {
    let text = String(decoding: bytes, as: UTF8.self)
    let fields = text.split(separator: "\n", maxSplits: 4, omittingEmptySubsequences: false).map(String.init)
    func field(_ i: Int) -> String { i < fields.count ? fields[i] : "" }

    if let auth = try? SigV4.parseAuthorization(field(0)) {
        precondition(auth.signature.count == 32 && auth.signedHeaders.contains("host") && auth.date.utf8.count == 8,
                     "accepted an Authorization header that breaks its promise")
    }
    // A presigned URL's query: what it accepts has the header's promises, a sane expiry, and a signed query
    // without the signature.
    if let presigned = try? SigV4.parsePresigned(query: field(3)) {
        precondition(presigned.authorization.signature.count == 32 && (1...604_800).contains(presigned.expires)
                     && !presigned.signedQuery.contains("X-Amz-Signature="), "accepted a presigned query that breaks its promise")
    }
    if let seconds = SigV4.parseDate(field(1)) {
        precondition(SigV4.parseDate(SigV4.formatDate(seconds)) == seconds, "X-Amz-Date did not survive format/parse")
    }
    let headers = field(4).split(separator: "\r", omittingEmptySubsequences: false).map(String.init)
    let canonical = SigV4.canonicalRequest(method: "POST", path: field(2), query: field(3), signedHeaders: ["host", "x-amz-date"],
                                           values: { _ in headers }, payloadHash: PayloadHashes.empty)
    let lines = canonical.split(separator: 0x0A, omittingEmptySubsequences: false)
    precondition(lines.count >= 7, "canonical request lost its lines")
    let allowed = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~%/".utf8)
    precondition(lines[1].first == UInt8(ascii: "/") && lines[1].allSatisfy(allowed.contains), "canonical URI has a raw byte")
    precondition(lines[2].allSatisfy { allowed.contains($0) || $0 == UInt8(ascii: "=") || $0 == UInt8(ascii: "&") }, "canonical query has a raw byte")
    let reversed = field(3).split(separator: "&", omittingEmptySubsequences: false).reversed().joined(separator: "&")
    let again = SigV4.canonicalRequest(method: "POST", path: field(2), query: reversed, signedHeaders: ["host", "x-amz-date"],
                                       values: { _ in headers }, payloadHash: PayloadHashes.empty)
    precondition(again == canonical, "the canonical query depends on the order of its pairs")
}

enum PayloadHashes { static let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" }

@main
struct Fuzz {
    static func main() { FuzzReplay.main(fuzzOne) }
}
