"""The splice of a data tunnel: a local TCP connection joined to a tunnel (a TlsPump on the TLS
lane, a QUIC stream transport on the QUIC lane), and the per-peer counters it keeps.

The QUIC lane's splice is protocol-based: asyncio Protocol callbacks write straight into the other
transport (no coroutine per chunk), carry half-close and apply backpressure both ways."""
from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.gatewayd.sockets import set_nodelay
from services.gatewayd.tls_lane import TlsPump, TlsSetup

if TYPE_CHECKING:
    from services.gatewayd.tunnels import TunnelService

WRITE_HIGH_WATER = 1 << 20    # of the QUIC lane's splice
WRITE_LOW_WATER = 256 << 10


@dataclass
class PeerStats:
    lane: str = ""
    bytes_in: int = 0       # received from the peer through tunnels
    bytes_out: int = 0      # sent to the peer through tunnels
    streams: int = 0        # tunnels open now, either direction
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # pump threads count too


class Splice:
    """A local TCP connection joined to a tunnel: a TlsPump (TLS lane) or a transport (QUIC lane)."""

    def __init__(self, service: "TunnelService", peer_id: str, stats: PeerStats, forward_port: int | None):
        self.service = service
        self.peer_id = peer_id
        self.stats = stats
        self.forward_port = forward_port
        self.kind = ""  # of a tunnel a peer opened to us: what it reaches here
        self.local_sock: socket.socket | None = None  # the local connection until a lane takes it
        self.local: asyncio.Transport | None = None
        self.remote: asyncio.Transport | None = None
        self.pump: TlsPump | None = None
        self.local_side = SpliceSide(self, is_remote=False)
        self.remote_side = SpliceSide(self, is_remote=True)
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
            with self.stats.lock:
                self.stats.bytes_out += len(data)
            remote.write(data)
        if self.local_side.eof and not self.remote.is_closing():
            remote.write_eof()
        if self.local_side.lost:
            self.close(abort=True)
            return
        self.local.resume_reading()

    def attach_pump(self, setup: TlsSetup) -> None:
        """Start copying between the local socket and an authenticated TLS connection."""
        assert self.local_sock is not None
        local, self.local_sock = self.local_sock, None
        self.pump = TlsPump(self, setup, local)
        self.stats.streams += 1
        self.counted = True
        self.pump.start()

    def pump_finished(self) -> None:
        self.close(abort=False)  # both directions ended and the pump closed its sockets

    def close(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.setup_task is not None and not self.setup_task.done():
            self.setup_task.cancel()
        if self.pump is not None:
            self.pump.abort()  # nothing left to do when it is the pump that finished
        if self.local_sock is not None:
            self.local_sock.close()
            self.local_sock = None
        for transport in (self.local, self.remote):
            if transport is not None:
                transport.abort() if abort else transport.close()
        if self.counted:
            self.stats.streams -= 1
            self.counted = False
        self.service._splices.discard(self)


class SpliceSide(asyncio.Protocol):
    """The protocol of one transport of a splice: what it receives is written to `peer`."""

    __slots__ = ("splice", "is_remote", "peer", "eof", "lost", "pending")

    def __init__(self, splice: Splice, *, is_remote: bool):
        self.splice = splice
        self.is_remote = is_remote
        self.peer: asyncio.Transport | None = None
        self.eof = False
        self.lost = False
        self.pending: list[bytes] = []  # local bytes that raced ahead of the tunnel setup

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.is_remote:
            self.splice.local = transport  # type: ignore[assignment]
            set_nodelay(transport.get_extra_info("socket"))
            transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)  # type: ignore[attr-defined]
            if self.peer is None:
                transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.pending.append(data)
            return
        stats = self.splice.stats
        with stats.lock:
            if self.is_remote:
                stats.bytes_in += len(data)
            else:
                stats.bytes_out += len(data)
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
