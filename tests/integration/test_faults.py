"""Faults in a running mesh, with a lite client asking for answers the whole time.

A (8 GB) hosts, B (4 GB, its own copy of the model) is the worker, the split is forced; C is a lite
client whose :9337 a request loop hammers through every fault. After each fault the mesh must be
serving the full split again with nobody touching it, and no request may be lost: requests that
arrive while there is no host wait, requests whose path dies are retried or end cleanly.
Each fault adds a row to the recovery table printed at the end of the run.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from common.default_model import ensure_default_model
from tests.integration.harness import Node, RequestLoop, meshctl, record_recovery
from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.slow


def full_split(host: Node, ids: list[str]) -> bool:
    """`host` serves a split over exactly `ids`, with the llama-server for that plan ready."""
    status = host.status()
    plan, runner = status.get("electd", {}), status.get("runnerd", {})
    return (plan.get("state") == "split" and plan.get("host") == host_id(status)
            and sorted(m["node_id"] for m in plan.get("members", [])) == sorted(ids)
            and runner.get("llama", {}).get("state") == "ready" and runner.get("llama_plan_key") == plan.get("key"))


def host_id(status: dict) -> str | None:
    return status.get("meshd", {}).get("node_id")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    own_copy = root / "b-model.gguf"
    shutil.copyfile(ensure_default_model(), own_copy)
    a = Node(root / "a", extra=["--split", "--max-vram", "8G", "--bind-host", "127.0.0.1"])
    b = Node(root / "b", extra=["--split", "--max-vram", "4G", "--bind-host", "127.0.0.1", "--model", str(own_copy)])
    c = Node(root / "c", extra=["--client", "--bind-host", "127.0.0.1"])
    try:
        a.start()
        token = a.token()
        b.start("--join", token)
        c.start("--join", token)
        ids = [a.node_id(), b.node_id()]
        wait_until(lambda: full_split(a, ids), timeout=240, interval=0.5, what="the split over A and B")
        c.wait_serving()
        yield {"a": a, "b": b, "c": c, "ids": ids, "root": root, "b_model": own_copy}
    finally:
        for n in (c, b, a):
            n.stop()


def settled(mesh) -> None:
    wait_until(lambda: full_split(mesh["a"], mesh["ids"]), timeout=240, interval=0.5, what="the full split again")
    mesh["c"].wait_serving()


def pid_of(node: Node, part: str) -> int | None:
    if part in ("llama-server", "rpc-server"):
        child = node.runner().get("llama" if part == "llama-server" else "rpc", {})
        return child.get("pid") if child.get("state") == "ready" else None
    try:
        return node.service_pid(part)
    except (OSError, ValueError):
        return None


PARTS = [("a", p) for p in ("meshd", "electd", "runnerd", "gatewayd", "llama-server")] + \
        [("b", p) for p in ("meshd", "electd", "runnerd", "gatewayd", "rpc-server")]


@pytest.mark.parametrize("who, part", PARTS, ids=[f"{'host' if w == 'a' else 'worker'}-{p}" for w, p in PARTS])
def test_kill_9_of_any_part_loses_no_request(mesh, who, part, tmp_path):
    settled(mesh)
    node = mesh[who]
    victim = wait_until(lambda: pid_of(node, part), timeout=60, what=f"{part}'s pid")
    loop = RequestLoop(mesh["c"], tmp_path / "requests.jsonl")
    wait_until(lambda: any(o.ok for o in loop.outcomes()), timeout=60, interval=0.2, what="the loop's first answer")
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (pid_of(node, part) or victim) != victim, timeout=120, interval=0.3, what=f"{part} back")
    settled(mesh)
    back = time.time() - killed_at
    time.sleep(2)  # a few answers after the mesh is whole again
    row = record_recovery(f"kill -9 {part} on the {'host' if who == 'a' else 'worker'}", loop.stop(), killed_at,
                          back)
    assert row["lost"] == 0, row


def test_gguf_cut_off_mid_file_is_refused_and_the_mesh_keeps_serving(mesh, tmp_path):
    settled(mesh)
    model = ensure_default_model()
    cut = tmp_path / "cut.gguf"
    with open(model, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(model.stat().st_size // 3))
    loop = RequestLoop(mesh["c"], tmp_path / "requests.jsonl")
    started = time.time()
    # Given on the command line: one clear line and exit 2 before anything starts.
    out = meshctl("up", "--model", str(cut), "--port", str(free_port()), "--join", mesh["c"].token(), home=tmp_path / "d")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out
    assert "cut off" in out.stderr or "truncated" in out.stderr, out.stderr
    # The worker's own file cut off while it serves: its rpc-server misses those tensors on the next
    # load and the host sends their bytes, or runnerd refuses the file; either way the mesh serves.
    with open(mesh["b_model"], "r+b") as f:
        f.truncate(mesh["b_model"].stat().st_size // 2)
    os.kill(pid_of(mesh["a"], "llama-server"), signal.SIGKILL)
    wait_until(lambda: mesh["a"].runner().get("llama", {}).get("state") == "ready", timeout=180, interval=0.5,
               what="the host serving again")
    time.sleep(2)
    row = record_recovery("worker's GGUF cut off, host reloads", loop.stop(), started, None)
    assert row["lost"] == 0, row
    shutil.copyfile(model, mesh["b_model"])  # whole again for the tests after this one


def test_host_node_killed_the_worker_takes_over_and_the_host_rejoins(mesh, tmp_path):
    settled(mesh)
    a, b, c = mesh["a"], mesh["b"], mesh["c"]
    loop = RequestLoop(c, tmp_path / "requests.jsonl")
    wait_until(lambda: any(o.ok for o in loop.outcomes()), timeout=60, interval=0.2, what="the loop's first answer")
    killed_at = time.time()
    a.kill()
    # B alone: the model fits it, so it serves solo; C follows it.
    wait_until(lambda: b.status().get("electd", {}).get("host") == mesh["ids"][1]
               and b.runner().get("llama", {}).get("state") == "ready", timeout=120, interval=0.3,
               what="B hosting")
    b_hosting = time.time() - killed_at
    wait_until(lambda: any(o.ok and o.start > killed_at for o in loop.outcomes()), timeout=120, interval=0.3,
               what="an answer from the new host")
    takeover = record_recovery("host node killed (worker takes over)", loop.outcomes(), killed_at, b_hosting)
    # A comes back on its own home (no token: it remembers the mesh) and hosts the split again.
    back_at = time.time()
    a.start()
    settled(mesh)
    rejoin = record_recovery("killed host restarts and rejoins", loop.stop(), back_at, time.time() - back_at)
    assert takeover["lost"] == 0 and rejoin["lost"] == 0, (takeover, rejoin)


def test_a_flapping_worker_loses_no_request(mesh, tmp_path):
    """B dies (kill -9, like a laptop lid) and comes back every 30 s; MESH_FLAP_SECONDS sets how long."""
    settled(mesh)
    b = mesh["b"]
    duration = float(os.environ.get("MESH_FLAP_SECONDS", "300"))
    loop = RequestLoop(mesh["c"], tmp_path / "requests.jsonl")
    started = time.time()
    flaps = 0
    while time.time() - started < duration:
        time.sleep(30)
        b.kill()
        flaps += 1
        time.sleep(30)
        b.start()
    settled(mesh)
    row = record_recovery(f"worker flapping every 30 s ({flaps} flaps in {duration:.0f} s)", loop.stop(), started,
                          time.time() - started - duration)
    assert row["lost"] == 0, row
