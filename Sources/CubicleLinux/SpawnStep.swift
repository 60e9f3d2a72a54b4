/// Names for the C shim's `enum cubicle_step`, the step a child failed at before exec. One table for
/// host and init, so an error names the same step wherever it is reported.
public enum SpawnStep {
    static let names: [Int32: String] = [
        1: "pipe", 2: "clone", 3: "wait for the parent", 4: "unshare cgroup namespace", 5: "setgroups",
        6: "setresgid", 7: "setresuid", 8: "pass descriptors", 9: "setsid", 10: "chdir", 11: "setrlimit",
        12: "drop bounding set", 13: "clear capabilities", 14: "no_new_privs", 15: "seccomp", 16: "exec",
        17: "death signal", 18: "open bind source", 19: "prepare the child", 20: "enter the network namespace", 21: "join the cgroup",
        22: "reset the OOM score", 23: "own the user namespace as the session's host uid", 24: "take the terminal",
    ]

    public static func name(_ step: Int32) -> String { names[step] ?? "step \(step)" }
}
