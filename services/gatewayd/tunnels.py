"""The data-plane tunnels between gateways: each local TCP connection to a forward port becomes a
tunnel to a peer's loopback service (its ggml-rpc-server or its llama-server).

Two lanes, same framing:
  * tls-tcp — the fast lane: TLS 1.3 over a direct TCP connection per tunnel. The dialer pins the
    server certificate's key to the peer's node id; the server authenticates the dialer in-band
    with a signed challenge (`common.identity`), since `ssl` cannot verify self-signed client
    certificates by pinning.
  * quic — one authenticated `QuicEndpoint` connection per peer, one stream per tunnel; the
    fallback when TCP does not get through.
After authentication the dialer sends {"type": "open", "kind": ...}; the far side checks that the
dialer is a member and that it serves that kind, connects to the target, and answers with a
verdict frame; then both sides splice raw bytes.

The splice is protocol-based (asyncio Protocol callbacks writing straight into the other
transport; no coroutine per chunk), carries half-close (TLS close_notify is a half-close in TLS
1.3, which is why TLS here runs on `ssl.SSLObject` over the raw socket rather than asyncio's SSL
transport, which cannot half-close), and applies backpressure both ways.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from common.frames import FrameDecoder, FrameError, FrameEOF, encode_frame, read_frame
from common.identity import (
    AuthError,
    NodeIdentity,
    answer_challenge,
    check_answer,
    make_challenge,
    node_id_of_cert,
    parse_challenge,
)
from common.quic import PeerIdentityMismatch, QuicEndpoint, QuicPeerConnection

log = logging.getLogger("mesh.tunnels")

QUIC_ALPN = "mesh-tunnel/1"
TLS_AUTH_CONTEXT = "mesh-tunnel-tls/1"
LANE_TCP = "tls-tcp"
LANE_QUIC = "quic"
TCP_CONNECT_TIMEOUT = 1.5     # auto mode falls back to QUIC after this
SETUP_TIMEOUT = 5.0           # TLS handshake + auth + verdict, and a QUIC dial
TARGET_CONNECT_TIMEOUT = 5.0
RACE_STAGGER = 0.25           # between attempts at a peer's successive addresses
TCP_RETRY_AFTER = 60.0        # a peer that needed QUIC gets TCP tried again after this
HANDSHAKE_FRAME_MAX = 64 << 10
READ_BYTES = 256 << 10
TLS_RECORD_BYTES = 16 << 10   # the most plaintext one TLS record carries
WRITE_HIGH_WATER = 1 << 20
WRITE_LOW_WATER = 256 << 10
CLOSE_FLUSH_TIMEOUT = 30.0


@dataclass
class PeerDataAddrs:
    node_id: str
    tcp: list[tuple[str, int]] = field(default_factory=list)
    quic: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _PeerStats:
    lane: str = ""
    bytes_in: int = 0       # received from the peer through tunnels
    bytes_out: int = 0      # sent to the peer through tunnels
    streams: int = 0        # tunnels open now, either direction
    last_error: str = ""


def _set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


# --- TLS on ssl.SSLObject ----------------------------------------------------------------------

class _TlsSetup:
    """TLS handshake and the framed auth exchange, as coroutines over a non-blocking socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool):
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self.decoder = FrameDecoder(HANDSHAKE_FRAME_MAX)
        self._peer_eof = False

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _receive(self) -> None:
        data = await self.loop.sock_recv(self.sock, READ_BYTES)
        if not data:
            raise ConnectionResetError("peer closed the connection during tunnel setup")
        self.incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
        await self._flush()

    def peer_node_id(self) -> str:
        der = self.ssl.getpeercert(binary_form=True)
        if not der:
            raise AuthError("TLS peer presented no certificate")
        return node_id_of_cert(der)

    async def send(self, *frames: dict) -> None:
        self.ssl.write(b"".join(encode_frame(frame) for frame in frames))
        await self._flush()

    async def read_frame(self) -> dict:
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            if self._peer_eof:
                raise FrameEOF("peer ended the TLS stream during tunnel setup")
            try:
                chunk = self.ssl.read(TLS_RECORD_BYTES)
            except ssl.SSLWantReadError:
                await self._flush()  # TLS may owe the peer something (e.g. a key update)
                await self._receive()
                continue
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                self._peer_eof = True
                continue
            self.decoder.feed(chunk)

    def close(self) -> None:
        self.sock.close()


