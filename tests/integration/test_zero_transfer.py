"""Zero weight transfer through the mesh: a two-node split moves under 1 % of the model's bytes across
the tunnels, and a node holding a different GGUF of the same architecture is left out of the split."""
from __future__ import annotations

import shutil

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.default_model import ensure_default_model
from common.gguf_info import read_gguf_header
from tests.integration.harness import Node, meshctl
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow


def fine_tuned_copy(model, out):
    """Same architecture and tensor table, other weights in one tensor (as a fine-tune would have)."""
    shutil.copyfile(model, out)
    with open(model, "rb") as f:
        header = read_gguf_header(f)
    offset, n_bytes = header.tensors["blk.0.attn_q.weight"]
    with open(out, "r+b") as f:
        f.seek(header.data_start + offset)
        data = bytearray(f.read(n_bytes))
        f.seek(header.data_start + offset)
        f.write(bytes(b ^ 0x11 for b in data))
    return out


def test_split_loads_weights_locally_and_other_models_are_excluded(tmp_path):
    model = ensure_default_model()
    a = Node(tmp_path / "a", extra=["--split", "--max-vram", "8G", "--bind-host", "127.0.0.1"])
    # B's rpc address does not connect (port 1): the host goes through the tunnel, whose bytes are counted here
    b = Node(tmp_path / "b", extra=["--split", "--max-vram", "4G", "--bind-host", "127.0.0.1",
                                    "--advertise-rpc", "127.0.0.1:1"])
    other = fine_tuned_copy(model, tmp_path / "fine-tune.gguf")
    d = Node(tmp_path / "d", extra=["--split", "--max-vram", "2G", "--bind-host", "127.0.0.1", "--model", str(other)])
    try:
        a.start()
        token = a.token()
        b.start("--join", token)
        d.start("--join", token)
        ids = {n: node.node_id() for n, node in (("a", a), ("b", b), ("d", d))}

        def planned() -> dict | None:
            plan = a.status().get("electd", {})
            members = {m["node_id"] for m in plan.get("members", [])}
            excluded = {e["node_id"]: e["reason"] for e in plan.get("excluded", [])}
            ok = plan.get("state") == "split" and members == {ids["a"], ids["b"]} and ids["d"] in excluded
            return plan if ok else None

        plan = wait_until(planned, timeout=180, interval=0.5, what="a split over A and B with D excluded")
        assert {e["node_id"]: e["reason"] for e in plan["excluded"]}[ids["d"]] == "holds a different model"
        assert "different" in meshctl("status", home=a.home).stdout

        wait_until(lambda: a.runner().get("llama", {}).get("state") == "ready", timeout=240, interval=0.5,
                   what="the host's llama-server loaded over the split")
        assert a.runner()["rpc_loads_local_weights"]
        loads = {w["node_id"]: w for w in a.runner()["weights"]}
        assert loads[ids["b"]]["local_bytes"] > 0 and loads[ids["b"]]["sent_bytes"] == 0, loads
        assert "from its own GGUF" in meshctl("status", home=a.home).stdout
        tunnel = next(t for t in a.status()["gatewayd"]["tunnels"] if t["node_id"] == ids["b"])
        moved = tunnel["bytes_in"] + tunnel["bytes_out"]
        size = model.stat().st_size
        print(f"bytes across the tunnel to B during load: {moved:,} of a {size:,}-byte model ({moved / size:.2%})")
        assert 0 < moved < size / 100
        assert a.chat("Say hi.", max_tokens=4)
        metrics = __import__("httpx").get(f"{a.api}/metrics", timeout=10).text
        sent = [s.value for f in text_string_to_metric_families(metrics) for s in f.samples
                if s.name == "mesh_tunnel_bytes_total" and s.labels.get("peer") == ids["b"]
                and s.labels.get("direction") == "out"]
        assert sent and sent[0] > 0
    finally:
        for n in (d, b, a):
            n.stop()
