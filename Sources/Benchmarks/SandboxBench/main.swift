import CubicleSandbox
import CubicleRPC
#if canImport(Glibc)
import Glibc
#endif

let args = CommandLine.arguments
let repo = args.count > 1 ? args[1] : "."
let products = args.count > 2 ? args[2] : ".build/debug"
let program = try SeccompProfile.load(path: repo + "/sandbox/seccomp/default.json").compile()
var host = SandboxHostConfig(initPath: products + "/cubicle-init", stateDirectory: "/tmp/cubicle-bench-\(getpid())", cgroupParent: "cubicle-bench-\(getpid())")
let launcher = SandboxLauncher(host: host)
var spec = SandboxSpec(seccompProgram: program)
spec.codeDirectory = "/tmp/pc"
print("launching")
let sb = try await launcher.launch(spec)
print("ready in \(sb.spawnNanoseconds / 1000) us, init pid \(sb.initPID)")
let p = try await sb.runCommand(ProcessParams(argv: ["/bin/sh", "-c", "/app/cubicle-probe syscalls; echo rc=$?; ls -la /app"], env: ["PATH=/usr/bin:/bin"]), timeoutSeconds: 10)
var buf = [UInt8](repeating: 0, count: 65536)
let n = read(p.stdout, &buf, buf.count)
print(String(decoding: buf[0..<max(0, n)], as: UTF8.self))
let e = await sb.waitForCommand(pid: p.pid)
print(e)
let r = await sb.teardown()
print(r)
