import ArgumentParser
import NIOCore
import NIOPosix

// Swift concurrency's jobs run on NIO's event loops, so a forwarded request is not handed between two thread
// pools at every await. It must happen on the main thread before any task runs, hence no `@main`.
NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()

do {
    let command = try Cubicled.parseAsRoot()
    guard let cubicled = command as? Cubicled else { throw CleanExit.helpRequest(command) }
    try await cubicled.run()
} catch {
    Cubicled.exit(withError: error)
}
