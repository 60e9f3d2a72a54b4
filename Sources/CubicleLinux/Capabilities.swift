/// This process's effective capabilities, as the kernel reports them in /proc/self/status.
public enum Capabilities {
    public static let sysResource = 24

    /// Whether the effective set holds `capability` (a CAP_* number); false when it cannot be read.
    public static func effective(_ capability: Int) -> Bool {
        guard let status = try? Files.read("/proc/self/status"),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("CapEff:") }),
              let mask = line.split(separator: "\t").last.flatMap({ UInt64($0, radix: 16) }) else { return false }
        return mask & (1 << UInt64(capability)) != 0
    }
}
