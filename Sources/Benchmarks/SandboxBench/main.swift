// Sandbox spawn-to-ready, teardown and idle init memory, beside bubblewrap in the same run.
//   cubicle-sandbox-bench demo  REPO PRODUCTS         one sandbox: run a command inside, tear it down
//   cubicle-sandbox-bench bench REPO PRODUCTS [N [SAMPLES]]
//                                                    N spawns and teardowns, then bwrap N times; with SAMPLES,
//                                                    each run's nanoseconds go to SAMPLES/<measure>.txt
//   cubicle-sandbox-bench peer N OUT ARGV...          ARGV spawned and waited for N times (after 5 warm-ups),
//                                                    each run's nanoseconds to OUT, exit statuses checked
//   cubicle-sandbox-bench image REPO PRODUCTS N LAYOUT OUT
//                                                    the OCI layout's image pulled into a store of its own, then
//                                                    N sandboxes with a host root and N with the image's root,
//                                                    alternating; spawn-to-ready nanoseconds to OUT/{host,image}-spawn.txt
import CubicleImages
import CubicleLinux
import CubicleRPC
import CubicleSandbox
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

let args = CommandLine.arguments

/// Spawn to exit of a command, the way every peer is timed (bwrap here; unshare, crun and runc through `peer`).
func timeRun(_ argv: [String]) -> (UInt64, Int32) {
    let start = DispatchTime.now().uptimeNanoseconds
    var pid: pid_t = 0
    let cargs = argv.map { strdup($0) } + [nil]
    let rc = posix_spawnp(&pid, argv[0], nil, nil, cargs, environ)
    cargs.forEach { free($0) }
    guard rc == 0 else { return (0, -rc) }
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    return (DispatchTime.now().uptimeNanoseconds - start, status)
}

func writeSamples(_ xs: [UInt64], to path: String) {
    try? Files.writeAtomically(path, xs.map(String.init).joined(separator: "\n") + "\n")
}

if args.count >= 5, args[1] == "peer", let n = Int(args[2]) {
    let argv = Array(args[4...])
    var samples: [UInt64] = []
    for i in 0..<(n + 5) {
        let (ns, status) = timeRun(argv)
        guard status == 0 else {
            print("\(argv.joined(separator: " ")): exit status \(status)")
            exit(1)
        }
        if i >= 5 { samples.append(ns) }
    }
    writeSamples(samples, to: args[3])
    exit(0)
}

if args.count >= 7, args[1] == "image", let n = Int(args[4]) {
    let (repo, products, layout, out) = (args[2], args[3], args[5], args[6])
    let work = "/tmp/cubicle-bench-image-\(getpid())"
    let store = try ImageStore(root: work + "/store")
    let image = try await ImagePuller(store: store).pull("v1", as: "bench", from: OCILayoutSource(directory: layout))
    var host = SandboxHostConfig(initPath: products + "/cubicle-init", stateDirectory: work + "/state", cgroupParent: "cubicle-bench-image-\(getpid())")
    host.networkNamespacePool = 4
    let launcher = SandboxLauncher(host: host)
    if let server = launcher.forkServer { _ = server.start() }
    var spec = SandboxSpec(seccompProgram: try SeccompProfile.load(path: repo + "/sandbox/seccomp/default.json").compile())
    spec.limits = CgroupLimits(memoryBytes: 256 << 20, cpuQuotaMicros: 100_000, pids: 128)
    var imageSpec = spec
    imageSpec.imageLayers = image.layers.map { store.layerPath($0) }
    var samples: [String: [UInt64]] = ["host": [], "image": []]
    for i in 0..<(n + 5) {
        for (kind, s) in [("host", spec), ("image", imageSpec)] {
            let sb = try await launcher.launch(s)
            if i >= 5 { samples[kind]!.append(sb.spawnNanoseconds) }
            _ = await sb.teardown()
        }
    }
    launcher.shutdown()
    for d in Cgroup(version: host.cgroupVersion, root: host.cgroupRoot, path: host.cgroupParent).directories { rmdir(d) }
    try? Files.removeTree(work)
    try Files.makeDirectories(out, mode: 0o755)
    for (kind, xs) in samples { writeSamples(xs, to: "\(out)/\(kind)-spawn.txt") }
    exit(0)
}

guard args.count >= 4, ["demo", "bench"].contains(args[1]) else {
    print("usage: cubicle-sandbox-bench demo|bench REPO PRODUCTS [N [SAMPLES]] | peer N OUT ARGV...")
    exit(2)
}
let mode = args[1], repo = args[2], products = args[3]
let iterations = args.count > 4 ? Int(args[4]) ?? 200 : 200
let samplesDirectory = args.count > 5 ? args[5] : nil
let program = try SeccompProfile.load(path: repo + "/sandbox/seccomp/default.json").compile()
let tag = "\(getpid())"
let host = { () -> SandboxHostConfig in
    var host = SandboxHostConfig(initPath: products + "/cubicle-init", stateDirectory: "/tmp/cubicle-bench-\(tag)", cgroupParent: "cubicle-bench-\(tag)")
    // As cubicled runs by default (`networkNamespacePool: 4`); CUBICLE_NETNS_POOL=0 shows clone making its own.
    host.networkNamespacePool = Int(getenv("CUBICLE_NETNS_POOL").map { String(cString: $0) } ?? "") ?? 4
    return host
}()
let launcher = SandboxLauncher(host: host)
let spec = SandboxSpec(seccompProgram: program)

func removeParent() {
    launcher.shutdown()
    for d in Cgroup(version: host.cgroupVersion, root: host.cgroupRoot, path: host.cgroupParent).directories { rmdir(d) }
    try? Files.removeTree(host.stateDirectory)
}

