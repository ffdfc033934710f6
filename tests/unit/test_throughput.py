"""The decode rate of recent requests from llama-server's /metrics counters, and where it is shown."""
import time

from common.messages import DecodeRate, RunnerState
from meshctl.cli import render_status
from services.runnerd.throughput import DecodeWatch, decode_totals, recent_rate

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


def test_the_decode_figure_is_the_serving_llama_servers_and_goes_when_another_one_starts():
    watch = DecodeWatch()
    assert watch.read(100, METRICS.format(tokens=10, seconds=1.0), at=1.0) == DecodeRate()  # nothing to compare yet
    shown = watch.read(100, METRICS.format(tokens=70, seconds=3.0), at=2.0)
    assert (shown.tokens, shown.tok_s, shown.at) == (60, 30.0, 2.0)
    assert watch.read(100, METRICS.format(tokens=70, seconds=3.0), at=3.0) == shown  # idle: the figure stays
    assert watch.read(100, None, at=4.0) == shown  # one unreadable /metrics: still this llama-server's
    # llama-server restarted (a new plan, or it died): a new pid, its counters from zero, the old figure gone.
    # Even counters that happen to have grown are not compared across the two processes.
    assert watch.read(200, METRICS.format(tokens=90, seconds=3.5), at=5.0) == DecodeRate()
    shown = watch.read(200, METRICS.format(tokens=110, seconds=4.5), at=6.0)
    assert (shown.tokens, shown.tok_s) == (20, 20.0)
    assert watch.read(None, None, at=7.0) == DecodeRate()  # none serves (a worker now, or starting again)
    assert watch.read(200, METRICS.format(tokens=110, seconds=4.5), at=8.0) == DecodeRate()


def test_status_shows_the_decode_rate():
    runner = RunnerState(decode=DecodeRate(tok_s=31.25, tokens=60, at=time.time() - 3))
    text = render_status({"meshd": {"node_id": "n"}, "electd": {}, "runnerd": runner.model_dump(), "gatewayd": {}})
    assert "decode: 31.2 tok/s (recent requests: 60 tokens, 3 s ago)" in text
    text = render_status({"meshd": {"node_id": "n"}, "electd": {}, "runnerd": RunnerState().model_dump(), "gatewayd": {}})
    assert "decode:" not in text
