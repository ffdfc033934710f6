"""The asyncio adapter: one bidirectional QUIC stream as an `asyncio.Transport`."""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from qh3.quic.connection import QuicConnectionError

from common.quic.limits import (STREAM_ABORTED, STREAM_CREDIT_STEP, STREAM_RECEIVE_WINDOW, WRITE_HIGH_WATER,
                                WRITE_LOW_WATER)

if TYPE_CHECKING:
    from common.quic.connection import QuicPeerConnection

log = logging.getLogger("mesh.quic")

# What qh3 raises for an operation on a stream that was reset or finished under us.
_STREAM_GONE = (ValueError, RuntimeError, AssertionError, QuicConnectionError)

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"]


class QuicStreamTransport(asyncio.Transport):
    """One bidirectional QUIC stream as an asyncio Transport.

    Half-close works as with TCP (`write_eof`); `pause_reading` holds what arrives until
    `resume_reading`, and stops crediting the peer (the connection's stream credit); the protocol's
    `pause_writing`/`resume_writing` follow the data written but not yet sent, and the data the
    peer's reader has not consumed yet. `set_protocol` may switch a stream that was handed out as
    a StreamReader/StreamWriter pair to a protocol (bytes the reader still held are replayed
    into the new protocol) — the tunnels splice that way, without a coroutine per chunk.
    """

    def __init__(self, connection: "QuicPeerConnection", stream_id: int, protocol: asyncio.BaseProtocol):
        super().__init__()
        self._connection = connection
        self._quic = connection._quic
        self.stream_id = stream_id
        self._protocol = protocol
        self._reader: asyncio.StreamReader | None = None
        self._high_water = WRITE_HIGH_WATER
        self._low_water = WRITE_LOW_WATER
        self._writing_paused = False
        self._reading_paused = False
        self._eof_sent = False
        self._eof_received = False
        self._write_broken = False    # peer stopped reading / stream reset: writes are dropped
        self._closing = False
        self._lost = False
        self._held: list[bytes] = []   # data that arrived while reading was paused
        self._held_eof = False
        self._written = 0         # bytes written, and how many of them the peer's reader consumed
        self._peer_consumed = 0
        self._consumed = 0        # bytes our protocol took, and how many the peer was told of
        self._reported = 0
        self._writer_ref: weakref.ref | None = None
        self._writer_keepalive: asyncio.StreamWriter | None = None

    # -- asyncio.Transport -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "stream_id":
            return self.stream_id
        if name == "peername":
            return self._connection.remote_address
        if name == "peer_node_id":
            return self._connection.peer_node_id
        if name == "quic_connection":
            return self._connection
        return default

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        reader, self._reader = self._reader, None
        self._protocol = protocol
        # asyncio's StreamWriter closes its transport when garbage-collected; once a protocol
        # drives the stream, the writer that was handed out must not do that.
        self._writer_keepalive = self._writer_ref() if self._writer_ref is not None else None
        if reader is None:
            return
        # Replay what the StreamReader held but nobody read (asyncio keeps it in `_buffer`).
        leftover = bytes(reader._buffer)  # noqa: SLF001
        reader._buffer.clear()  # noqa: SLF001
        if leftover:
            protocol.data_received(leftover)  # type: ignore[attr-defined]
        if reader.at_eof() or self._eof_received:
            protocol.eof_received()  # type: ignore[attr-defined]
        if self._reading_paused:
            self.resume_reading()  # the StreamReader's pause no longer applies

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost or self._write_broken or not data:
            return  # like asyncio's transports: writes after close/loss are dropped
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        try:
            self._quic.send_stream_data(self.stream_id, data)
        except _STREAM_GONE:  # the stream was reset or finished under us
            self._write_broken = True
            return
        self._written += len(data)
        self._connection._schedule_transmit()
        if not self._writing_paused and (self.get_write_buffer_size() > self._high_water or (
                self._written - self._peer_consumed > STREAM_RECEIVE_WINDOW and self._connection.peer_reports_credit)):
            self._writing_paused = True
            self._connection._drain_watch.add(self)
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent or self._lost:
            return
        self._eof_sent = True
        if not self._write_broken:
            try:
                self._quic.send_stream_data(self.stream_id, b"", end_stream=True)
            except _STREAM_GONE:
                self._write_broken = True
            self._connection._schedule_transmit()

    def close(self) -> None:
        """Send FIN (queued data still goes out) and stop receiving; the protocol is told
        `connection_lost(None)` right away."""
        if self._closing or self._lost:
            return
        self._closing = True
        if not self._eof_sent:
            self.write_eof()
        if not self._eof_received:
            self._stop_receiving()
        self._connection._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        try:
            self._quic.reset_stream(self.stream_id, STREAM_ABORTED)
        except _STREAM_GONE:
            pass
        if not self._eof_received:
            self._stop_receiving()
        self._connection._schedule_transmit()
        self._lose(None)

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._held or self._held_eof:
            # Later, as a socket transport would: StreamReader resumes us and only then waits.
            self._connection._loop.call_soon(self._deliver_held)

    def _deliver_held(self) -> None:
        while self._held and not self._reading_paused:
            if self._lost or self._closing:
                return
            data = self._held.pop(0)
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            self._count_consumed(len(data))
        if self._held_eof and not self._held and not self._reading_paused:
            self._held_eof = False
            self._on_data(b"", True)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = WRITE_HIGH_WATER if high is None else high
        self._low_water = min(self._high_water, self._high_water // 4 if low is None else low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def get_write_buffer_size(self) -> int:
        if self._write_broken or self._lost:
            return 0
        try:
            return self._quic.get_send_buffer_size(self.stream_id)  # queued, not yet sent
        except _STREAM_GONE:
            return 0

    # -- driven by the connection ------------------------------------------------------------

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if self._lost or self._closing:
            return
        if self._reading_paused or self._held:  # held data goes first
            if data:
                self._held.append(data)
            self._held_eof = self._held_eof or end_stream
            return
        if data:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
            self._count_consumed(len(data))
        if end_stream and not self._eof_received:
            self._eof_received = True
            self._protocol.eof_received()  # type: ignore[attr-defined]
            if self._write_broken:  # both directions are over
                self._connection._loop.call_soon(self._lose, None)

    def _count_consumed(self, n: int) -> None:
        self._consumed += n
        if self._consumed - self._reported >= STREAM_CREDIT_STEP:
            self._reported = self._consumed
            self._connection._report_consumed(self.stream_id, self._consumed)

    def _on_credit(self, consumed: int) -> None:
        if consumed > self._peer_consumed:
            self._peer_consumed = consumed
            self._on_sent()

    def _on_sent(self) -> None:
        if (self._writing_paused and self.get_write_buffer_size() <= self._low_water
                and (self._written - self._peer_consumed <= STREAM_RECEIVE_WINDOW // 2
                     or not self._connection.peer_reports_credit)):
            self._writing_paused = False
            self._connection._drain_watch.discard(self)
            if not self._lost:
                self._protocol.resume_writing()

    def _on_reset(self) -> None:
        self._eof_received = True
        self._lose(ConnectionResetError(f"QUIC stream {self.stream_id} reset by the peer"))

    def _on_stop_sending(self) -> None:
        # qh3 has already reset our sending side: later writes are dropped (as asyncio does
        # for a closed socket) and a blocked drain() is released. Reading goes on: the peer may
        # still be sending, and its FIN or RESET ends the stream.
        self._write_broken = True
        if self._writing_paused:
            self._writing_paused = False
            self._connection._drain_watch.discard(self)
            self._protocol.resume_writing()
        if self._eof_received:
            self._connection._loop.call_soon(self._lose, None)

    def _on_connection_lost(self, reason: str) -> None:
        # A stream whose FIN arrived has all its data: end it cleanly so buffered bytes stay readable.
        self._lose(None if self._eof_received else ConnectionResetError(reason))

    def _stop_receiving(self) -> None:
        try:
            self._quic.stop_stream(self.stream_id, STREAM_ABORTED)
        except _STREAM_GONE:
            pass
        self._held.clear()
        self._connection._schedule_transmit()

    def _lose(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._reader = None
        self._writer_keepalive = None
        self._connection._drain_watch.discard(self)
        self._connection._forget_stream(self.stream_id)
        self._held.clear()
        try:
            self._protocol.connection_lost(exc)
        except Exception:  # a user protocol's bug must not take the connection down
            log.exception("stream protocol failed in connection_lost")

