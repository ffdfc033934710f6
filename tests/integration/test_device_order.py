"""Which device holds which layers is llama-server's to say, and it must be what the plan meant.

A host and two workers with different memory (6, 4 and 2 GB offered) run `meshctl up` on real
binaries. The --tensor-split runnerd gives llama-server lists its ratios in llama.cpp's device order,
which this llama.cpp sets: RPC devices first (named RPC<i>[host:port], numbered within each server),
then local GPUs. If that order flipped — llama.cpp changing it, or runnerd listing the devices
another way — the workers' layers would swap and each worker's model buffer would be the other's
size. So the test reads llama-server's own report (`model buffer size` per device, in its log) and
checks it byte for byte against the layers llama.cpp's assignment rule gives for the plan's split."""
from __future__ import annotations

import bisect
import re
import time
from collections import defaultdict

import psutil
import pytest
from gguf import GGUFReader

from services.runnerd.placement import device_placement
from tests.integration.harness import Node
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow
MIB = 1 << 20


def layer_devices(n_layers: int, n_gpu_layers: int, splits: list[float]) -> list[int | None]:
    """Device index of each repeating layer (None: the host's CPU), as src/llama-model.cpp assigns them."""
    cumulative, total = [], sum(splits)
    for s in splits:
        cumulative.append((cumulative[-1] if cumulative else 0.0) + s / total)
    start = max(n_layers + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layers + 1)
    return [None if il < start or il - start >= active else bisect.bisect_right(cumulative, (il - start) / active)
            for il in range(n_layers)]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_llama_server_puts_each_workers_layers_where_the_plan_says(tmp_path):
    common = ["--split", "--bind-host", "127.0.0.1"]
    host = Node(tmp_path / "host", extra=[*common, "--max-vram", "6G"])
    big = Node(tmp_path / "big", extra=[*common, "--max-vram", "4G"])
    small = Node(tmp_path / "small", extra=[*common, "--max-vram", "2G"])
    nodes = [host, big, small]
    try:
        host.start()
        token = host.token()
        big.start("--join", token)
        small.start("--join", token)
        ids = {n: n.node_id() for n in nodes}

        def serving_all_three():
            s = host.status()
            plan, runner = s.get("electd", {}), s.get("runnerd", {})
            members = [m["node_id"] for m in plan.get("members", [])]
            return s if (plan.get("state") == "split" and len(members) == 3 and runner.get("placement")
                         and runner.get("llama_plan_key") == plan.get("key")) else None
        started = time.monotonic()
        status = wait_until(serving_all_three, timeout=300, interval=0.5, what="the host serving a split over all three")
        print(f"device-order: join → serving the 3-way split in {time.monotonic() - started:.1f} s")
        plan, runner = status["electd"], status["runnerd"]

        # electd's plan: by memory, host first, each member with the one device it offered
        assert [m["node_id"] for m in plan["members"]] == [ids[host], ids[big], ids[small]]
        assert [m["ratio"] for m in plan["members"]] == [0.5, 0.333, 0.167]
        assert [m["devices"] for m in plan["members"]] == [[6 << 30], [4 << 30], [2 << 30]]

        # runnerd's command line: the workers' RPC endpoints in plan order, their ratios in that order
        args = psutil.Process(runner["llama"]["pid"]).cmdline()
        forwards = status["gatewayd"]["rpc_forwards"]
        assert flag(args, "--rpc") == f"127.0.0.1:{forwards[ids[big]]},127.0.0.1:{forwards[ids[small]]}"
        splits = [float(r) for r in flag(args, "--tensor-split").split(",")]
        assert splits == [0.666, 0.334]

        # llama-server's own report: the model buffer of each RPC device, named by endpoint
        log = (host.home / "logs" / "llama-server.log").read_text(errors="replace")
        last_load = log[log.rfind("llama_model_loader: loaded meta data"):]  # earlier plans loaded into it too
        placed = device_placement(last_load, forwards, ids[host])
        rpc = [p for p in placed if p.device.startswith("RPC")]
        assert [(p.device, p.node_id) for p in rpc] == [
            (f"RPC0[127.0.0.1:{forwards[ids[big]]}]", ids[big]), (f"RPC0[127.0.0.1:{forwards[ids[small]]}]", ids[small])]
        assert runner["placement"] == [p.model_dump() for p in placed]  # what `meshctl status` shows

        # ... holds, byte for byte, the layers llama.cpp's rule gives for this split and --n-gpu-layers
        reader = GGUFReader(runner["model"]["path"])
        layer_bytes = defaultdict(int)
        for t in reader.tensors:
            m = re.match(r"blk\.(\d+)\.", t.name)
            if m:
                layer_bytes[int(m[1])] += int(t.n_bytes)
        n_layers = runner["model"]["n_layers"]
        assignment = layer_devices(n_layers, int(flag(args, "--n-gpu-layers")), splits)
        expected = [sum(layer_bytes[il] for il, d in enumerate(assignment) if d == i) for i in range(2)]
        for p, want in zip(rpc, expected):
            assert abs(p.model_bytes - want) <= 0.02 * MIB + 0.001 * want, (p.device, p.model_bytes, want, assignment)
        assert expected[0] > 1.5 * expected[1]  # a swap of the two workers would show
        # and the host keeps its half of the layers (the output layer stays with it too)
        kept = assignment.count(None)
        assert kept == round(0.5 * n_layers), assignment
        by_worker = [assignment.count(0), assignment.count(1)]
        assert all(abs(got - r * n_layers) <= 1 for got, r in zip(by_worker, (0.333, 0.167))), by_worker
        print(f"device-order: layers host {kept}, big {by_worker[0]}, small {by_worker[1]} of {n_layers}; "
              f"buffers {[f'{p.device} {p.model_bytes / MIB:.2f} MiB' for p in placed]}")
    finally:
        for n in nodes:
            n.stop()
