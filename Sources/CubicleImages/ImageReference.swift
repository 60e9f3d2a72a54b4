/// `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`, as a runtime's `containerUri` names an image, read the way
/// Docker and containerd read it: no registry means Docker Hub (`docker.io`, `library/` for a bare name),
/// no tag and no digest means `latest`.
public struct ImageReference: Hashable, Sendable, CustomStringConvertible {
    public var registry: String
    public var repository: String
    public var tag: String?
    public var digest: Digest?

    public enum Failure: Error, Equatable, CustomStringConvertible, Sendable {
        case invalid(String, String)
        public var description: String {
            switch self { case .invalid(let text, let why): return "\(text) is not an image reference: \(why)" }
        }
    }

    public init(_ text: String) throws(Failure) {
        guard !text.isEmpty, text.utf8.count <= 4096, text.unicodeScalars.allSatisfy({ $0.isASCII && $0.value > 0x20 }) else {
            throw .invalid(text, "empty, too long, or not printable ASCII")
        }
        var rest = Substring(text)
        if let at = rest.firstIndex(of: "@") {
            do { digest = try Digest(String(rest[rest.index(after: at)...])) } catch { throw .invalid(text, "\(error)") }
            rest = rest[..<at]
        }
        // A tag is after the last ':' that comes after the last '/' (a registry's port is before a '/').
        if let colon = rest.lastIndex(of: ":"), !rest[colon...].contains("/") {
            let t = String(rest[rest.index(after: colon)...])
            guard Self.isTag(t) else { throw .invalid(text, "tag \(t) must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}") }
            tag = t
            rest = rest[..<colon]
        }
        let parts = rest.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard !parts.isEmpty, !parts.contains(where: \.isEmpty) else { throw .invalid(text, "empty path component") }
        // The first component is a registry when it looks like a host: a dot, a port or `localhost`.
        if parts.count > 1, parts[0].contains(".") || parts[0].contains(":") || parts[0] == "localhost" {
            registry = parts[0]
            repository = parts.dropFirst().joined(separator: "/")
        } else {
            registry = "docker.io"
            repository = parts.count == 1 ? "library/" + parts[0] : parts.joined(separator: "/")
        }
        guard Self.isHost(registry) else { throw .invalid(text, "registry \(registry) is not HOST[:PORT]") }
        guard repository.split(separator: "/").allSatisfy(Self.isPathComponent), repository.utf8.count <= 255 else {
            throw .invalid(text, "repository \(repository) must be lowercase components of [a-z0-9] joined by . _ __ or -")
        }
        if tag == nil && digest == nil { tag = "latest" }
    }

    /// What the registry's manifest endpoint is asked for: the digest when pinned, else the tag.
    public var manifestReference: String { digest?.description ?? tag ?? "latest" }

    public var description: String {
        "\(registry)/\(repository)" + (tag.map { ":" + $0 } ?? "") + (digest.map { "@" + $0.description } ?? "")
    }

    static func isTag(_ t: String) -> Bool {
        guard let first = t.utf8.first, t.utf8.count <= 128, isAlnum(first) || first == UInt8(ascii: "_") else { return false }
        return t.utf8.allSatisfy { isAlnum($0) || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }
    }

    static func isPathComponent(_ c: Substring) -> Bool {
        // [a-z0-9]+ ((\.|_|__|-+)[a-z0-9]+)*
        let u = Array(c.utf8)
        guard let f = u.first, let l = u.last, isLowerAlnum(f), isLowerAlnum(l) else { return false }
        var i = 0
        while i < u.count {
            if isLowerAlnum(u[i]) { i += 1; continue }
            let start = i
            while i < u.count, !isLowerAlnum(u[i]) { i += 1 }
            let sep = String(decoding: u[start..<i], as: UTF8.self)
            guard sep == "." || sep == "_" || sep == "__" || sep.allSatisfy({ $0 == "-" }) else { return false }
        }
        return true
    }

    static func isHost(_ h: String) -> Bool {
        let parts = h.split(separator: ":", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), !parts[0].isEmpty, parts[0].utf8.allSatisfy({ isAlnum($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") }) else { return false }
        if parts.count == 2 { guard let p = Int(parts[1]), (1...65535).contains(p) else { return false } }
        return true
    }

    static func isAlnum(_ c: UInt8) -> Bool { isLowerAlnum(c) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(c) }
    static func isLowerAlnum(_ c: UInt8) -> Bool { (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(c) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) }
}
