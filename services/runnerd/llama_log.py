"""What llama-server's log says, read by pure functions (so tests and `meshctl status` read the same):
where it put the model (its `model buffer size` lines, one per device, named as this llama.cpp names
them: CPU_Mapped, CUDA0, RPC0[endpoint] — an RPC server's devices are numbered within it), how far its
load is (patch 0003), and what each worker loaded from its own GGUF (patch 0001's summaries)."""
from __future__ import annotations

import re

from common.messages import DevicePlacement, WeightLoad

BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
RPC_BUFFER = re.compile(r"^RPC\d+\[(.+)\]$")


def device_placement(llama_log: str, rpc_endpoints: dict[str, str], me: str) -> list[DevicePlacement]:
    """Model bytes per device in `llama_log` (one load's), each named by whose it is: a worker by its
    --rpc endpoint (`host:port` or `NODEID@host:port`, as the device's name holds it), else this node. In the log's order, which is not the devices' (it walks a map keyed
    by buffer type); a device with several buffers is summed."""
    node_by_endpoint = {endpoint: node_id for node_id, endpoint in rpc_endpoints.items()}
    found: dict[str, DevicePlacement] = {}
    for device, mib in BUFFER.findall(llama_log):
        rpc = RPC_BUFFER.match(device)
        owner = node_by_endpoint.get(rpc[1], "") if rpc else me
        place = found.setdefault(device, DevicePlacement(device=device, node_id=owner))
        place.model_bytes += int(float(mib) * (1 << 20))
    return list(found.values())


LOAD_PROGRESS = re.compile(r"load progress: [^\n]*?(\d+)%")


def load_progress_text(llama_log: str, seconds: int) -> str:
    """What status shows while llama-server loads: the last percentage it logged (patch 0003), and time."""
    percents = LOAD_PROGRESS.findall(llama_log)
    return f"loading the model: {percents[-1]}% ({seconds} s)" if percents else f"loading the model ({seconds} s)"


GGUF_SUMMARY = re.compile(r"rpc-gguf: summary hits=(\d+) misses=(\d+) hit_bytes=(\d+) miss_bytes=(\d+) "
                          r"endpoint=(\S+)")


def weight_loads(llama_log: str, rpc_endpoints: dict[str, str]) -> list[WeightLoad]:
    """Sum the patch's per-endpoint load summaries and name each endpoint's worker (by its --rpc endpoint)."""
    node_by_endpoint = {endpoint: node_id for node_id, endpoint in rpc_endpoints.items()}
    loads: dict[str, WeightLoad] = {}
    for _, misses, hit_bytes, miss_bytes, endpoint in GGUF_SUMMARY.findall(llama_log):
        node_id = node_by_endpoint.get(endpoint, endpoint)
        w = loads.setdefault(node_id, WeightLoad(node_id=node_id))
        w.local_bytes += int(hit_bytes)
        w.sent_bytes += int(miss_bytes)
        w.misses += int(misses)
    return list(loads.values())
