"""Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON
holding one object. Used for every handshake/control exchange on QUIC streams and tunnels.

`read_frame`/`write_frame`/`send_frame` work on asyncio StreamReader/StreamWriter-like objects;
`FrameDecoder` is the same parser without I/O, for protocol-based code. Bad input raises
`FrameError` with a clear message: a claimed length is checked against the limit before anything
is read or allocated, so a hostile peer cannot make us hang on or reserve a huge frame.
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

DEFAULT_MAX_FRAME_BYTES = 1 << 20
_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size


class FrameError(Exception):
    """A frame that is oversized, truncated or not a JSON object."""


class FrameEOF(FrameError):
    """The stream ended cleanly before the first byte of a frame."""


def encode_frame(obj: dict) -> bytes:
    if not isinstance(obj, dict):
        raise TypeError(f"a frame holds a JSON object, not {type(obj).__name__}")
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return _HEADER.pack(len(body)) + body


def _check_length(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes is larger than the {max_bytes}-byte limit")


def decode_body(body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"frame is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame holds a JSON {type(obj).__name__}, expected an object")
    return obj


async def read_frame(reader: Any, max_bytes: int = DEFAULT_MAX_FRAME_BYTES, *,
                     timeout: float | None = None) -> dict:
    """Read one frame. FrameEOF on a clean end of stream before it, FrameError on anything bad;
    with `timeout`, asyncio.TimeoutError if the peer stalls (a stalled peer is otherwise waited on)."""
    if timeout is not None:
        return await asyncio.wait_for(read_frame(reader, max_bytes), timeout)
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise FrameEOF("stream closed before a frame") from None
        raise FrameError(f"stream closed inside a frame header ({len(exc.partial)} of 4 bytes)") from None
    (length,) = _HEADER.unpack(header)
    _check_length(length, max_bytes)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"stream closed after {len(exc.partial)} of {length} frame bytes") from None
    return decode_body(body)


def write_frame(writer: Any, obj: dict) -> None:
    writer.write(encode_frame(obj))


async def send_frame(writer: Any, obj: dict) -> None:
    writer.write(encode_frame(obj))
    await writer.drain()


class FrameDecoder:
    """Incremental frame parser: `feed()` bytes, get complete frames; `take_rest()` returns
    what follows the frames consumed so far (e.g. raw bytes once a handshake is over)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._buffer = bytearray()
        self._max_bytes = max_bytes

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> dict | None:
        """The next complete frame, None if more bytes are needed; FrameError if bad."""
        if len(self._buffer) < HEADER_BYTES:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        _check_length(length, self._max_bytes)
        end = HEADER_BYTES + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER_BYTES:end])
        del self._buffer[:end]
        return decode_body(body)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_rest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest
