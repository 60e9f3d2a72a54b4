#if canImport(Glibc)
import Glibc
#endif
import CubicleJSON

/// The seed tutorial's agent without a model: weather, the time, arithmetic, and "add N to that",
/// which needs the previous result this process remembers. Deterministic by design.
struct Tutor {
    static let users = ["1": "Maira", "2": "Mani", "3": "Mark", "4": "Ishan", "5": "Dhawal"]

    var previous: Double?

    /// (answer, message) for one prompt; the answer is null when it cannot be given.
    mutating func answer(_ prompt: String, user: String?) -> (JSON, String) {
        let greeting = user.map { "\($0), " } ?? ""
        let lower = prompt.lowercased()
        if let n = Self.addition(in: prompt) {
            guard let p = previous else {
                return (.null, "\(greeting)there is no previous result in this session to add \(Self.format(n)) to.")
            }
            let sum = p + n
            previous = sum
            return (Self.number(sum), "\(greeting)\(Self.format(p)) + \(Self.format(n)) = \(Self.format(sum)).")
        }
        if prompt.contains("天気") || lower.contains("weather") {
            return ("sunny", "\(greeting)the weather is sunny.")
        }
        if let (expression, value) = Arithmetic.firstExpression(in: prompt) {
            previous = value
            return (Self.number(value), "\(greeting)\(expression) = \(Self.format(value)).")
        }
        if lower.contains("time") || prompt.contains("時間") || prompt.contains("時刻") || prompt.contains("何時") {
            let now = Self.now()
            return (.string(now), "\(greeting)it is \(now).")
        }
        return (.null, "\(greeting)I can tell the weather, the time, work out arithmetic such as 2+5, and add a number to the last result.")
    }

    /// "add 34 to that", "plus 10", 「34 を足す」: the number to add to the previous result.
    static func addition(in prompt: String) -> Double? {
        let lower = prompt.lowercased()
        let scalars = Array(lower.unicodeScalars)
        func number(after index: Int) -> Double? {
            var i = index
            while i < scalars.count && scalars[i] == " " { i += 1 }
            var digits = ""
            while i < scalars.count && (("0"..."9").contains(scalars[i]) || scalars[i] == ".") { digits.unicodeScalars.append(scalars[i]); i += 1 }
            return Double(digits)
        }
        for word in ["add ", "plus "] {
            if let r = lower.range(of: word), let n = number(after: lower.unicodeScalars.distance(from: lower.unicodeScalars.startIndex, to: r.upperBound)) {
                // "2 plus 5" is arithmetic, not an addition to the previous result.
                let before = lower[..<r.lowerBound].trimmingCharacters()
                if word == "plus " && before.last.map({ $0.isNumber }) == true { continue }
                return n
            }
        }
        if let r = lower.range(of: "を足") ?? lower.range(of: "足す") ?? lower.range(of: "足して") {
            // The number just before: 「34 を足す」.
            var digits = ""
            for ch in lower[..<r.lowerBound].reversed() {
                if ch == " " || ch == "　" { if digits.isEmpty { continue } else { break } }
                if ch.isNumber || ch == "." { digits.insert(ch, at: digits.startIndex) } else { break }
            }
            return Double(digits)
        }
        return nil
    }

    static func number(_ v: Double) -> JSON {
        v == v.rounded() && abs(v) < 9e15 ? .int(Int64(v)) : .double(v)
    }

    static func format(_ v: Double) -> String {
        v == v.rounded() && abs(v) < 9e15 ? String(Int64(v)) : String(v)
    }

    static func now() -> String {
        var t = time(nil)
        var parts = tm()
        localtime_r(&t, &parts)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%Y-%m-%d %H:%M:%S", &parts)
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension String {
    func range(of needle: String) -> Range<String.Index>? {
        guard !needle.isEmpty else { return nil }
        var i = startIndex
        while i < endIndex {
            if self[i...].hasPrefix(needle) { return i..<index(i, offsetBy: needle.count) }
            i = index(after: i)
        }
        return nil
    }
}

/// + - * / and parentheses over decimal numbers, with the usual precedence.
enum Arithmetic {
    /// The first run of expression characters that holds an operator between numbers, and its value.
    static func firstExpression(in text: String) -> (String, Double)? {
        let allowed = Set("0123456789.+-*/×÷() ")
        var current = ""
        var candidates: [String] = []
        for ch in text {
            if allowed.contains(ch) { current.append(ch) } else { candidates.append(current); current = "" }
        }
        candidates.append(current)
        for c in candidates {
            let e = c.trimmingCharacters()
            guard e.contains(where: { "+-*/×÷".contains($0) }), e.contains(where: \.isNumber) else { continue }
            if let v = evaluate(e) { return (e, v) }
        }
        return nil
    }

    static func evaluate(_ text: String) -> Double? {
        var tokens = Array(text.replacing("×", with: "*").replacing("÷", with: "/").filter { $0 != " " })
        var i = 0
        func peek() -> Character? { i < tokens.count ? tokens[i] : nil }
        func primary() -> Double? {
            if peek() == "(" { i += 1; let v = sum(); guard peek() == ")" else { return nil }; i += 1; return v }
            if peek() == "-" { i += 1; return primary().map { -$0 } }
            var s = ""
            while let c = peek(), c.isNumber || c == "." { s.append(c); i += 1 }
            return Double(s)
        }
        func product() -> Double? {
            guard var v = primary() else { return nil }
            while let op = peek(), op == "*" || op == "/" {
                i += 1
                guard let r = primary() else { return nil }
                if op == "/" { guard r != 0 else { return nil }; v /= r } else { v *= r }
            }
            return v
        }
        func sum() -> Double? {
            guard var v = product() else { return nil }
            while let op = peek(), op == "+" || op == "-" {
                i += 1
                guard let r = product() else { return nil }
                v = op == "+" ? v + r : v - r
            }
            return v
        }
        let v = sum()
        tokens = []
        return i == text.replacing("×", with: "*").filter({ $0 != " " }).count ? v : nil
    }
}
