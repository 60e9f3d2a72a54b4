import NIOCore
import NIOPosix

/// Reads a pipe from inside a sandbox (the agent's stdout/stderr, a command's output) until EOF or
/// cancellation, handing each buffer to `each`. Takes ownership of `fd`.
func readSandboxPipe(fd: Int32, group: any EventLoopGroup, _ each: (ByteBufferView) async throws -> Void) async {
    let channel: NIOAsyncChannel<ByteBuffer, Never>
    do {
        channel = try await NIOPipeBootstrap(group: group).takingOwnershipOfDescriptor(input: fd) { ch in
            ch.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, Never>(wrappingChannelSynchronously: ch) }
        }
    } catch {
        return
    }
    try? await channel.executeThenClose { inbound, _ in
        for try await buffer in inbound {
            try await each(buffer.readableBytesView)
            try Task.checkCancellation()
        }
    }
}
