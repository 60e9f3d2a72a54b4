/// AWS Signature Version 4, the parts that are text: the `Authorization` header, `X-Amz-Date` and the
/// canonical request, built exactly as botocore builds it (auth.py: `SigV4Auth.canonical_request`) so the
/// same bytes come out on both ends. No cryptography here: hashing, HMAC and the signing key are
/// CubicleAuth's, so this parser can be fuzzed without them.
public enum SigV4 {
    public static let algorithm = "AWS4-HMAC-SHA256"
    /// How far a request's date may be from ours, either way (AWS's window).
    public static let maxSkewSeconds = 300

    /// `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders=a;b, Signature=HEX`.
    public struct Authorization: Equatable, Sendable {
        public var accessKeyID: String
        /// yyyyMMdd, as in the credential scope.
        public var date: String
        public var region: String
        public var service: String
        /// Lowercased, in the order the client listed them (the canonical request uses that order).
        public var signedHeaders: [String]
        /// The 32 bytes the hex signature stands for.
        public var signature: [UInt8]

        public var scope: String { "\(date)/\(region)/\(service)/aws4_request" }
    }

    /// Parses the header; anything missing or malformed is IncompleteSignatureException, as AWS answers.
    public static func parseAuthorization(_ value: String) throws(AgentCoreError) -> Authorization {
        guard value.utf8.count <= 8192 else { throw incomplete("Authorization header is too long") }
        guard value.hasPrefix(algorithm + " ") else {
            throw incomplete("Authorization header must start with \(algorithm) (only Signature Version 4 is accepted)")
        }
        // Bytes, not Characters: this runs for every signed request, on the event loop (a String-based
        // version was a quarter of cubicled's CPU in a warm signed invoke, perf).
        let u = Array(value.utf8)
        var credential: Range<Int>?, signedHeaders: Range<Int>?, signature: Range<Int>?
        var i = algorithm.utf8.count + 1
        while i <= u.count {
            var end = i
            while end < u.count, u[end] != UInt8(ascii: ",") { end += 1 }
            var a = i, b = end
            while a < b, u[a] == 0x20 { a += 1 }
            while b > a, u[b - 1] == 0x20 { b -= 1 }
            i = end + 1
            if a == b { continue }
            guard let eq = u[a..<b].firstIndex(of: UInt8(ascii: "=")) else { throw incomplete("Authorization header component is not NAME=VALUE") }
            let name = u[a..<eq], text = (eq + 1)..<b
            if name.elementsEqual("Credential".utf8) {
                guard credential == nil else { throw incomplete("Credential is given twice") }
                credential = text
            } else if name.elementsEqual("SignedHeaders".utf8) {
                guard signedHeaders == nil else { throw incomplete("SignedHeaders is given twice") }
                signedHeaders = text
            } else if name.elementsEqual("Signature".utf8) {
                guard signature == nil else { throw incomplete("Signature is given twice") }
                signature = text
            } else {
                throw incomplete("Authorization header has an unknown component")
            }
        }
        var missing: [String] = []
        if credential == nil { missing.append("Authorization header requires 'Credential' parameter.") }
        if signature == nil { missing.append("Authorization header requires 'Signature' parameter.") }
        if signedHeaders == nil { missing.append("Authorization header requires 'SignedHeaders' parameter.") }
        guard missing.isEmpty, let credential, let signedHeaders, let signature else { throw incomplete(missing.joined(separator: " ")) }

        let scope = split(u, credential, UInt8(ascii: "/"))
        guard scope.count == 5, !scope[0].isEmpty, scope[0].count <= 128 else {
            throw incomplete("Credential must be ACCESS_KEY_ID/DATE/REGION/SERVICE/aws4_request")
        }
        guard u[scope[4]].elementsEqual("aws4_request".utf8) else {
            throw AgentCoreError(.invalidSignature, "Credential should be scoped with a valid terminator: 'aws4_request', not '\(String(decoding: u[scope[4]].prefix(64), as: UTF8.self))'.")
        }
        guard scope[1].count == 8, u[scope[1]].allSatisfy(isDigit) else { throw incomplete("Credential's date must be yyyyMMdd") }
        guard u[scope[0]].allSatisfy({ isAlphanumeric($0) }) else { throw incomplete("Credential's access key id must be letters and digits") }

        let headerRanges = split(u, signedHeaders, UInt8(ascii: ";"))
        guard headerRanges.count <= 64, headerRanges.allSatisfy({ !$0.isEmpty && u[$0].allSatisfy(isLowerTokenByte) }) else {
            throw incomplete("SignedHeaders must be lowercase header names separated by ';'")
        }
        let headers = headerRanges.map { String(decoding: u[$0], as: UTF8.self) }
        guard headers.contains("host") else {
            throw incomplete("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
        }
        guard signature.count == 64, let bytes = Hex.decode(u[signature]) else { throw incomplete("Signature must be 64 hex digits") }
        func text(_ r: Range<Int>) -> String { String(decoding: u[r], as: UTF8.self) }
        return Authorization(accessKeyID: text(scope[0]), date: text(scope[1]), region: text(scope[2]), service: text(scope[3]),
                             signedHeaders: headers, signature: bytes)
    }

    /// A presigned URL's signature: the `X-Amz-*` query parameters botocore's `SigV4QueryAuth` adds.
    public struct Presigned: Equatable, Sendable {
        public var authorization: Authorization
        public var amzDate: String
        /// Seconds from `amzDate` the URL is good for (1 to 604800, AWS's range).
        public var expires: Int
        public var securityToken: String?
        /// The query as it came without `X-Amz-Signature`: what the canonical request covers.
        public var signedQuery: String
    }

    /// The query's presigned signature; nil when it has no `X-Amz-Signature` (not presigned). What is
    /// missing or malformed is IncompleteSignatureException, as for the header.
    public static func parsePresigned(query: String) throws(AgentCoreError) -> Presigned? {
        guard query.utf8.count <= 16384 else { return nil }
        var params: [String: String] = [:]
        var kept: [Substring] = []
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let key = PercentEncoding.decode(String(kv[0])) ?? ""
            if key.hasPrefix("X-Amz-") {
                guard params[key] == nil else { throw incomplete("\(key) is given twice") }
                params[key] = kv.count > 1 ? (PercentEncoding.decode(String(kv[1])) ?? "") : ""
            }
            if key != "X-Amz-Signature" { kept.append(pair) }
        }
        guard let signature = params["X-Amz-Signature"] else { return nil }
        guard params["X-Amz-Algorithm"] == algorithm else { throw incomplete("X-Amz-Algorithm must be \(algorithm)") }
        guard let credential = params["X-Amz-Credential"], let signedHeaders = params["X-Amz-SignedHeaders"],
              let amzDate = params["X-Amz-Date"], let expiresText = params["X-Amz-Expires"] else {
            throw incomplete("A presigned URL needs X-Amz-Credential, X-Amz-Date, X-Amz-Expires, X-Amz-SignedHeaders and X-Amz-Signature")
        }
        guard let expires = Int(expiresText), (1...604_800).contains(expires) else {
            throw incomplete("X-Amz-Expires must be a number of seconds from 1 to 604800")
        }
        for field in [credential, signedHeaders, signature] where field.utf8.contains(where: { $0 == UInt8(ascii: ",") || $0 == 0x20 }) {
            throw incomplete("X-Amz-Credential, X-Amz-SignedHeaders and X-Amz-Signature cannot hold ',' or spaces")
        }
        let authorization = try parseAuthorization("\(algorithm) Credential=\(credential), SignedHeaders=\(signedHeaders), Signature=\(signature)")
        return Presigned(authorization: authorization, amzDate: amzDate, expires: expires, securityToken: params["X-Amz-Security-Token"],
                         signedQuery: kept.joined(separator: "&"))
    }

