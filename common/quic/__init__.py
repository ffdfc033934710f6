"""One authenticated QUIC endpoint per node: a single UDP socket that both accepts and dials.

Layers (one module each):
  * `flow` — flow-control overrides of aioquic (receive windows that slide with what the
    application consumed; pacing off);
  * `streams` — one QUIC stream as an asyncio Transport (StreamReader/StreamWriter by default);
  * `auth` — the challenge exchange (the dialer pins the server's certificate key to the node id
    it expects; the server authenticates the dialer with a signed challenge on the first
    server-initiated stream before any user stream is served), shared with the TLS-TCP lane;
  * `connection` — the driver of one aioquic connection, sending through a datagram path;
  * `paths` — datagram paths (the UDP socket: direct or hole-punched; a TURN allocation: relayed);
  * `endpoint` — the UDP socket and the demultiplexer (QUIC by connection id, STUN, relays).

Why not aioquic's own asyncio layer: it reads one datagram per loop iteration, has no write
backpressure, doubles its receive windows regardless of whether the application reads, and paces
with timers that, at epoll's millisecond resolution, throttle low-RTT paths. Here datagrams are
read in batches and answered with one transmit per batch, writes pause their producer above a
high-water mark, receive windows slide with what the application consumed, and pacing is off
(loopback/LAN paths with enlarged socket buffers). Larger datagrams are used on loopback and on
private networks: per-packet Python cost dominates aioquic's throughput.
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
