#if canImport(Glibc)
import Glibc
#endif
import CNftables
import Synchronization

/// A failed nftables transaction: what was asked and what libnftables said. Nothing of it was applied.
public struct NftablesError: Error, CustomStringConvertible, Sendable {
    public let step: String
    public let message: String
    public var description: String { "nftables: \(step): \(message)" }
}

/// libnftables, as `nft -f` uses it, without a process per change. Every `run` is one transaction: the
/// kernel applies all of its commands or none. One context, used by one caller at a time (libnftables'
/// contexts are not thread-safe); calls block for a netlink round trip, so callers keep them off the
/// cooperative pool's hot paths or accept a short block (a session's start and end).
public final class Nftables: Sendable {
    private let context: Mutex<OpaquePointer?>

    public init() throws(NftablesError) {
        guard let ctx = nft_ctx_new(UInt32(NFT_CTX_DEFAULT)) else { throw NftablesError(step: "nft_ctx_new", message: "no context") }
        // Errors into a buffer of ours rather than onto cubicled's stderr; output likewise (listing sets).
        nft_ctx_buffer_error(ctx)
        nft_ctx_buffer_output(ctx)
        context = Mutex(ctx)
    }

    deinit { context.withLock { if let c = $0 { nft_ctx_free(c) } } }

    /// Runs `commands` (nft's own syntax) as one transaction; what `list` commands print (as JSON with `json`).
    @discardableResult
    public func run(_ commands: String, step: String, json: Bool = false) throws(NftablesError) -> String {
        let result: Result<String, NftablesError> = context.withLock { ctx in
            guard let ctx else { return .failure(NftablesError(step: step, message: "closed")) }
            let flags = nft_ctx_output_get_flags(ctx)
            if json { nft_ctx_output_set_flags(ctx, flags | UInt32(NFT_CTX_OUTPUT_JSON)) }
            defer { nft_ctx_output_set_flags(ctx, flags) }
            let rc = nft_run_cmd_from_buffer(ctx, commands)
            let output = nft_ctx_get_output_buffer(ctx).map { String(cString: $0) } ?? ""
            let error = nft_ctx_get_error_buffer(ctx).map { String(cString: $0) } ?? ""
            return rc == 0 ? .success(output) : .failure(NftablesError(step: step, message: error.isEmpty ? "failed (\(rc))" : error))
        }
        return try result.get()
    }
}
