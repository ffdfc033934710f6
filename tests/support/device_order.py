"""Checks llama-server's own report of where the model went against the host's plan and command line.

This llama.cpp orders a model's devices RPC first — each --rpc server in turn, its devices named
RPC<i>[host:port] with i counted within the server — then the local GPUs, and --tensor-split's
ratios follow that order. `check` rebuilds the layer → device assignment of src/llama-model.cpp from
the command line, and compares each device's model buffer (the `model buffer size` lines) with the
bytes of the layers it should hold. A swap of two devices' ratios shows as two wrong buffer sizes.
Used by tests/integration/test_device_order.py (CPU, in CI) and bench/gpu/mesh.py (the GPUs)."""
from __future__ import annotations

import bisect
import re
from collections import defaultdict

import numpy as np
from gguf import GGUFReader

from services.runnerd.llama_log import device_placement

MIB = 1 << 20
LOCAL_DEVICE = re.compile(r"^[A-Za-z]+\d+$")  # CUDA0, MTL0, Vulkan0 — not CPU_Mapped or CUDA_Host


def layer_devices(n_layers: int, n_gpu_layers: int, splits: list[float]) -> list[int | None]:
    """Device index of each layer 0..n_layers (the last is the output layer); None: the host's CPU.
    In float32 like llama.cpp, so a layer on a boundary goes where it goes there."""
    f32 = np.float32
    cumulative, running = [], f32(0)
    for s in splits:
        running = f32(running + f32(s))
        cumulative.append(running)
    cumulative = [f32(c / running) for c in cumulative]
    start = max(n_layers + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layers + 1)
    return [None if il < start or il - start >= active
            else min(bisect.bisect_right(cumulative, f32(f32(il - start) / f32(active))), len(splits) - 1)
            for il in range(n_layers + 1)]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def check(plan: dict, args: list[str], rpc_forwards: dict[str, int], llama_log: str, model_path: str,
          n_layers: int, me: str) -> dict:
    """Assert that the devices of `llama_log`'s last load hold what the plan and `args` (llama-server's
    command line) mean; return a summary (devices in order with owner, layers and MB)."""
    load = llama_log[llama_log.rfind("llama_model_loader: loaded meta data"):]
    members = {m["node_id"]: m for m in plan["members"]}
    remote = [m["node_id"] for m in plan["members"] if m["node_id"] != me]
    # The devices in llama.cpp's order, as the plan and the command line make them. A worker is reached
    # through its forward, or directly over TLS pinned to its node id (NODEID@host:port).
    rpc = flag(args, "--rpc")
    endpoints = rpc.split(",") if rpc else []
    assert len(endpoints) == len(remote) and all(
        ep.startswith(f"{n}@") or ep.endswith(f"127.0.0.1:{rpc_forwards[n]}") for ep, n in zip(endpoints, remote)), \
        (endpoints, remote, rpc_forwards)
    placed = device_placement(load, dict(zip(remote, endpoints)), me)
    wanted = [(f"RPC{i}[{ep}]", node) for ep, node in zip(endpoints, remote)
              for i in range(max(len(members[node].get("devices") or []), 1))]
    local = [p.device for p in placed if LOCAL_DEVICE.match(p.device)]
    splits = [float(r) for r in (flag(args, "--tensor-split") or "1").split(",")]
    if len(splits) > len(wanted):  # a GPU host: its own GPUs come after the RPC devices
        wanted += [(d, me) for d in local]
    assert len(splits) == len(wanted), f"--tensor-split has {len(splits)} ratios for the devices {wanted}"
    got = [(p.device, p.node_id) for p in placed if p.device.startswith("RPC") or LOCAL_DEVICE.match(p.device)]
    # The log lists buffers in no particular order (a map keyed by buffer type), so by name; a device
    # with a 0 ratio holds nothing and has no buffer.
    assert sorted(got) == sorted(w for w, s in zip(wanted, splits) if s > 0), \
        f"llama-server placed {got}, the plan means {wanted}"

    layer_bytes, other_bytes = defaultdict(int), 0
    for t in GGUFReader(model_path).tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m:
            layer_bytes[int(m[1])] += int(t.n_bytes)
        elif t.name != "token_embd.weight":  # the input layer stays on the CPU
            other_bytes += int(t.n_bytes)
    assignment = layer_devices(n_layers, int(flag(args, "--n-gpu-layers") or 0), splits)
    by_name = {p.device: p.model_bytes for p in placed}
    summary = []
    for i, (device, node) in enumerate(wanted):
        layers = [il for il in range(n_layers) if assignment[il] == i]
        want = sum(layer_bytes[il] for il in layers)
        have = by_name.get(device, 0)
        slack = 0.02 * MIB + 0.002 * want + (other_bytes if assignment[n_layers] == i else 0)  # the output layer
        assert want - 0.02 * MIB - 0.002 * want <= have <= want + slack, \
            f"{device} ({node[:8]}) holds {have / MIB:.2f} MiB; layers {layers} of the plan are {want / MIB:.2f} MiB"
        summary.append({"device": device, "node": node[:8], "layers": len(layers), "mib": round(have / MIB, 2)})
    kept = [il for il in range(n_layers) if assignment[il] is None]
    return {"devices": summary, "host_cpu_layers": len(kept), "tensor_split": splits}
