"""Flow control: receive windows that slide with what the application consumed (aioquic's own
double whatever arrives), and pacing off for sub-millisecond paths."""
from __future__ import annotations

from typing import Any

from aioquic.quic.connection import QuicConnection


class WindowedQuicConnection(QuicConnection):
    """aioquic grows receive windows by doubling them as data arrives, whether or not the
    application has read it, so a slow reader buffers without bound. Here the windows slide:
    a stream's credit is what was delivered plus `stream_window`, and it stops growing while the
    stream's reader is paused. (Overrides two private methods of aioquic 1.7.)"""

    def __init__(self, *args: Any, stream_window: int, connection_window: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.read_paused: set[int] = set()

    def _write_stream_limits(self, builder, space, stream) -> None:  # noqa: ANN001 (aioquic types)
        local = stream.max_stream_data_local
        if local and stream.stream_id not in self.read_paused:
            delivered = stream.receiver.starting_offset()
            if local - delivered < self.stream_window // 2:
                stream.max_stream_data_local = delivered + self.stream_window
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(0x11,  # MAX_STREAM_DATA
                                      capacity=1 + 8 + 8,
                                      handler=self._on_max_stream_data_delivery,
                                      handler_args=(stream,))
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def _write_connection_limits(self, builder, space) -> None:  # noqa: ANN001
        max_data = self._local_max_data
        if max_data.value - max_data.used < self.connection_window // 2:
            max_data.value = max_data.used + self.connection_window
        for limit in (max_data, self._local_max_streams_bidi, self._local_max_streams_uni):
            if limit is not max_data and limit.sent - limit.used >= limit.value - limit.sent:
                continue  # batch MAX_STREAMS, as aioquic does
            if limit.value != limit.sent:
                buf = builder.start_frame(limit.frame_type, capacity=1 + 8,
                                          handler=self._on_connection_limit_delivery,
                                          handler_args=(limit,))
                buf.push_uint_var(limit.value)
                limit.sent = limit.value



def disable_pacing(quic: QuicConnection) -> None:
    # Pacing timers fire at epoll's 1 ms granularity, which throttles sub-ms paths; the
    # socket buffers absorb the bursts instead.
    pacer = quic._loss._pacer  # noqa: SLF001
    pacer.update_rate = lambda congestion_window, smoothed_rtt: None  # type: ignore[method-assign]
