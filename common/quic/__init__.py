"""One authenticated QUIC endpoint per node: a single UDP socket that both accepts and dials.

The QUIC library is qh3 (a maintained fork of aioquic whose packet core and crypto are native).
Layers (one module each):
  * `streams` — one QUIC stream as an asyncio Transport (StreamReader/StreamWriter by default);
  * `auth` — the challenge exchange (the dialer pins the server's certificate key to the node id
    it expects; the server authenticates the dialer with a signed challenge on the first
    server-initiated stream before any user stream is served), shared with the TLS-TCP lane;
  * `connection` — the driver of one qh3 connection, sending through a datagram path;
  * `paths` — datagram paths (the UDP socket: direct or hole-punched; a TURN allocation: relayed);
  * `retry` — address validation (Retry tokens) and the caps on unauthenticated handshakes;
  * `endpoint` — the UDP socket and the demultiplexer (QUIC by connection id, STUN, relays).

Why not qh3's own asyncio layer: its `connect()` opens a socket per connection, and one socket
has to accept, dial, answer STUN and carry TURN. Here datagrams are read in batches, handed to
each connection at once and answered with one transmit per batch, and writes pause their
producer above a high-water mark of unsent bytes. Larger datagrams are used on loopback and on
private networks: per-packet cost dominates throughput.
"""
from common.identity import AuthError
from common.quic.auth import Authorize, PeerIdentityMismatch
from common.quic.connection import QuicPeerConnection
from common.quic.endpoint import QuicEndpoint
from common.quic.limits import datagram_size_for
from common.quic.paths import DatagramPath, UdpSocketPath
from common.quic.streams import QuicStreamTransport, StreamHandler

__all__ = ["AuthError", "Authorize", "DatagramPath", "PeerIdentityMismatch", "QuicEndpoint", "QuicPeerConnection",
           "QuicStreamTransport", "StreamHandler", "UdpSocketPath", "datagram_size_for"]
