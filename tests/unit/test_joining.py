"""A --join whose inviter is not up yet is retried with a bounded back-off (services/meshd/joining.py)."""
from __future__ import annotations

from services.meshd.joining import join_retry_delay, keep_retrying_join


def test_a_failed_join_is_retried_after_5_then_up_to_30_seconds() -> None:
    delays = [join_retry_delay(n) for n in range(1, 9)]
    assert delays[0] == 5.0
    assert delays == sorted(delays) and max(delays) == 30.0 and delays[-1] == 30.0


def test_only_an_unreachable_inviter_is_retried_and_only_while_the_node_has_not_moved_on() -> None:
    start, token = "mesh-alone", "mesh-token"
    assert keep_retrying_join(True, token, start, start, connected_in_token_mesh=False)
    assert not keep_retrying_join(False, token, start, start, False)  # refused or a bad token: waiting won't help
    assert not keep_retrying_join(True, token, start, "mesh-other", False)  # meshctl leave / another join
    assert not keep_retrying_join(True, token, start, token, connected_in_token_mesh=True)  # joined
    assert keep_retrying_join(True, token, token, token, connected_in_token_mesh=False)  # a member restarting alone


def test_status_text_says_when_a_join_is_retried() -> None:
    from common.messages import JoinRetry
    from meshctl.cli import join_failed_line, render_status
    retry = JoinRetry(node_id="c" * 64, addrs=[("192.0.2.7", 4433)], attempts=2, retry_in_s=9.6, error="no answer")
    text = render_status({"meshd": {"node_id": "a" * 64, "peers": [], "joining": [retry.model_dump()]},
                          "electd": {}, "runnerd": {}, "gatewayd": {}})
    assert "joining: retrying 192.0.2.7:4433 in 10 s (2 failed)" in text, text
    assert "keeps retrying" in join_failed_line("cannot reach the inviting node", True)
    assert "meshctl join TOKEN" in join_failed_line("the mesh refused this node", False)
