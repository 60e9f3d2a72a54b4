import CubicleJSON

/// Left-aligned columns separated by two spaces, as `docker ps` prints them.
public struct Table {
    public var header: [String]
    public var rows: [[String]] = []

    public init(_ header: [String]) { self.header = header }

    public func render(width: Int? = nil) -> String {
        let all = [header] + rows
        var widths = [Int](repeating: 0, count: header.count)
        for row in all { for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) } }
        return all.map { row in
            var line = ""
            for (i, cell) in row.enumerated() where i < widths.count {
                line += i == row.count - 1 ? cell : cell + String(repeating: " ", count: widths[i] - cell.count + 2)
            }
            if let width, line.count > width { line = String(line.prefix(width)) }
            return line
        }.joined(separator: "\n") + "\n"
    }
}

public enum Format {
    public static func bytes(_ n: Int64?) -> String {
        guard let n else { return "-" }
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n), unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(n)B" : "\(oneDecimal(value))\(units[unit])"
    }

    public static func duration(_ seconds: Double) -> String {
        let s = Int(seconds.rounded(.down))
        if s < 60 { return "\(s)s" }
        if s < 3600 { return "\(s / 60)m\(s % 60)s" }
        return "\(s / 3600)h\(s % 3600 / 60)m"
    }

    public static func oneDecimal(_ x: Double) -> String {
        let tenths = Int((x * 10).rounded())
        return "\(tenths / 10).\(abs(tenths % 10))"
    }

    /// Session ids are long (33+ characters); tables show the first 12, which `inspect` and friends accept.
    public static func shortID(_ id: String) -> String { id.count > 12 ? String(id.prefix(12)) : id }
}

/// Cells of a session row, each typed on its own line so the type checker has it easy.
struct SessionCells {
    let json: JSON

    var id: String { Format.shortID(json["id"]?.stringValue ?? "?") }
    var runtime: String { json["runtime"]?.stringValue ?? "?" }
    var state: String { json["state"]?.stringValue ?? "?" }
    var created: Double { Double(json["created"]?.intValue ?? 0) }
    var idle: String {
        guard let s = json["idleSeconds"]?.doubleValue else { return "-" }
        return Format.duration(s)
    }
    var memory: String { Format.bytes(json["usage"]?["memoryBytes"]?.intValue) }
    var pids: String {
        guard let n = json["usage"]?["pids"]?.intValue else { return "-" }
        return String(n)
    }
    var invocations: String { String(json["invocations"]?.intValue ?? 0) }
    var cpuSeconds: Double { json["usage"]?["cpuSeconds"]?.doubleValue ?? 0 }
    func age(now: Double) -> String {
        let end: Double = json["ended"]?.intValue.map { Double($0) } ?? now
        return Format.duration(max(0, end - created))
    }
}

/// `cubicle ps` rows.
public enum SessionTable {
    /// `warm`: warm-pool sandboxes, shown after the sessions with "-" for a session id.
    public static func render(_ sessions: [JSON], warm: [JSON] = [], now: Double, all: Bool) -> String {
        var t = Table(["SESSION", "RUNTIME", "OWNER", "STATE", "AGE", "IDLE", "MEMORY", "PIDS", "INVOCATIONS"] + (all ? ["END REASON"] : []))
        for s in sessions + warm {
            let c = SessionCells(json: s)
            let id = c.state == "warm" ? "-" : c.id
            let owner = c.state == "warm" ? "-" : (s["owner"]?.stringValue ?? "-")
            var row: [String] = [id, c.runtime, owner, c.state, c.age(now: now), c.idle, c.memory, c.pids, c.invocations]
            if all { row.append(s["endReason"]?.stringValue ?? "-") }
            t.rows.append(row)
        }
        return t.render()
    }
}

/// One frame of `cubicle top`. CPU % is the CPU time used between two samples over the wall time between
/// them, so the first frame shows "-" for it.
public struct TopScreen {
    public struct Sample {
        public var cpuSeconds: Double
        public var time: Double
    }

    public private(set) var previous: [String: Sample] = [:]

    public init() {}

    public mutating func render(_ sessions: [JSON], now: Double, width: Int = 120) -> String {
        var t = Table(["SESSION", "RUNTIME", "STATE", "AGE", "IDLE", "CPU %", "MEMORY", "PIDS", "INVOCATIONS"])
        var next: [String: Sample] = [:]
        for s in sessions {
            let c = SessionCells(json: s)
            let id = s["id"]?.stringValue ?? "?"
            let cpu = c.cpuSeconds
            var percent = "-"
            if let p = previous[id], now > p.time {
                percent = Format.oneDecimal(max(0, cpu - p.cpuSeconds) / (now - p.time) * 100)
            }
            next[id] = Sample(cpuSeconds: cpu, time: now)
            let row: [String] = [c.id, c.runtime, c.state, c.age(now: now), c.idle, percent, c.memory, c.pids, c.invocations]
            t.rows.append(row)
        }
        previous = next
        let title = "cubicle top — \(sessions.count) live session\(sessions.count == 1 ? "" : "s")   (q or Ctrl-C quits)\n\n"
        return title + t.render(width: width)
    }
}

/// Single-quotes each word for `sh -c`, so `cubicle exec ID -- CMD ARGS...` runs exactly those words.
public enum ShellQuote {
    public static func join(_ words: [String]) -> String { words.map(quote).joined(separator: " ") }

    public static func quote(_ word: String) -> String {
        if !word.isEmpty, word.utf8.allSatisfy(isSafe) { return word }
        return "'" + word.replacing("'", with: "'\\''") + "'"
    }

    private static func isSafe(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"): true
        case UInt8(ascii: "-"), UInt8(ascii: "_"), UInt8(ascii: "."), UInt8(ascii: "/"), UInt8(ascii: ":"), UInt8(ascii: "="),
             UInt8(ascii: ","), UInt8(ascii: "+"), UInt8(ascii: "@"): true
        default: false
        }
    }
}
