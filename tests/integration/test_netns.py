"""Two nodes in separate network namespaces joined by a veth pair (198.51.100.0/24, a documentation
range): mesh and tunnel traffic cross a real non-loopback path. The worker's TCP data lane is
advertised through a delaying relay (this kernel has no netem), so the split runs with 10 ms RTT."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from typing import NamedTuple

import pytest

from tests.integration.harness import Node, RequestLoop, record_recovery
from tests.support.procs import free_port, kill_process_tree, wait_until

pytestmark = pytest.mark.slow
A_ADDR, B_ADDR = "198.51.100.1", "198.51.100.2"
RTT_MS = 10


class Namespaces(NamedTuple):
    a: str
    b: str
    dev_a: str  # A's end of the veth pair: down = the link between them is cut
    dev_b: str


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def namespaces():
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("needs iproute2 and root for network namespaces")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b = f"mesh-a-{tag}", f"mesh-b-{tag}"
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh("ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        sh("ip", "link", "set", f"va{tag}", "netns", ns_a)
        sh("ip", "link", "set", f"vb{tag}", "netns", ns_b)
        for ns, dev, addr in ((ns_a, f"va{tag}", A_ADDR), (ns_b, f"vb{tag}", B_ADDR)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield Namespaces(ns_a, ns_b, f"va{tag}", f"vb{tag}")
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_split_across_namespaces_with_delay(namespaces, tmp_path):
    ns_a, ns_b = namespaces.a, namespaces.b
    b_data_port, relay_port = free_port(), free_port()
    # Host A dials worker B's data lane; B advertises a relay in A's namespace that adds the delay.
    relay = subprocess.Popen(["ip", "netns", "exec", ns_a, sys.executable, "-m", "tests.support.delay_relay",
                              "--target", f"{B_ADDR}:{b_data_port}", "--listen", f"{A_ADDR}:{relay_port}",
                              "--rtt-ms", str(RTT_MS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    a = Node(tmp_path / "a", netns=ns_a, extra=["--split", "--max-vram", "8G"])
    # the RPC goes through the delayed data lane: B's direct rpc address (port 1) does not connect
    b = Node(tmp_path / "b", netns=ns_b, extra=["--split", "--max-vram", "4G", "--data-port", str(b_data_port),
                                                "--advertise-data", f"{A_ADDR}:{relay_port}",
                                                "--advertise-rpc", "127.0.0.1:1"])
    try:
        a.start()
        token = a.token()
        started = time.monotonic()
        b.start("--join", token)
        wait_until(lambda: a.status().get("electd", {}).get("state") == "split", timeout=120, interval=0.5,
                   what="a split across the namespaces")
        answer = wait_until(lambda: _try_chat(a), timeout=240, interval=1.0, what="the host serving the split")
        print(f"netns: join → serving in {time.monotonic() - started:.1f} s")
        assert answer == wait_until(lambda: _try_chat(b), timeout=120, interval=1.0, what="the worker answering")
        peers = {p["announcement"]["node_id"]: p for p in a.status()["meshd"]["peers"]}
        b_peer = peers[b.node_id()]
        assert b_peer["connected"] and any(h == B_ADDR for h, _ in b_peer["announcement"]["mesh_addrs"])
        tunnel = next(t for t in a.status()["gatewayd"]["tunnels"] if t["node_id"] == b.node_id())
        assert tunnel["lane"] == "tls-tcp" and tunnel["bytes_out"] > 0
    finally:
        for n in (a, b):
            n.stop()
        kill_process_tree(relay, grace=2)


def test_partition_and_heal(namespaces, tmp_path):
    """The link between A and B goes down: each side serves alone; it comes back: the split re-forms.
    Requests to A during all of it wait or are retried; none is lost."""
    a = Node(tmp_path / "a", netns=namespaces.a, extra=["--split", "--max-vram", "8G"])
    b = Node(tmp_path / "b", netns=namespaces.b, extra=["--split", "--max-vram", "4G"])
    try:
        a.start()
        b.start("--join", a.token())
        ids = {a.node_id(), b.node_id()}
        split = lambda: {m["node_id"] for m in a.status().get("electd", {}).get("members", [])} == ids \
            and a.runner().get("llama_plan_key") == a.status().get("electd", {}).get("key")  # noqa: E731
        wait_until(split, timeout=240, interval=0.5, what="the split across the namespaces")
        loop = RequestLoop(a, tmp_path / "requests.jsonl")
        wait_until(lambda: any(o.ok for o in loop.outcomes()), timeout=60, interval=0.3, what="a first answer")

        cut_at = time.time()
        sh("ip", "-n", namespaces.a, "link", "set", namespaces.dev_a, "down")
        alone = lambda n: n.status().get("electd", {}).get("state") == "solo" \
            and n.runner().get("llama", {}).get("state") == "ready"  # noqa: E731
        wait_until(lambda: alone(a) and alone(b), timeout=120, interval=0.5, what="both sides serving alone")
        alone_s = time.time() - cut_at
        wait_until(lambda: any(o.ok and o.start > cut_at for o in loop.outcomes()), timeout=120, interval=0.3,
                   what="an answer to a request sent after the cut")
        record_recovery("partition: each side serves alone", loop.outcomes(), cut_at, alone_s)
        assert _try_chat(b), "the worker's side serves on its own"
        # MESH_PARTITION_SECONDS holds the cut longer: the redial back-off grows with it (20 s at most).
        time.sleep(max(0.0, cut_at + float(os.environ.get("MESH_PARTITION_SECONDS", "0")) - time.time()))

        healed_at = time.time()
        sh("ip", "-n", namespaces.a, "link", "set", namespaces.dev_a, "up")
        wait_until(split, timeout=180, interval=0.5, what="the split re-formed after the heal")
        time.sleep(2)
        outcomes = loop.stop()
        record_recovery("partition healed: split again", outcomes, healed_at, time.time() - healed_at)
        lost = [o for o in outcomes if o.end >= cut_at and not o.ok]
        assert not lost, lost[:3]
    finally:
        for n in (a, b):
            n.stop()
        subprocess.run(["ip", "-n", namespaces.a, "link", "set", namespaces.dev_a, "up"], capture_output=True)


def _try_chat(node: Node) -> str | None:
    try:
        return node.chat("Name a fruit.", max_tokens=8)
    except Exception:
        return None
