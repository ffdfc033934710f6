"""The decode rate of recent requests, from llama-server's Prometheus /metrics.

llama-server adds a request's generated tokens and its generation time to two counters when the
request ends (finished or stopped). Between two reads, the counters' growth is therefore the rate of
the requests that ended in between, whoever sent them: this node's API, the console, a lite client
through the tunnel.
"""
from __future__ import annotations

import re

from common.messages import DecodeRate

TOTALS = re.compile(r"^llamacpp:(tokens_predicted_total|tokens_predicted_seconds_total)\s+(\S+)", re.MULTILINE)


def decode_totals(metrics_text: str) -> tuple[float, float] | None:
    """(tokens generated, seconds spent generating them) since llama-server started; None if not reported."""
    found = {name: float(value) for name, value in TOTALS.findall(metrics_text)}
    if len(found) < 2:
        return None
    return found["tokens_predicted_total"], found["tokens_predicted_seconds_total"]


def recent_rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> tuple[int, float] | None:
    """(tokens, tok/s) of the requests that ended between two reads; None when none did (or the
    counters started over: a new llama-server)."""
    if before is None or after is None:
        return None
    tokens, seconds = after[0] - before[0], after[1] - before[1]
    if tokens <= 0 or seconds <= 0:
        return None
    return int(tokens), tokens / seconds


class DecodeWatch:
    """The decode figure to publish, read by read: the serving llama-server's own. A restarted llama-server
    (another pid: a new plan, a crash) starts its counters over, and the old one's figure is no longer
    news about this one; nor is any figure while none serves."""

    def __init__(self) -> None:
        self.server: int | None = None  # pid of the llama-server the counters are from
        self.totals: tuple[float, float] | None = None
        self.rate = DecodeRate()

    def read(self, server: int | None, metrics_text: str | None, at: float) -> DecodeRate:
        """The figure after a read of `server`'s /metrics (`metrics_text`; None: unreadable this time),
        `server` None when no llama-server serves."""
        if server != self.server:
            self.server, self.totals, self.rate = server, None, DecodeRate()
        if server is None or metrics_text is None:
            return self.rate
        now = decode_totals(metrics_text)
        rate = recent_rate(self.totals, now)
        self.totals = now
        if rate:
            self.rate = DecodeRate(tokens=rate[0], tok_s=rate[1], at=at)
        return self.rate
