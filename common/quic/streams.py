"""The asyncio adapter: one bidirectional QUIC stream as an `asyncio.Transport`."""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from common.quic.limits import STREAM_ABORTED, WRITE_HIGH_WATER, WRITE_LOW_WATER

if TYPE_CHECKING:
    from common.quic.connection import QuicPeerConnection

log = logging.getLogger("mesh.quic")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"]


class QuicStreamTransport(asyncio.Transport):
    """One bidirectional QUIC stream as an asyncio Transport.

    Half-close works as with TCP (`write_eof`); `pause_reading` withholds flow-control credit
    from the peer; the protocol's `pause_writing`/`resume_writing` follow the amount of data
    written but not yet acknowledged. `set_protocol` may switch a stream that was handed out as
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
        self._quic_stream: Any = None  # aioquic's QuicStream, once it exists
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
        except (ValueError, RuntimeError):  # the stream was reset or finished under us
            self._write_broken = True
            return
        self._connection._schedule_transmit()
        if not self._writing_paused and self.get_write_buffer_size() > self._high_water:
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
            except (ValueError, RuntimeError):
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
        except (ValueError, RuntimeError):
            pass
        if not self._eof_received:
            self._stop_receiving()
        self._connection._schedule_transmit()
        self._lose(None)

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._quic.read_paused.add(self.stream_id)

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._quic.read_paused.discard(self.stream_id)
            self._connection._schedule_transmit()  # so the MAX_STREAM_DATA goes out now

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water = WRITE_HIGH_WATER if high is None else high
        self._low_water = min(self._high_water, self._high_water // 4 if low is None else low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def get_write_buffer_size(self) -> int:
        if self._write_broken:
            return 0
        stream = self._quic_stream
        if stream is None:
            stream = self._quic_stream = self._quic._streams.get(self.stream_id)  # noqa: SLF001
            if stream is None:
                return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start  # noqa: SLF001 (unacknowledged bytes)

    # -- driven by the connection ------------------------------------------------------------

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if self._lost or self._closing:
            return
        if data:
            self._protocol.data_received(data)  # type: ignore[attr-defined]
        if end_stream and not self._eof_received:
            self._eof_received = True
            self._protocol.eof_received()  # type: ignore[attr-defined]
            if self._write_broken:  # both directions are over
                self._connection._loop.call_soon(self._lose, None)

    def _on_acked(self) -> None:
        if self._writing_paused and self.get_write_buffer_size() <= self._low_water:
            self._writing_paused = False
            self._connection._drain_watch.discard(self)
            if not self._lost:
                self._protocol.resume_writing()

    def _on_reset(self) -> None:
        self._eof_received = True
        self._lose(ConnectionResetError(f"QUIC stream {self.stream_id} reset by the peer"))

    def _on_stop_sending(self) -> None:
        # aioquic has already reset our sending side: later writes are dropped (as asyncio does
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
        except ValueError:
            pass
        self._quic.read_paused.discard(self.stream_id)
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
        self._quic.read_paused.discard(self.stream_id)
        try:
            self._protocol.connection_lost(exc)
        except Exception:  # a user protocol's bug must not take the connection down
            log.exception("stream protocol failed in connection_lost")

