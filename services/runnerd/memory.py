"""How much memory this node offers the mesh: GPU memory where there is a GPU, else a share of RAM."""
from __future__ import annotations

import shutil
import subprocess

import psutil

RAM_SHARE = 0.8  # leave room for the OS and llama-server's own buffers on CPU-only nodes


def detect_memory(override: int | None, device: str | None = None) -> tuple[int, str]:
    """(bytes, where the figure came from)."""
    if override:
        return override, "override (--max-vram)"
    gpus = _nvidia_gpu_memory()
    if gpus:
        if device and device.upper().startswith("CUDA") and device[4:].isdigit() and int(device[4:]) < len(gpus):
            return gpus[int(device[4:])], f"nvidia-smi ({device})"
        return sum(gpus), f"nvidia-smi ({len(gpus)} GPU{'s' if len(gpus) > 1 else ''})"
    return int(psutil.virtual_memory().total * RAM_SHARE), f"RAM ({int(RAM_SHARE * 100)}% of total)"


def _nvidia_gpu_memory() -> list[int]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [int(float(line)) << 20 for line in out.stdout.split() if line.strip()]
