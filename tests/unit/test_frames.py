"""Length-prefixed JSON frames: round trips, and bad input failing fast and clearly."""
from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.frames import (
    FrameDecoder,
    FrameEOF,
    FrameError,
    encode_frame,
    read_frame,
    send_frame,
    write_frame,
)


def run(coro):
    return asyncio.run(coro)


def reader_with(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


class ListWriter:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.drained = 0

    def write(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    async def drain(self) -> None:
        self.drained += 1


def test_round_trip_several_frames() -> None:
    async def main():
        writer = ListWriter()
        write_frame(writer, {"a": 1})
        await send_frame(writer, {"b": "ü", "c": [1, 2, {"d": None}]})
        assert writer.drained == 1
        reader = reader_with(b"".join(writer.chunks))
        assert await read_frame(reader) == {"a": 1}
        assert await read_frame(reader) == {"b": "ü", "c": [1, 2, {"d": None}]}
        with pytest.raises(FrameEOF):
            await read_frame(reader)
    run(main())


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    async def main():
        # Only the header arrives and the stream stays open: reading the body would hang, and a
        # claimed 4 GiB must not be allocated. The check on the header must answer at once.
        reader = reader_with(struct.pack(">I", 0xFFFFFFFF), eof=False)
        with pytest.raises(FrameError, match="larger than"):
            await asyncio.wait_for(read_frame(reader, max_bytes=1024), 1.0)
    run(main())


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"[1, 2]", "expected an object"),
    (b'"text"', "expected an object"),
    (b"NaN", "expected an object"),
])
def test_malformed_frames(body: bytes, message: str) -> None:
    async def main():
        with pytest.raises(FrameError, match=message):
            await read_frame(reader_with(struct.pack(">I", len(body)) + body))
    run(main())


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "inside a frame header"),
    (struct.pack(">I", 10) + b"{}", "after 2 of 10"),
])
def test_truncated_frames(data: bytes, message: str) -> None:
    async def main():
        with pytest.raises(FrameError, match=message) as info:
            await read_frame(reader_with(data))
        assert not isinstance(info.value, FrameEOF)
    run(main())


def test_stalled_peer_times_out_when_asked() -> None:
    async def main():
        reader = reader_with(struct.pack(">I", 10) + b"{", eof=False)
        with pytest.raises(asyncio.TimeoutError):
            await read_frame(reader, timeout=0.05)
    run(main())


def test_encode_refuses_non_objects() -> None:
    with pytest.raises(TypeError):
        encode_frame([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_frame({"x": float("nan")})


def test_decoder_incremental_and_rest() -> None:
    decoder = FrameDecoder()
    data = encode_frame({"a": 1}) + encode_frame({"b": 2}) + b"raw bytes after"
    for i in range(len(data)):  # one byte at a time
        decoder.feed(data[i:i + 1])
    assert decoder.next_frame() == {"a": 1}
    assert decoder.next_frame() == {"b": 2}
    assert decoder.take_rest() == b"raw bytes after"
    assert decoder.buffered == 0


def test_decoder_refuses_oversized_before_buffering_the_body() -> None:
    decoder = FrameDecoder(max_bytes=100)
    decoder.feed(struct.pack(">I", 101))
    with pytest.raises(FrameError, match="larger than the 100-byte limit"):
        decoder.next_frame()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**53, max_value=2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=5), min_size=1, max_size=4),
       st.integers(min_value=1, max_value=64))
def test_any_objects_round_trip_in_any_chunking(objects: list[dict], chunk: int) -> None:
    data = b"".join(encode_frame(o) for o in objects)
    decoder = FrameDecoder()
    decoded = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i:i + chunk])
        while (frame := decoder.next_frame()) is not None:
            decoded.append(frame)
    assert decoded == objects

    async def via_reader():
        reader = reader_with(data)
        return [await read_frame(reader) for _ in objects]
    assert run(via_reader()) == objects