/// A failed launch or command ends the run without leaving its parent cgroup and state directory behind
/// (a sandbox already made is torn down by its failure; an error thrown at top level would skip this).
func orExit<T>(_ body: () async throws -> T) async -> T {
    do {
        return try await body()
    } catch {
        print("cubicle-sandbox-bench: \(error)")
        removeParent()
        exit(1)
    }
}

if mode == "demo" {
    let sb = await orExit { try await launcher.launch(spec) }
    print("sandbox \(sb.id): init is host pid \(sb.initPID), ready in \(sb.spawnNanoseconds / 1000) us, host uids \(sb.uidRange.hostBase)..<\(sb.uidRange.hostBase + sb.uidRange.size)")
    let p = await orExit {
        try await sb.runCommand(ProcessParams(argv: ["/bin/sh", "-c", "id; hostname; grep -E 'CapEff|NoNewPrivs|Seccomp' /proc/self/status; ls /"], env: ["PATH=/usr/bin:/bin"]), timeoutSeconds: 10)
    }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 4096)
    while case let n = read(p.stdout, &buf, buf.count), n > 0 { out += buf[0..<n] }
    close(p.stdout); close(p.stderr)
    print(String(decoding: out, as: UTF8.self), terminator: "")
    _ = await sb.waitForCommand(pid: p.pid)
    let r = await sb.teardown()
    print("teardown in \(r.nanoseconds / 1000) us, leftovers: \(r.leftovers.isEmpty ? "none" : r.leftovers.joined(separator: ", "))")
    removeParent()
    exit(0)
}

func percentile(_ xs: [UInt64], _ p: Double) -> Double {
    let s = xs.sorted()
    return Double(s[min(s.count - 1, Int(Double(s.count - 1) * p))]) / 1e6
}

// Warm up caches (page cache for cubicle-init, libseccomp, dentries) before measuring either side.
for _ in 0..<5 { _ = await (await orExit { try await launcher.launch(spec) }).teardown() }
var spawn: [UInt64] = [], teardown: [UInt64] = []
var phases: [String: [UInt64]] = [:], phaseOrder: [String] = []
for _ in 0..<iterations {
    let sb = await orExit { try await launcher.launch(spec) }
    spawn.append(sb.spawnNanoseconds)
    for p in sb.spawnPhases {
        if phases[p.name] == nil { phaseOrder.append(p.name) }
        phases[p.name, default: []].append(p.nanoseconds)
    }
    teardown.append(await sb.teardown().nanoseconds)
}
// Idle init memory: what one more sandbox costs in init's pages. Two are started so that init's text, which
// every sandbox maps from the same file, shows as shared; the second one's private pages are its own cost.
let idle = [await orExit { try await launcher.launch(spec) }, await orExit { try await launcher.launch(spec) }]
try await Task.sleep(for: .milliseconds(200))
let rollup = (try? Files.read("/proc/\(idle[1].initPID)/smaps_rollup")) ?? ""
func kB(_ key: String) -> Double {
    rollup.split(separator: "\n").first { $0.hasPrefix(key + ":") }.flatMap { Double($0.split(separator: " ")[1]) } ?? 0
}
let privateMiB = (kB("Private_Clean") + kB("Private_Dirty")) / 1024
let rssMiB = kB("Rss") / 1024
for sb in idle { _ = await sb.teardown() }
removeParent()

// bubblewrap with the same isolation, timed from spawn to exit of /bin/true.
let bwrapArgs = ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr",
                 "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                 "--symlink", "usr/sbin", "/sbin", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true"]
var bwrap: [UInt64] = []
if access("/usr/bin/bwrap", X_OK) == 0 {
    for i in 0..<(iterations + 5) {
        let (ns, _) = timeRun(bwrapArgs)
        if i >= 5 { bwrap.append(ns) }
    }
}
if let dir = samplesDirectory {
    try Files.makeDirectories(dir, mode: 0o755)
    writeSamples(spawn, to: dir + "/cubicle-spawn.txt")
    writeSamples(teardown, to: dir + "/cubicle-teardown.txt")
    if !bwrap.isEmpty { writeSamples(bwrap, to: dir + "/bwrap.txt") }
}

var uts = utsname()
uname(&uts)
let kernel = withUnsafePointer(to: uts.release) { $0.withMemoryRebound(to: CChar.self, capacity: 65) { String(cString: $0) } }
print("## Sandbox lifecycle (\(iterations) runs, \(sysconf(Int32(_SC_NPROCESSORS_ONLN))) cores, kernel \(kernel), cgroup \(host.cgroupVersion.rawValue))")
print("")
print("| measure | p50 ms | p99 ms | peer | peer p50 ms | ratio p50 |")
print("|---|---|---|---|---|---|")
let bp50 = bwrap.isEmpty ? Double.nan : percentile(bwrap, 0.5)
func f(_ x: Double) -> String { x.isNaN ? "n/a" : String((x * 100).rounded() / 100) }
print("| spawn-to-ready | \(f(percentile(spawn, 0.5))) | \(f(percentile(spawn, 0.99))) | bwrap /bin/true | \(f(bp50)) | \(f(percentile(spawn, 0.5) / bp50))x |")
print("| teardown | \(f(percentile(teardown, 0.5))) | \(f(percentile(teardown, 0.99))) | | | |")
print("| idle cubicle-init private memory | \(f(privateMiB)) MiB | RSS \(f(rssMiB)) MiB | | | |")
print("")
print("Where spawn-to-ready goes (p50 of each step, ms): " + phaseOrder.map { "\($0) \(f(percentile(phases[$0]!, 0.5)))" }.joined(separator: "; ") + ".")
print("")
print("And its tail (p99 of each step, ms): " + phaseOrder.map { "\($0) \(f(percentile(phases[$0]!, 0.99)))" }.joined(separator: "; ") + ".")
