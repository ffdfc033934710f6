"""Which device holds which layers is llama-server's to say, and it must be what the plan meant.

A host and two workers with different memory (6, 4 and 2 GB offered) run `meshctl up` on real
binaries. The --tensor-split runnerd gives llama-server lists its ratios in llama.cpp's device order,
which this llama.cpp sets: RPC devices first (named RPC<i>[host:port], numbered within each server),
then local GPUs. If that order flipped — llama.cpp changing it, or runnerd listing the devices
another way — the workers' layers would swap and each worker's model buffer would be the other's
size. So the test reads llama-server's own report (`model buffer size` per device, in its log) and
checks it byte for byte against the layers llama.cpp's assignment rule gives for the plan's split."""
from __future__ import annotations

import time

import psutil
import pytest

from tests.integration.harness import Node
from tests.support.device_order import check, flag
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow



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
            return s if (plan.get("state") == "split" and len(plan.get("members", [])) == 3 and runner.get("placement")
                         and runner.get("llama_plan_key") == plan.get("key")) else None
        started = time.monotonic()
        status = wait_until(serving_all_three, timeout=300, interval=0.5, what="the host serving a split over all three")
        print(f"device-order: join → serving the 3-way split in {time.monotonic() - started:.1f} s")
        plan, runner, forwards = status["electd"], status["runnerd"], status["gatewayd"]["rpc_forwards"]

        # electd's plan: by memory, host first, each member with the one device it offered
        assert [m["node_id"] for m in plan["members"]] == [ids[host], ids[big], ids[small]]
        assert [m["ratio"] for m in plan["members"]] == [0.5, 0.333, 0.167]
        assert [m["devices"] for m in plan["members"]] == [[6 << 30], [4 << 30], [2 << 30]]
        # runnerd's command line: the workers in plan order, the host keeping its half as layers
        args = psutil.Process(runner["llama"]["pid"]).cmdline()
        assert flag(args, "--tensor-split") == "9.5,6.5"  # 10 and 5 of the 15 layers the host does not keep

        log = (host.home / "logs" / "llama-server.log").read_text(errors="replace")
        found = check(plan, args, forwards, log, runner["model"]["path"], runner["model"]["n_layers"], ids[host])
        print(f"device-order: {found}")
        # each worker's device is named by its --rpc endpoint: direct TLS pinned to its id (NODEID@host:port)
        endpoints = flag(args, "--rpc").split(",")
        assert [e.split("@")[0] for e in endpoints] == [ids[big], ids[small]]
        assert [(d["node"], d["device"]) for d in found["devices"]] == [
            (ids[big][:8], f"RPC0[{endpoints[0]}]"), (ids[small][:8], f"RPC0[{endpoints[1]}]")]
        n_layers = runner["model"]["n_layers"]
        assert found["host_cpu_layers"] == round(0.5 * n_layers)
        big_layers, small_layers = (d["layers"] for d in found["devices"])
        assert big_layers > small_layers > 0  # a swap of the two workers would show here and in the bytes
        assert (big_layers, small_layers) == (round(0.333 * n_layers), round(0.167 * n_layers)), found
        # `meshctl status` shows the same report
        assert sorted(p["device"] for p in runner["placement"] if p["device"].startswith("RPC")) == \
            sorted(d["device"] for d in found["devices"])
    finally:
        for n in nodes:
            n.stop()
