"""The decode rate of recent requests from llama-server's /metrics counters, and where it is shown."""
import time

from common.messages import DecodeRate, RunnerState
from meshctl.cli import render_status
from services.runnerd.throughput import decode_totals, recent_rate

METRICS = ("# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n"
           "# TYPE llamacpp:tokens_predicted_total counter\n"
           "llamacpp:tokens_predicted_total {tokens}\n"
           "llamacpp:tokens_predicted_seconds_total {seconds}\n"
           "llamacpp:prompt_tokens_total 50\n")


def test_totals_from_prometheus_text():
    assert decode_totals(METRICS.format(tokens=120, seconds=4.0)) == (120.0, 4.0)
    assert decode_totals("llamacpp:prompt_tokens_total 5\n") is None


def test_rate_of_the_requests_that_ended_between_two_reads():
    assert recent_rate((100, 2.0), (160, 4.0)) == (60, 30.0)
    assert recent_rate((160, 4.0), (160, 4.0)) is None  # nothing ended: keep the last figure
    assert recent_rate((160, 4.0), (10, 0.5)) is None   # a new llama-server: its counters started over
    assert recent_rate(None, (10, 0.5)) is None          # the first read has nothing to compare with


def test_status_shows_the_decode_rate():
    runner = RunnerState(decode=DecodeRate(tok_s=31.25, tokens=60, at=time.time() - 3))
    text = render_status({"meshd": {"node_id": "n"}, "electd": {}, "runnerd": runner.model_dump(), "gatewayd": {}})
    assert "decode: 31.2 tok/s (recent requests: 60 tokens, 3 s ago)" in text
    text = render_status({"meshd": {"node_id": "n"}, "electd": {}, "runnerd": RunnerState().model_dump(), "gatewayd": {}})
    assert "decode:" not in text