class _TlsTransport(asyncio.Transport):
    """An asyncio Transport over a non-blocking socket + ssl.SSLObject, made after _TlsSetup.

    Unlike asyncio's SSL transport it supports write_eof(): it sends close_notify (a half-close
    in TLS 1.3) and shuts down the TCP write side, while reading goes on.
    """

    def __init__(self, setup: _TlsSetup, protocol: asyncio.Protocol):
        super().__init__()
        self._loop = setup.loop
        self._sock = setup.sock
        self._fd = setup.sock.fileno()
        self._ssl = setup.ssl
        self._incoming = setup.incoming
        self._outgoing = setup.outgoing
        self._protocol = protocol
        self._send_buffer = bytearray()
        self._high_water, self._low_water = WRITE_HIGH_WATER, WRITE_LOW_WATER
        self._writing_paused = False
        self._reading = False
        self._reading_paused = False
        self._eof_sent = False
        self._eof_received = setup._peer_eof
        self._shutdown_pending = False
        self._closing = False
        self._lost = False
        self._recv_buffer = bytearray(READ_BYTES)
        self._recv_view = memoryview(self._recv_buffer)
        self._plain_view = memoryview(bytearray(READ_BYTES + TLS_RECORD_BYTES))

    def start(self, leftover: bytes) -> None:
        """Deliver bytes decrypted during setup, then start reading the socket."""
        self._protocol.connection_made(self)
        if leftover:
            self._protocol.data_received(leftover)
        if self._eof_received:
            self._protocol.eof_received()
        elif not self._lost:
            self._start_reading()
            if self._incoming.pending:
                self._decrypt()

    # reading

    def _start_reading(self) -> None:
        if not self._reading and not self._reading_paused and not self._eof_received and not self._lost:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        try:
            count = self._sock.recv_into(self._recv_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if not count:
            self._stop_reading()
            if not self._eof_received:
                # A FIN without close_notify: a crashed peer, or a truncation attempt.
                self._fatal(ConnectionResetError("TLS peer closed TCP without close_notify"))
            return
        self._incoming.write(self._recv_view[:count])
        self._decrypt()

    def _decrypt(self) -> None:
        # Records are decrypted into one preallocated buffer and handed on as one bytes object
        # per socket read (one downstream write, not one per 16 KiB record). Asking SSLObject for
        # a large read without a buffer would allocate that much for every record.
        view = self._plain_view
        filled = 0
        eof = False
        read = self._ssl.read
        while True:
            if filled > len(view) - TLS_RECORD_BYTES:
                self._protocol.data_received(bytes(view[:filled]))
                filled = 0
                if self._lost:
                    return
            try:
                count = read(TLS_RECORD_BYTES, view[filled:filled + TLS_RECORD_BYTES])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not count:
                eof = True
                break
            filled += count
        if self._outgoing.pending:
            self._flush()  # post-handshake TLS messages
        if filled:
            self._protocol.data_received(bytes(view[:filled]))
        if eof and not self._eof_received and not self._lost:
            self._eof_received = True
            self._stop_reading()
            self._protocol.eof_received()

    def pause_reading(self) -> None:
        self._reading_paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self._closing:
                self._start_reading()

    def is_reading(self) -> bool:
        return self._reading

    # writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or not data:
            return
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        try:
            self._ssl.write(data)
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        self._flush()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if not data:
            return
        if not self._send_buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            self._send_buffer += memoryview(data)[sent:]
            self._loop.add_writer(self._fd, self._on_writable)
        else:
            self._send_buffer += data
        if not self._writing_paused and len(self._send_buffer) > self._high_water:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._send_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        del self._send_buffer[:sent]
        if self._send_buffer:
            if self._writing_paused and len(self._send_buffer) <= self._low_water:
                self._writing_paused = False
                self._protocol.resume_writing()
            return
        self._loop.remove_writer(self._fd)
        if self._writing_paused:
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._shutdown_pending:
            self._shutdown_write()
        if self._closing:
            self._finish_close(None)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent or self._lost:
            return
        self._eof_sent = True
        self._send_close_notify()
        if self._send_buffer:
            self._shutdown_pending = True
        else:
            self._shutdown_write()

    def _send_close_notify(self) -> None:
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; we keep reading the peer's data
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._flush()

    def _shutdown_write(self) -> None:
        self._shutdown_pending = False
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def get_write_buffer_size(self) -> int:
        return len(self._send_buffer) + self._outgoing.pending

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = WRITE_HIGH_WATER if high is None else high
        self._low_water = min(self._high_water, self._high_water // 4 if low is None else low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    # closing

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush, send close_notify if not yet sent, then close the socket."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._stop_reading()
        if not self._eof_sent:
            self._eof_sent = True
            self._send_close_notify()
        if not self._send_buffer and not self._lost:
            self._loop.call_soon(self._finish_close, None)
        else:  # a peer that stopped reading must not keep us half-closed forever
            self._loop.call_later(CLOSE_FLUSH_TIMEOUT, self._finish_close, None)

    def abort(self) -> None:
        self._finish_close(None)

    def _fatal(self, exc: BaseException) -> None:
        self._finish_close(exc)

    def _finish_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._stop_reading()
        if self._send_buffer:
            self._loop.remove_writer(self._fd)
            self._send_buffer.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        if name == "ssl_object":
            return self._ssl
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]


# --- splicing ------------------------------------------------------------------------------------

class _Splice:
    """A local TCP connection joined to a tunnel transport; counts the bytes per peer."""

    def __init__(self, service: "TunnelService", peer_id: str, stats: _PeerStats, forward_port: int | None):
        self.service = service
        self.peer_id = peer_id
        self.stats = stats
        self.forward_port = forward_port
        self.local: asyncio.Transport | None = None
        self.remote: asyncio.Transport | None = None
        self.local_side = _SpliceSide(self, is_remote=False)
        self.remote_side = _SpliceSide(self, is_remote=True)
        self.setup_task: asyncio.Task | None = None
        self.closed = False
        self.counted = False

    def attach(self, remote: asyncio.Transport) -> None:
        """Start copying: the local side was paused until now."""
        assert self.local is not None
        self.remote = remote
        self.stats.streams += 1
        self.counted = True
        self.local_side.peer = remote
        self.remote_side.peer = self.local
        pending, self.local_side.pending = self.local_side.pending, []
        for data in pending:
            self.stats.bytes_out += len(data)
            remote.write(data)
        if self.local_side.eof and not self.remote.is_closing():
            remote.write_eof()
        if self.local_side.lost:
            self.close(abort=True)
            return
        self.local.resume_reading()

    def close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.setup_task is not None and not self.setup_task.done():
            self.setup_task.cancel()
        for transport in (self.local, self.remote):
            if transport is not None:
                transport.abort() if abort else transport.close()
        if self.counted:
            self.stats.streams -= 1
            self.counted = False
        self.service._splices.discard(self)


class _SpliceSide(asyncio.Protocol):
    """The protocol of one transport of a splice: what it receives is written to `peer`."""

    __slots__ = ("splice", "is_remote", "peer", "eof", "lost", "pending")

    def __init__(self, splice: _Splice, *, is_remote: bool):
        self.splice = splice
        self.is_remote = is_remote
        self.peer: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.pending: list[bytes] = []  # local bytes that raced ahead of the tunnel setup

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.is_remote:
            self.splice.local = transport  # type: ignore[assignment]
            _set_nodelay(transport.get_extra_info("socket"))
            transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]
            if self.peer is None:
                transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.pending.append(data)
            return
        if self.is_remote:
            self.splice.stats.bytes_in += len(data)
        else:
            self.splice.stats.bytes_out += len(data)
        peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None:
            other = self.splice.local_side if self.is_remote else self.splice.remote_side
            if other.eof:
                self.splice.close(abort=False)
            elif not peer.is_closing():
                peer.write_eof()
        return True  # keep our transport open: the other direction may still be flowing

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        if self.peer is not None and not self.splice.closed:
            self.peer.resume_reading()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        splice = self.splice
        if splice.peer_id and exc is not None:
            splice.stats.last_error = f"{type(exc).__name__}: {exc}"
        if self.peer is not None or self.is_remote:
            splice.close(abort=exc is not None or not self.eof)
        elif splice.setup_task is not None and not splice.setup_task.done():
            splice.setup_task.cancel()  # the local client left before the tunnel was up
            splice.close(abort=True)


