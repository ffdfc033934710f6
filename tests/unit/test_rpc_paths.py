"""The host's path to each worker (direct TLS or tunnel) and a worker's TLS allow file — runnerd's policy."""
import asyncio

import pytest

from common.messages import Announcement, Plan, PlanMember
from services.runnerd.commands import NotReady
from services.runnerd.rpc_allow import allow_text, must_recycle, write_allow_file
from services.runnerd.rpc_paths import (DIRECT_FAILURES_MAX, DirectPaths, count_failures, direct_key, direct_outcome,
                                        first_connecting, member_path)

PLAN = Plan(state="split", host="h", key="k1", members=[PlanMember(node_id="h", memory_bytes=1, ratio=0.5),
                                                        PlanMember(node_id="w", memory_bytes=1, ratio=0.5)])


def ann(node_id: str, tls: list) -> Announcement:
    return Announcement(node_id=node_id, seq=1, role="worker", version="t", rpc_tls=tls)


def test_a_direct_check_is_valid_for_one_plan_and_one_set_of_announced_addresses():
    assert direct_key("k1", "w", ann("w", [("10.0.0.2", 5000)])) == ("k1", "w", (("10.0.0.2", 5000),))
    assert direct_key("k1", "w", ann("w", [])) is None  # no TLS rpc-server: the tunnel, no check
    assert direct_key("k1", "w", None) is None


def test_a_worker_that_connects_is_dialed_directly_until_llama_server_fails_twice_through_it():
    key = ("k1", "w", (("10.0.0.2", 5000),))
    assert direct_outcome(key, ("10.0.0.2", 5000), 0)[0] == ("10.0.0.2", 5000)
    assert direct_outcome(key, ("10.0.0.2", 5000), DIRECT_FAILURES_MAX - 1)[0] == ("10.0.0.2", 5000)
    found, why = direct_outcome(key, ("10.0.0.2", 5000), DIRECT_FAILURES_MAX)
    assert found is None and "failed 2 times in a row" in why
    found, why = direct_outcome(key, None, 0)
    assert found is None and why == "no answer from 10.0.0.2:5000 in 1 s"


def test_only_workers_reached_directly_count_a_llama_server_failure():
    failures = count_failures({}, "k1", {"w": "direct TLS 10.0.0.2:5000", "v": "tunnel, TLS inside"})
    assert failures == {("k1", "w"): 1}
    assert count_failures(failures, "k1", {"w": "direct TLS 10.0.0.2:5000"}) == {("k1", "w"): 2}


def test_a_members_endpoint_waits_for_its_check_and_needs_a_build_with_tls():
    key = ("k1", "w", (("10.0.0.2", 5000),))
    with pytest.raises(NotReady, match="checking the direct path to w"):
        member_path("w", key, {}, 4001, build_has_tls=True)
    with pytest.raises(NotReady, match="has none"):
        member_path("w", key, {key: None}, 4001, build_has_tls=False)
    assert member_path("w", key, {key: ("10.0.0.2", 5000)}, 4001, build_has_tls=True) == \
        ("w@10.0.0.2:5000", "direct TLS 10.0.0.2:5000")
    assert member_path("w", key, {key: None}, 4001, build_has_tls=True) == ("w@127.0.0.1:4001", "tunnel, TLS inside")
    assert member_path("w", None, {}, 4001, build_has_tls=False) == ("127.0.0.1:4001", "tunnel")
    assert member_path("w", None, {}, None, build_has_tls=True) == (None, "tunnel")  # no path yet


def test_direct_paths_checks_once_per_plan_and_two_failures_send_a_worker_to_its_tunnel():
    async def scenario():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        peers = {"w": ann("w", [("127.0.0.1", port)])}
        paths = DirectPaths()
        assert await paths.check(PLAN, "h", peers)
        assert not await paths.check(PLAN, "h", peers)  # known: not checked again in this plan
        assert paths.endpoints(PLAN, "h", peers, {"w": 4001}, build_has_tls=True) == \
            ({"w": f"w@127.0.0.1:{port}"}, {"w": f"direct TLS 127.0.0.1:{port}"})
        for _ in range(DIRECT_FAILURES_MAX):
            paths.llama_failed("k1", {"w": f"direct TLS 127.0.0.1:{port}"})
            assert paths.wanted.is_set()
            assert await paths.check(PLAN, "h", peers)
        assert paths.endpoints(PLAN, "h", peers, {"w": 4001}, build_has_tls=True)[1] == {"w": "tunnel, TLS inside"}
        paths.llama_ready("k1")  # served: the count starts over
        assert paths.failures == {}
        server.close()
        assert await first_connecting((("127.0.0.1", port),), timeout=0.5) is None
    asyncio.run(scenario())


def test_the_rpc_server_starts_afresh_only_when_a_host_it_admitted_is_no_longer_allowed():
    assert allow_text(["h"]) == "h\n" and allow_text([]) == ""
    assert must_recycle("h\n", [])  # the host lost its place: its open connection must end
    assert must_recycle("h\n", ["h2"])  # another host
    assert not must_recycle("", ["h"])  # a host gained: nothing open to end
    assert not must_recycle("h\n", ["h"])


def test_the_allow_file_is_rewritten_only_when_it_changes(tmp_path):
    allow = tmp_path / "rpc-allow"
    assert not write_allow_file(allow, ["h"])
    assert allow.read_text() == "h\n"
    assert not write_allow_file(allow, ["h"])
    assert write_allow_file(allow, [])
    assert allow.read_text() == "" and not (tmp_path / "rpc-allow.tmp").exists()


def test_a_worker_refusing_the_hosts_certificate_does_not_send_it_to_the_tunnel():
    # Its allow file lags the plan; the tunnel would reach the same TLS rpc-server and be refused alike.
    tail = "rpc-tls: recv failed: error:0A000410:SSL routines::sslv3 alert handshake failure | ggml-rpc.cpp:515"
    failures = {}
    for _ in range(DIRECT_FAILURES_MAX + 1):
        failures = count_failures(failures, "k1", {"w": "direct TLS 10.0.0.2:5000"}, tail)
    assert failures == {}
    assert count_failures(failures, "k1", {"w": "direct TLS 10.0.0.2:5000"}, "other crash") == {("k1", "w"): 1}
