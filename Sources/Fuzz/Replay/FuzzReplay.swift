#if canImport(Glibc)
import Glibc
#endif
import CubicleLinux

#if CUBICLE_FUZZ
/// libFuzzer's entry for programs that keep their own main (SwiftPM renames an executable's main).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<Int32>,
                         _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Int32
#endif

/// Without libFuzzer, a fuzz target replays files or directories of inputs (the seed corpus, a crash) through
/// the same check, so `make test` keeps every seed passing and a found crash can be rerun in a debugger.
public enum FuzzReplay {
    /// Built with -D CUBICLE_FUZZ -sanitize=fuzzer: libFuzzer's driver with its usual flags; otherwise the
    /// replay of the files named on the command line.
    public static func main(_ check: @escaping ([UInt8]) -> Void) {
        #if CUBICLE_FUZZ
        current = check
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            FuzzReplay.current!(size == 0 ? [] : Array(UnsafeBufferPointer(start: data, count: size)))
            return 0
        })
        #else
        run(check)
        #endif
    }

    nonisolated(unsafe) static var current: (([UInt8]) -> Void)?

    public static func run(_ check: ([UInt8]) -> Void) {
        var count = 0
        for path in CommandLine.arguments.dropFirst() {
            for file in files(path) {
                guard let bytes = read(file) else { continue }
                check(bytes)
                count += 1
            }
        }
        print("replayed \(count) inputs")
    }

    static func files(_ path: String) -> [String] {
        guard Files.isDirectory(path) else { return [path] }
        return ((try? Files.listDirectory(path)) ?? []).sorted().map { path + "/" + $0 }
    }

    static func read(_ path: String) -> [UInt8]? { try? Files.readBytes(path, limit: 1 << 20) }
}