    /// The ranges of `u[range]` between separators, empty ones kept.
    static func split(_ u: [UInt8], _ range: Range<Int>, _ separator: UInt8) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var start = range.lowerBound
        for i in range where u[i] == separator {
            out.append(start..<i)
            start = i + 1
        }
        out.append(start..<range.upperBound)
        return out
    }

    static func incomplete(_ message: String) -> AgentCoreError { AgentCoreError(.incompleteSignature, message) }

    /// `X-Amz-Date` (yyyyMMdd'T'HHmmss'Z') as seconds since the epoch; nil if it is not one.
    public static func parseDate(_ text: String) -> Int? {
        let u = Array(text.utf8)
        guard u.count == 16, u[8] == UInt8(ascii: "T"), u[15] == UInt8(ascii: "Z") else { return nil }
        func number(_ range: Range<Int>) -> Int? {
            var n = 0
            for i in range { guard isDigit(u[i]) else { return nil }; n = n * 10 + Int(u[i] - 0x30) }
            return n
        }
        guard let y = number(0..<4), let mo = number(4..<6), let d = number(6..<8), let h = number(9..<11),
              let mi = number(11..<13), let s = number(13..<15),
              (1970...9999).contains(y), (1...12).contains(mo), d >= 1, d <= daysIn(y, mo), h < 24, mi < 60, s < 60 else { return nil }
        return daysFromCivil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s
    }

    static func daysIn(_ y: Int, _ m: Int) -> Int {
        switch m {
        case 2: (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: 30
        default: 31
        }
    }

    /// The same form, for messages.
    public static func formatDate(_ seconds: Int) -> String {
        let days = seconds >= 0 ? seconds / 86_400 : (seconds - 86_399) / 86_400
        let rest = seconds - days * 86_400
        let (y, m, d) = civilFromDays(days)
        func two(_ n: Int) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(y)\(two(m))\(two(d))T\(two(rest / 3600))\(two(rest / 60 % 60))\(two(rest % 60))Z"
    }

    // Howard Hinnant's days-from-civil and its inverse: proleptic Gregorian, no calendar library needed.
    static func daysFromCivil(_ y0: Int, _ m: Int, _ d: Int) -> Int {
        let y = m <= 2 ? y0 - 1 : y0
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    static func civilFromDays(_ z0: Int) -> (Int, Int, Int) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }

    /// The canonical request's bytes: method, canonical URI, canonical query, canonical headers, the signed
    /// header list and the payload's hash, joined by newlines.
    /// - Parameters:
    ///   - path: the request target's path as it came, still percent-encoded.
    ///   - query: the raw query string, without `?`.
    ///   - values: every value of a header, by lowercased name, in the order they came (`host` included).
    public static func canonicalRequest(method: String, path: String, query: String, signedHeaders: [String],
                                        values: (String) -> [String], payloadHash: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(512)
        out += method.utf8
        out.append(0x0A)
        canonicalURI(path, into: &out)
        out.append(0x0A)
        canonicalQuery(query, into: &out)
        out.append(0x0A)
        for name in signedHeaders {
            out += name.utf8
            out.append(UInt8(ascii: ":"))
            var first = true
            for value in values(name) {
                if !first { out.append(UInt8(ascii: ",")) }
                first = false
                trimAll(value, into: &out)
            }
            out.append(0x0A)
        }
        out.append(0x0A)
        for (i, name) in signedHeaders.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ";")) }
            out += name.utf8
        }
        out.append(0x0A)
        out += payloadHash.utf8
        return out
    }

    /// The path with dot segments and empty segments removed (botocore's `remove_dot_segments`), then
    /// percent-encoded again with `/` kept: a path that came encoded is encoded twice, as AWS does for every
    /// service but S3. Bytes throughout: this and the query are most of a verification's work.
    static func canonicalURI(_ path: String, into out: inout [UInt8]) {
        let u = Array(path.utf8)
        var segments: [Range<Int>] = []
        var i = 0
        while i < u.count {
            var end = i
            while end < u.count, u[end] != UInt8(ascii: "/") { end += 1 }
            let length = end - i
            if length == 1, u[i] == UInt8(ascii: ".") {
            } else if length == 2, u[i] == UInt8(ascii: "."), u[i + 1] == UInt8(ascii: ".") {
                _ = segments.popLast()
            } else if length > 0 {
                segments.append(i..<end)
            }
            i = end + 1
        }
        out.append(UInt8(ascii: "/"))
        for (n, segment) in segments.enumerated() {
            if n > 0 { out.append(UInt8(ascii: "/")) }
            encode(u[segment], into: &out)
        }
        if u.last == UInt8(ascii: "/"), !segments.isEmpty { out.append(UInt8(ascii: "/")) }
    }

    /// Pairs decoded and encoded again, sorted by key then value, so the order and encoding a client chose
    /// do not matter.
    static func canonicalQuery(_ query: String, into out: inout [UInt8]) {
        guard !query.isEmpty else { return }
        let u = Array(query.utf8)
        var pairs: [([UInt8], [UInt8])] = []
        var i = 0
        while i < u.count {
            var end = i
            while end < u.count, u[end] != UInt8(ascii: "&") { end += 1 }
            if end > i {
                var eq = i
                while eq < end, u[eq] != UInt8(ascii: "=") { eq += 1 }
                var k: [UInt8] = [], v: [UInt8] = []
                encode(decode(u[i..<eq])[...], into: &k)
                if eq < end { encode(decode(u[(eq + 1)..<end])[...], into: &v) }
                pairs.append((k, v))
            }
            i = end + 1
        }
        if pairs.count > 1 {
            pairs.sort { $0.0 == $1.0 ? $0.1.lexicographicallyPrecedes($1.1) : $0.0.lexicographicallyPrecedes($1.0) }
        }
        for (n, (k, v)) in pairs.enumerated() {
            if n > 0 { out.append(UInt8(ascii: "&")) }
            out += k
            out.append(UInt8(ascii: "="))
            out += v
        }
    }

    /// Leading and trailing whitespace dropped and runs of it made one space (botocore: `' '.join(v.split())`).
    static func trimAll(_ value: String, into out: inout [UInt8]) {
        var pendingSpace = false, any = false
        for b in value.utf8 {
            if b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D || b == 0x0B || b == 0x0C {
                pendingSpace = any
                continue
            }
            if pendingSpace { out.append(0x20); pendingSpace = false }
            out.append(b)
            any = true
        }
    }

    /// Lenient percent-decoding: a `%` not followed by two hex digits stays as it is.
    static func decode(_ u: ArraySlice<UInt8>) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(u.count)
        var i = u.startIndex
        while i < u.endIndex {
            if u[i] == UInt8(ascii: "%"), i + 2 < u.endIndex, let h = Hex.value(u[i + 1]), let l = Hex.value(u[i + 2]) {
                out.append(h << 4 | l)
                i += 3
            } else {
                out.append(u[i])
                i += 1
            }
        }
        return out
    }

    /// RFC 3986 unreserved characters stay; every other byte becomes %XX (upper-case hex).
    static func encode(_ bytes: ArraySlice<UInt8>, into out: inout [UInt8]) {
        out.reserveCapacity(out.count + bytes.count + 8)
        for b in bytes {
            if unreserved[Int(b)] {
                out.append(b)
            } else {
                out.append(UInt8(ascii: "%"))
                out.append(upperHex[Int(b >> 4)])
                out.append(upperHex[Int(b & 15)])
            }
        }
    }

    static let upperHex: [UInt8] = Array("0123456789ABCDEF".utf8)
    static let unreserved: [Bool] = (0..<256).map { b in
        let c = UInt8(b)
        return isAlphanumeric(c) || c == UInt8(ascii: "-") || c == UInt8(ascii: "_") || c == UInt8(ascii: ".") || c == UInt8(ascii: "~")
    }

    static func isDigit(_ b: UInt8) -> Bool { b >= 0x30 && b <= 0x39 }
    static func isAlphanumeric(_ b: UInt8) -> Bool { isDigit(b) || (b | 0x20 >= 0x61 && b | 0x20 <= 0x7A) }
    static func isLowerTokenByte(_ b: UInt8) -> Bool {
        isDigit(b) || (b >= 0x61 && b <= 0x7A) || b == UInt8(ascii: "-") || b == UInt8(ascii: "_") || b == UInt8(ascii: ".")
    }

    /// Lowercase hex, both ways.
    public enum Hex {
        public static func value(_ b: UInt8) -> UInt8? {
            switch b {
            case 0x30...0x39: b - 0x30
            case 0x61...0x66: b - 0x61 + 10
            case 0x41...0x46: b - 0x41 + 10
            default: nil
            }
        }

        public static func decode<S: StringProtocol>(_ text: S) -> [UInt8]? { decode(Array(text.utf8)[...]) }

        public static func decode(_ u: ArraySlice<UInt8>) -> [UInt8]? {
            guard u.count % 2 == 0 else { return nil }
            var out: [UInt8] = []
            out.reserveCapacity(u.count / 2)
            var i = u.startIndex
            while i < u.endIndex {
                guard let h = value(u[i]), let l = value(u[i + 1]) else { return nil }
                out.append(h << 4 | l)
                i += 2
            }
            return out
        }

        public static func encode(_ bytes: UnsafeRawBufferPointer) -> String {
            String(unsafeUninitializedCapacity: bytes.count * 2) { out in
                for (i, b) in bytes.enumerated() {
                    out[2 * i] = lowerHex[Int(b >> 4)]
                    out[2 * i + 1] = lowerHex[Int(b & 15)]
                }
                return bytes.count * 2
            }
        }

        public static func encode(_ bytes: [UInt8]) -> String { bytes.withUnsafeBytes { encode($0) } }

        /// Lowercase hex of `bytes` appended to `out`, without a String between.
        public static func append(_ bytes: UnsafeRawBufferPointer, to out: inout [UInt8]) {
            for b in bytes {
                out.append(lowerHex[Int(b >> 4)])
                out.append(lowerHex[Int(b & 15)])
            }
        }

        static let lowerHex: [UInt8] = Array("0123456789abcdef".utf8)
    }
}
