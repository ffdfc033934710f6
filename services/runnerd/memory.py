"""How much memory this node offers the mesh, per device: the GPUs llama.cpp itself lists (so
CUDA_VISIBLE_DEVICES and --device count), else a share of RAM. Pure but for reading RAM's size."""
from __future__ import annotations

from dataclasses import dataclass

import psutil

from common.binaries import Device

RAM_SHARE = 0.8  # leave room for the OS and llama-server's own buffers on CPU-only nodes
GB = 1 << 30


@dataclass(frozen=True)
class Offer:
    devices: list[int]  # bytes per device ggml-rpc-server serves, in its order (one entry on a CPU node)
    # This node's own accelerators as host, in llama.cpp's order: its share of memory, 0 for those
    # --device leaves out (llama-server still sees them; a 0 in --tensor-split gives them no layers).
    local_weights: list[int]
    source: str

    @property
    def total(self) -> int:
        return sum(self.devices)


def detect_memory(override: int | None, device: str | None, devices: tuple[Device, ...],
                  ram_bytes: int | None = None) -> Offer:
    """`devices`: what `llama-server --list-devices` lists (Binaries.devices); `device`: --device, a
    comma-separated list of those names, as ggml-rpc-server takes it; `override`: --max-vram, the total."""
    by_name = {d.name: d for d in devices}
    # In --device's order, as ggml-rpc-server serves them (a name twice is two devices to it).
    chosen = [by_name[n.strip()] for n in device.split(",") if n.strip() in by_name] if device else list(devices)
    if not chosen:
        ram = int((ram_bytes or psutil.virtual_memory().total) * RAM_SHARE)
        offered = [override or ram]
        source = "override (--max-vram)" if override else f"RAM ({int(RAM_SHARE * 100)}% of total)"
        return Offer(offered, [], source)
    sizes = [d.total_bytes for d in chosen]
    if override:
        # The total is the user's; it spreads over the devices as their memory does.
        sizes = [override * s // sum(sizes) for s in sizes]
        source = f"override (--max-vram) over {', '.join(d.name for d in chosen)}"
    else:
        source = "llama.cpp: " + ", ".join(f"{d.name} {d.total_bytes / GB:.1f} GB" for d in chosen)
    mine = {d.name: s for d, s in zip(chosen, sizes)}
    return Offer(sizes, [mine.get(d.name, 0) for d in devices], source)
