import CubicleDNSWire
import NIOCore

/// The session DNS on the gateway: a query from a session's address is answered under that session's
/// policy (`SessionNetworking.resolve`); a datagram from anywhere else, or one that is not a plain query,
/// gets no answer at all.
final class SessionDNSHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    let network: SessionNetworking
    init(network: SessionNetworking) { self.network = network }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = unwrapInboundIn(data)
        guard let ip = envelope.remoteAddress.ipAddress, let source = IPAddress(ip),
              let bytes = envelope.data.getBytes(at: envelope.data.readerIndex, length: envelope.data.readableBytes),
              let question = DNSMessage.parseQuery(bytes) else { return }
        let channel = context.channel
        let remote = envelope.remoteAddress
        let network = network
        Task {
            guard let answer = await network.resolve(question, from: source) else { return }
            let buffer = channel.allocator.buffer(bytes: answer)
            channel.writeAndFlush(AddressedEnvelope(remoteAddress: remote, data: buffer), promise: nil)
        }
    }
}
