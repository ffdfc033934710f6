"""Three nodes on one machine: A and B hold the model, C is a lite client; the split is forced over A and B.
A's API requires a key, which lite clients (served through A's members' API) need not know."""
from __future__ import annotations

import asyncio
import json
import stat
import threading
import time

import httpx
import pytest

from common import addresses
from common.identity import NodeIdentity
from services.gatewayd.tunnels import PeerDataAddrs, TunnelService
from tests.integration.harness import Node
from tests.support.procs import kill_process_tree, wait_for_condition, wait_until

pytestmark = pytest.mark.slow
PROMPT = "Name three colours."


def plan_of(node: Node) -> dict:
    return node.status().get("electd", {})


def split_members(node: Node) -> list[str]:
    plan = plan_of(node)
    return [m["node_id"] for m in plan.get("members", [])] if plan.get("state") == "split" else []


def serving_answer(node: Node) -> str | None:
    try:
        return node.chat(PROMPT, max_tokens=16)
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    a = Node(root / "a", extra=["--split", "--max-vram", "8G", "--bind-host", "127.0.0.1", "--api-key", "a-key"])
    b = Node(root / "b", extra=["--split", "--max-vram", "4G", "--bind-host", "127.0.0.1"])
    c = Node(root / "c", extra=["--client", "--bind-host", "127.0.0.1"])
    nodes = [a, b, c]
    try:
        a.start()
        token = a.token()
        started = time.monotonic()
        b.start("--join", token)
        ids = {"a": a.node_id(), "b": b.node_id()}
        wait_until(lambda: sorted(split_members(a)) == sorted(ids.values()), timeout=240, interval=0.5,
                   what="A to plan a split over A and B")
        wait_until(lambda: serving_answer(a), timeout=240, interval=0.5, what="A serving the split")
        print(f"join → serving the split in {time.monotonic() - started:.1f} s")
        yield {"a": a, "b": b, "c": c, "ids": ids, "token": token}
    finally:
        for n in nodes:
            n.stop()


def test_client_joins_without_restarting_llama_server_and_all_answer_alike(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    llama_pid = a.runner()["llama"]["pid"]
    c.start("--join", mesh["token"])
    b.wait_serving(timeout=120)
    c.wait_serving(timeout=120)
    answers = {name: serving_answer(n) for name, n in (("a", a), ("b", b), ("c", c))}
    assert answers["a"] and answers["a"] == answers["b"] == answers["c"], answers
    assert a.runner()["llama"]["pid"] == llama_pid, "a lite client joining restarted llama-server"
    # The host reaches B's rpc-server directly (mutual TLS, tests/integration/test_rpc_tls.py); C's answers
    # came through the HTTP tunnel to A's members' API.
    assert a.runner()["rpc_paths"][mesh["ids"]["b"]].startswith("direct TLS")


async def refused_through(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello?")
    try:
        data = await asyncio.wait_for(reader.read(), 15)
    except ConnectionError:
        data = b""
    writer.close()
    return data


async def http_through(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return data.split(b"\r\n", 1)[0]


def test_members_reach_only_what_their_role_needs(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    c.wait_serving(timeout=120)
    assert serving_answer(c), "a lite client gets answers although the host's API wants a key"
    # The host's llama-server wants a key of its own that only its gatewayd knows (not in any status).
    llama_port = a.runner()["llama"]["port"]
    assert httpx.get(f"http://127.0.0.1:{llama_port}/v1/models", timeout=10).status_code == 401
    key_file = addresses.llama_key_path(a.home)
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and key not in json.dumps(a.status())
    assert key not in (a.home / "logs" / "llama-server.log").read_text(errors="replace")
    # With C's own node key (a member, not the host): B's rpc-server is refused, A's HTTP tunnel reaches
    # A's members' API (the OpenAI routes only), not llama-server itself.
    peers = {p["announcement"]["node_id"]: p["announcement"] for p in a.status()["meshd"]["peers"]}
    b_ann = peers[mesh["ids"]["b"]]
    a_ann = a.status()["meshd"]["me"]
    c_key = NodeIdentity.load_or_create(c.home)

    async def main():
        as_c = TunnelService(c_key, is_member=lambda n: True, local_target=lambda k: None, bind_host="127.0.0.1")
        await as_c.start()
        try:
            to_b = await as_c.open_forward(PeerDataAddrs(b_ann["node_id"], b_ann["data_tcp"], b_ann["data_quic"]), "rpc")
            assert await refused_through(to_b) == b""
            await wait_for_condition(lambda: "not the host" in as_c.stats()[b_ann["node_id"]]["last_error"], 10,
                                     "B refusing RPC from a lite client")
            to_a = await as_c.open_forward(PeerDataAddrs(a_ann["node_id"], a_ann["data_tcp"], a_ann["data_quic"]), "http")
            assert b" 404 " in await http_through(to_a, "/slots"), "an HTTP tunnel reached llama-server itself"
            assert b" 200 " in await http_through(to_a, "/v1/models")
        finally:
            await as_c.close()
    asyncio.run(main())
    # B's rpc-server still serves its host: the mesh answers.
    assert serving_answer(a)


def stream_until_end(base: str, outcome: dict) -> None:
    """A long streamed completion; records how it ended: "done" or the error event it got."""
    body = {"model": "any", "messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 2000,
            "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:  # C: no key
            for line in r.iter_lines():
                outcome["chunks"] = outcome.get("chunks", 0) + 1
                if line == "data: [DONE]":
                    outcome["end"] = "done"
                elif line.startswith("data: ") and '"error"' in line:
                    outcome["end"] = "error event"
    except httpx.HTTPError as exc:
        outcome["end"] = f"transport error {type(exc).__name__}"


def test_killed_worker_is_dropped_and_rejoins(mesh):
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    outcome: dict = {}
    in_flight = threading.Thread(target=stream_until_end, args=(c.api, outcome))
    in_flight.start()
    wait_until(lambda: outcome.get("chunks", 0) > 5, timeout=60, what="a stream in flight")
    kill_process_tree(b.proc, grace=0)  # the whole node dies at once, mid-generation, no leave notice
    b.proc = None
    started = time.monotonic()
    in_flight.join(timeout=150)
    assert not in_flight.is_alive(), "the in-flight stream hung after its worker died"
    assert outcome.get("end") in ("done", "error event"), outcome
    wait_until(lambda: plan_of(a).get("state") == "solo", timeout=60, interval=0.5, what="A to drop B")
    wait_until(lambda: serving_answer(a), timeout=120, interval=0.5, what="A serving alone")
    print(f"serving again {time.monotonic() - started:.1f} s after B was killed")
    b.start()  # same home: same identity and mesh secret, so it rejoins on its own
    wait_until(lambda: len(split_members(a)) == 2, timeout=240, interval=0.5, what="the split over A and B again")
    wait_until(lambda: serving_answer(a), timeout=240, interval=0.5, what="A serving the split again")