# --- the service ---------------------------------------------------------------------------------

class TunnelService:
    """Forward ports on 127.0.0.1 to peers' loopback services, and serve peers' tunnels to ours."""

    def __init__(self, identity: NodeIdentity, *, is_member: Callable[[str], bool],
                 local_target: Callable[[str], tuple[str, int] | None],
                 bind_host: str = "0.0.0.0", tcp_port: int = 0, quic_port: int = 0, prefer: str = "auto"):
        if prefer not in ("auto", "tcp", "quic"):
            raise ValueError(f"prefer must be auto, tcp or quic, not {prefer!r}")
        self.identity = identity
        self.is_member = is_member
        self.local_target = local_target
        self.bind_host = bind_host
        self.tcp_port = tcp_port
        self.quic_port = quic_port
        self.prefer = prefer
        self._stats: dict[str, _PeerStats] = {}
        self._lane: dict[str, str] = {}
        self._tcp_failed_at: dict[str, float] = {}
        self._good_tcp_addr: dict[str, tuple[str, int]] = {}
        self._quic_connections: dict[str, QuicPeerConnection] = {}
        self._quic_dial_locks: dict[str, asyncio.Lock] = {}
        self._forwards: dict[int, tuple[asyncio.AbstractServer, PeerDataAddrs, str]] = {}
        self._splices: set[_Splice] = set()
        self._tasks: set[asyncio.Task] = set()
        self._tcp_listener: socket.socket | None = None
        self._quic: QuicEndpoint | None = None
        self._closing = False
        self._server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_tls.minimum_version = ssl.TLSVersion.TLSv1_3
        self._server_tls.load_cert_chain(identity.cert_path, identity.key_path)
        self._server_tls.num_tickets = 0  # no resumption: saves post-handshake messages
        self._client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._client_tls.minimum_version = ssl.TLSVersion.TLSv1_3
        self._client_tls.check_hostname = False
        self._client_tls.verify_mode = ssl.CERT_NONE  # self-signed: pinned to the node id instead

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.bind_host, self.tcp_port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(sockaddr)
            listener.listen(128)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._tcp_listener = listener
        self._spawn(self._accept_tls_loop(listener))
        self._quic = QuicEndpoint(self.identity, alpn=QUIC_ALPN, host=self.bind_host, port=self.quic_port,
                                  authorize=self._authorize_quic, on_connection=self._on_quic_connection)
        await self._quic.start()
        tcp_port = listener.getsockname()[1]
        quic_port = self._quic.local_address[1]
        hosts = _announce_hosts(self.bind_host)
        return [(h, tcp_port) for h in hosts], [(h, quic_port) for h in hosts]

    async def close(self) -> None:
        self._closing = True
        for port in list(self._forwards):
            await self.close_forward(port)
        for splice in list(self._splices):
            splice.close(abort=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tcp_listener is not None:
            self._tcp_listener.close()
            self._tcp_listener = None
        if self._quic is not None:
            await self._quic.close()
        await asyncio.sleep(0)  # let transports deliver connection_lost

    def stats(self) -> dict:
        out = {}
        for node_id, s in self._stats.items():
            connection = self._quic_connections.get(node_id)
            rtt = connection.rtt() if connection is not None and not connection.is_closed else None
            out[node_id] = {"node_id": node_id, "lane": s.lane, "bytes_in": s.bytes_in,
                            "bytes_out": s.bytes_out, "streams": s.streams, "open_streams": s.streams,
                            "last_error": s.last_error,
                            "rtt_ms": None if rtt is None else round(rtt * 1000, 3)}
        return out

    def lane_for(self, node_id: str) -> str | None:
        """The lane that last carried a tunnel to this peer."""
        return self._lane.get(node_id)

    def _peer_stats(self, node_id: str) -> _PeerStats:
        stats = self._stats.get(node_id)
        if stats is None:
            stats = self._stats[node_id] = _PeerStats()
        return stats

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- forwards (dialing side) -----------------------------------------------------------------

    async def open_forward(self, peer: PeerDataAddrs, kind: str) -> int:
        loop = asyncio.get_running_loop()
        holder: dict[str, int] = {}

        def new_local_connection() -> asyncio.Protocol:
            splice = _Splice(self, peer.node_id, self._peer_stats(peer.node_id), holder.get("port"))
            self._splices.add(splice)
            splice.setup_task = self._spawn(self._connect_splice(splice, peer, kind))
            return splice.local_side

        server = await loop.create_server(new_local_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        holder["port"] = port
        self._forwards[port] = (server, peer, kind)
        return port

    async def close_forward(self, port: int) -> None:
        entry = self._forwards.pop(port, None)
        if entry is None:
            return
        server = entry[0]
        server.close()
        for splice in [s for s in self._splices if s.forward_port == port]:
            splice.close(abort=True)
        await server.wait_closed()

    async def _connect_splice(self, splice: _Splice, peer: PeerDataAddrs, kind: str) -> None:
        await asyncio.sleep(0)  # the local transport is made (connection_made) right after us
        try:
            await self._open_tunnel(splice, peer, kind)
        except asyncio.CancelledError:
            splice.close(abort=True)
            raise
        except Exception as exc:  # already recorded in last_error; the local client sees a reset
            log.info("tunnel to %s (%s) failed: %s", peer.node_id, kind, exc)
            splice.close(abort=True)

    def _lane_order(self, peer: PeerDataAddrs) -> list[str]:
        if self.prefer == "tcp":
            return [LANE_TCP]
        if self.prefer == "quic":
            return [LANE_QUIC]
        lanes = []
        if peer.tcp:
            lanes.append(LANE_TCP)
        if peer.quic:
            lanes.append(LANE_QUIC)
        failed_at = self._tcp_failed_at.get(peer.node_id)
        if (self._lane.get(peer.node_id) == LANE_QUIC and failed_at is not None
                and time.monotonic() - failed_at < TCP_RETRY_AFTER and len(lanes) == 2):
            lanes.reverse()  # TCP failed recently: go straight to QUIC, TCP only as fallback
        return lanes

    async def _open_tunnel(self, splice: _Splice, peer: PeerDataAddrs, kind: str) -> None:
        stats = splice.stats
        errors = []
        lanes = self._lane_order(peer)
        if not lanes:
            stats.last_error = f"peer {peer.node_id} announced no data addresses"
            raise ConnectionError(stats.last_error)
        for lane in lanes:
            try:
                if lane == LANE_TCP:
                    await self._open_tls_tunnel(splice, peer, kind)
                else:
                    await self._open_quic_tunnel(splice, peer, kind)
            except AuthError as exc:
                # The peer itself said no (or no address reached the right node): not a
                # transport problem, so another lane would not help.
                stats.last_error = f"{lane}: {exc.reason}"
                if not isinstance(exc, PeerIdentityMismatch):
                    raise
                errors.append(stats.last_error)
                continue
            except (OSError, asyncio.TimeoutError, FrameError) as exc:
                detail = str(exc) or type(exc).__name__
                errors.append(f"{lane}: {detail}")
                stats.last_error = errors[-1]
                if lane == LANE_TCP:
                    self._tcp_failed_at[peer.node_id] = time.monotonic()
                continue
            self._lane[peer.node_id] = lane
            stats.lane = lane
            return
        raise ConnectionError(f"no lane reached {peer.node_id}: " + "; ".join(errors))

    async def _open_tls_tunnel(self, splice: _Splice, peer: PeerDataAddrs, kind: str) -> None:
        addrs = list(peer.tcp)
        good = self._good_tcp_addr.get(peer.node_id)
        if good in addrs:
            addrs.remove(good)
            addrs.insert(0, good)
        mismatches = []
        while addrs:
            sock, addr = await _race_tcp_connect(addrs, TCP_CONNECT_TIMEOUT)
            addrs.remove(addr)
            setup = _TlsSetup(sock, self._client_tls, server_side=False)

            async def authenticate() -> dict:
                await setup.handshake()
                server_id = setup.peer_node_id()
                if server_id != peer.node_id:
                    raise PeerIdentityMismatch(f"peer presented node id {server_id}, expected {peer.node_id}")
                nonce, claimed = parse_challenge(await setup.read_frame())
                if claimed != server_id:
                    raise AuthError(f"server claims node id {claimed} but its certificate is {server_id}")
                await setup.send(answer_challenge(self.identity, nonce, server_id, TLS_AUTH_CONTEXT),
                                 {"type": "open", "kind": kind})
                return await setup.read_frame()

            try:
                verdict = await asyncio.wait_for(authenticate(), SETUP_TIMEOUT)
            except PeerIdentityMismatch as exc:
                setup.close()
                mismatches.append(f"{addr[0]}:{addr[1]}: {exc.reason}")
                continue
            except BaseException:
                setup.close()
                raise
            if verdict.get("type") != "verdict" or verdict.get("ok") is not True:
                setup.close()
                raise AuthError(str(verdict.get("reason") or "refused by the peer"))
            self._good_tcp_addr[peer.node_id] = addr
            if splice.closed:
                setup.close()
                return
            transport = _TlsTransport(setup, splice.remote_side)  # type: ignore[arg-type]
            splice.attach(transport)
            transport.start(setup.decoder.take_rest())
            return
        raise PeerIdentityMismatch("; ".join(mismatches))

    async def _quic_connection(self, peer: PeerDataAddrs) -> QuicPeerConnection:
        connection = self._quic_connections.get(peer.node_id)
        if connection is not None and not connection.is_closed:
            return connection
        lock = self._quic_dial_locks.setdefault(peer.node_id, asyncio.Lock())
        async with lock:
            connection = self._quic_connections.get(peer.node_id)
            if connection is not None and not connection.is_closed:
                return connection
            assert self._quic is not None
            errors = []
            for addr in peer.quic:
                try:
                    connection = await self._quic.dial(tuple(addr), expected_node_id=peer.node_id,
                                                       timeout=SETUP_TIMEOUT)
                except PeerIdentityMismatch as exc:
                    errors.append(f"{addr[0]}:{addr[1]}: {exc.reason}")
                    continue
                except (OSError, asyncio.TimeoutError) as exc:
                    errors.append(f"{addr[0]}:{addr[1]}: {exc or type(exc).__name__}")
                    continue
                self._adopt_quic_connection(connection)
                return connection
            if errors and all("presented node id" in e for e in errors):
                raise PeerIdentityMismatch("; ".join(errors))
            raise ConnectionError("QUIC: " + ("; ".join(errors) or "no address"))

    def _adopt_quic_connection(self, connection: QuicPeerConnection) -> None:
        connection.on_stream = lambda reader, writer: self._serve_quic_stream(connection, reader, writer)
        current = self._quic_connections.get(connection.peer_node_id)
        if current is None or current.is_closed:
            self._quic_connections[connection.peer_node_id] = connection

    async def _open_quic_tunnel(self, splice: _Splice, peer: PeerDataAddrs, kind: str) -> None:
        connection = await self._quic_connection(peer)
        reader, writer = await connection.open_stream()
        try:
            writer.write(encode_frame({"type": "open", "kind": kind}))
            verdict = await read_frame(reader, HANDSHAKE_FRAME_MAX, timeout=SETUP_TIMEOUT)
        except BaseException:
            writer.transport.abort()
            raise
        if verdict.get("type") != "verdict" or verdict.get("ok") is not True:
            writer.transport.abort()
            raise AuthError(str(verdict.get("reason") or "refused by the peer"))
        if splice.closed:
            writer.transport.abort()
            return
        transport = writer.transport
        splice.attach(transport)  # type: ignore[arg-type]
        transport.set_protocol(splice.remote_side)  # replays bytes that came with the verdict

    # -- serving side ----------------------------------------------------------------------------

    def _refusal(self, dialer_id: str, header: object) -> tuple[str | None, tuple[str, int] | None]:
        if not self.is_member(dialer_id):
            return f"node {dialer_id} is not a member of this mesh", None
        if not isinstance(header, dict) or header.get("type") != "open" or not isinstance(header.get("kind"), str):
            return "malformed tunnel header", None
        kind = header["kind"]
        target = self.local_target(kind)
        if target is None:
            return f"no local service for tunnel kind {kind[:40]!r}", None
        return None, target

    async def _connect_target(self, splice: _Splice, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        # connection_made pauses reading until the tunnel is attached
        await asyncio.wait_for(loop.create_connection(lambda: splice.local_side, target[0], target[1]),
                               TARGET_CONNECT_TIMEOUT)

    async def _accept_tls_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closing or listener.fileno() < 0:
                    return
                log.warning("accepting a tunnel connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            _set_nodelay(sock)
            self._spawn(self._serve_tls(sock))

    async def _serve_tls(self, sock: socket.socket) -> None:
        setup = _TlsSetup(sock, self._server_tls, server_side=True)
        splice: _Splice | None = None
        try:
            verdict = await asyncio.wait_for(self._authenticate_tls_dialer(setup), SETUP_TIMEOUT)
            if verdict is None:
                return
            splice, stats = verdict
        except asyncio.CancelledError:
            setup.close()
            if splice is not None:
                splice.close(abort=True)
            raise
        except (AuthError, FrameError, OSError, asyncio.TimeoutError, ssl.SSLError, ValueError) as exc:
            log.info("refused a TLS tunnel: %s", exc)
            setup.close()
            if splice is not None:
                splice.close(abort=True)
            return
        stats.lane = LANE_TCP
        transport = _TlsTransport(setup, splice.remote_side)
        splice.attach(transport)
        transport.start(setup.decoder.take_rest())

    async def _authenticate_tls_dialer(self, setup: _TlsSetup) -> tuple[_Splice, _PeerStats] | None:
        """Challenge the dialer, check the tunnel header, connect the target, send the verdict."""
        await setup.handshake()
        nonce, challenge = make_challenge(self.identity)
        await setup.send(challenge)
        dialer_id, _claims = check_answer(await setup.read_frame(), nonce,
                                          self.identity.node_id, TLS_AUTH_CONTEXT)
        header = await setup.read_frame()
        reason, target = self._refusal(dialer_id, header)
        if reason is not None:
            self._note_refusal(dialer_id, reason)
            await setup.send({"type": "verdict", "ok": False, "reason": reason})
            setup.close()
            return None
        stats = self._peer_stats(dialer_id)
        splice = _Splice(self, dialer_id, stats, None)
        self._splices.add(splice)
        try:
            await self._connect_target(splice, target)  # type: ignore[arg-type]
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"local {header['kind']} service at {target[0]}:{target[1]} is not reachable: {exc}"  # type: ignore[index]
            stats.last_error = reason
            splice.close(abort=True)
            await setup.send({"type": "verdict", "ok": False, "reason": reason})
            setup.close()
            return None
        except BaseException:
            splice.close(abort=True)
            raise
        await setup.send({"type": "verdict", "ok": True})
        return splice, stats

    def _note_refusal(self, dialer_id: str, reason: str) -> None:
        # Only members get a stats entry: strangers could otherwise grow the table without end.
        if dialer_id in self._stats or self.is_member(dialer_id):
            self._peer_stats(dialer_id).last_error = f"refused: {reason}"
        log.info("refused a tunnel from %s: %s", dialer_id, reason)

    def _authorize_quic(self, node_id: str, claims: dict, nonce: bytes) -> str | None:
        if not self.is_member(node_id):
            reason = f"node {node_id} is not a member of this mesh"
            self._note_refusal(node_id, reason)
            return reason
        return None

    def _on_quic_connection(self, connection: QuicPeerConnection) -> None:
        self._adopt_quic_connection(connection)

    async def _serve_quic_stream(self, connection: QuicPeerConnection, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        dialer_id = connection.peer_node_id
        try:
            header = await read_frame(reader, HANDSHAKE_FRAME_MAX, timeout=SETUP_TIMEOUT)
        except (FrameError, asyncio.TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        reason, target = self._refusal(dialer_id, header)
        if reason is not None:
            self._note_refusal(dialer_id, reason)
            writer.write(encode_frame({"type": "verdict", "ok": False, "reason": reason}))
            writer.close()
            return
        stats = self._peer_stats(dialer_id)
        splice = _Splice(self, dialer_id, stats, None)
        self._splices.add(splice)
        try:
            await self._connect_target(splice, target)  # type: ignore[arg-type]
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"local {header['kind']} service at {target[0]}:{target[1]} is not reachable: {exc}"  # type: ignore[index]
            stats.last_error = reason
            writer.write(encode_frame({"type": "verdict", "ok": False, "reason": reason}))
            writer.close()
            splice.close(abort=True)
            return
        except asyncio.CancelledError:
            splice.close(abort=True)
            raise
        writer.write(encode_frame({"type": "verdict", "ok": True}))
        stats.lane = LANE_QUIC
        transport = writer.transport
        splice.attach(transport)  # type: ignore[arg-type]
        transport.set_protocol(splice.remote_side)


async def _race_tcp_connect(addrs: list[tuple[str, int]], timeout: float) -> tuple[socket.socket, tuple[str, int]]:
    """Connect to the first of `addrs` that answers, starting one attempt every RACE_STAGGER s."""
    loop = asyncio.get_running_loop()

    async def attempt(addr: tuple[str, int]) -> tuple[socket.socket, tuple[str, int]]:
        infos = await loop.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            _set_nodelay(sock)
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
        except BaseException:
            sock.close()
            raise
        return sock, addr

    pending: set[asyncio.Task] = set()
    errors: list[str] = []
    queue = list(addrs)
    winner: tuple[socket.socket, tuple[str, int]] | None = None
    try:
        while (queue or pending) and winner is None:
            if queue:
                pending.add(asyncio.ensure_future(attempt(queue.pop(0))))
            done, pending = await asyncio.wait(pending, timeout=RACE_STAGGER if queue else None,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    errors.append(str(exc) or type(exc).__name__)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result()[0].close()  # a second connection that finished at the same time
    finally:
        for task in pending:
            task.cancel()
            task.add_done_callback(_close_raced_socket)
    if winner is not None:
        return winner
    raise ConnectionError("TCP: " + ("; ".join(errors) or "no address"))


def _close_raced_socket(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].close()


def _announce_hosts(bind_host: str) -> list[str]:
    """Addresses peers may use for us: the bound one, or for a wildcard bind every interface
    address (routable ones first, loopback last)."""
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        return [bind_host]
    if not ip.is_unspecified:
        return [bind_host]
    hosts: list[str] = []
    try:
        import psutil
        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family == socket.AF_INET or (ip.version == 6 and address.family == socket.AF_INET6):
                    host = address.address.split("%", 1)[0]
                    if host not in hosts:
                        hosts.append(host)
    except Exception:  # psutil missing or failing: fall back to what the resolver knows
        try:
            hosts = socket.gethostbyname_ex(socket.gethostname())[2]
        except OSError:
            hosts = []
    def loopback_or_link_local(host: str) -> bool:
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_link_local
    hosts.sort(key=loopback_or_link_local)
    if not any(ipaddress.ip_address(h).is_loopback for h in hosts):
        hosts.append("127.0.0.1")
    return hosts
