"""Where llama-server says it put the model: its `model buffer size` lines, one per device, named as
this llama.cpp names them (CPU_Mapped, CUDA0, RPC0[127.0.0.1:port] — an RPC server's devices are
numbered within it). Pure, so the device-order test and `meshctl status` read the same thing."""
from __future__ import annotations

import re

from common.messages import DevicePlacement

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
