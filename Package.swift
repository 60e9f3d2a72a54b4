// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "cubicle",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "cubicle-init", targets: ["cubicle-init"]),
        .executable(name: "cubicle-sandbox-bench", targets: ["cubicle-sandbox-bench"]),
    ],
    targets: [
        // Only what Swift cannot do safely: clone/fork with pre-exec setup, SCM_RIGHTS, variadic ioctl/prctl.
        .target(name: "CCubicleShim"),
        .systemLibrary(name: "CLibseccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        .target(name: "CubicleLinux", dependencies: ["CCubicleShim"]),
        .target(name: "CubicleRPC", dependencies: ["CubicleLinux"]),
        .target(name: "CubicleInit", dependencies: ["CubicleRPC", "CubicleLinux", "CCubicleShim"]),
        .executableTarget(name: "cubicle-init", dependencies: ["CubicleInit"]),
        .target(name: "CubicleSandbox", dependencies: ["CubicleRPC", "CubicleLinux", "CCubicleShim", "CLibseccomp"]),
        .executableTarget(name: "cubicle-sandbox-bench", dependencies: ["CubicleSandbox", "CubicleLinux", "CubicleRPC"], path: "Sources/Benchmarks/SandboxBench"),
        .testTarget(name: "CubicleRPCTests", dependencies: ["CubicleRPC"]),
        .testTarget(name: "CubicleSandboxTests", dependencies: ["CubicleSandbox", "CubicleRPC", "CubicleLinux"]),
    ]
)
