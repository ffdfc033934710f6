"""Where the llama.cpp binaries come from: `--bin-dir`, or the project's cached build of pinned source."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # the older builds call it rpc-server


class BinariesError(Exception):
    """Binaries we cannot use; the message says what to do."""


@dataclass(frozen=True)
class Device:
    """An accelerator as `llama-server --list-devices` names it (CUDA0, MTL0, …); it honours CUDA_VISIBLE_DEVICES."""
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Binaries:
    rpc_server: Path
    llama_server: Path
    loads_local_weights: bool  # our patch: rpc-server loads weights from its own GGUF (--gguf)
    has_fit: bool = False      # llama-server's --fit pass (on by default in builds since late 2025)
    backend: str = "cpu"       # what llama-server offloads to: cpu, cuda, metal, vulkan, rocm…
    rpc_tls: bool = False      # our patch: mutual TLS on RPC (rpc-server --tls-*, NODEID@host:port endpoints)
    devices: tuple[Device, ...] = ()  # its accelerators on this machine, in llama.cpp's order (none: CPU)


def _build_module():
    # llama.cpp/ is installed as the package mesh_llama_cpp (pyproject's package-dir), with its pin
    # and patches beside build.py, in a clone and in a plain `pip install .` alike.
    from mesh_llama_cpp import build
    return build


def built_bin_dir() -> Path:
    return _build_module().bin_dir()


def build_binaries() -> Path:
    """Build llama.cpp from the pinned source if this source + patches + backend is not cached yet."""
    return _build_module().build()


def find_binaries(bin_dir: Path | None, *, build_if_missing: bool = False,
                  build_env: dict[str, str] | None = None) -> Binaries:
    """The binaries in `bin_dir`, or the project's build for the build settings in `build_env`
    (Settings.build_env(): cache, backend, CUDA arch, source), built first if allowed."""
    if build_env:
        # build.py reads them from the environment (it also runs alone, before the project is installed);
        # this process's builds then use the same cache and backend as every other service's.
        os.environ.update(build_env)
    if bin_dir is None:
        bin_dir = built_bin_dir()
        if not (bin_dir / "llama-server").exists():
            if not build_if_missing:
                raise BinariesError("llama.cpp is not built yet; run `just build` (or `meshctl up`, which builds it), "
                                    "or point --bin-dir at a llama.cpp build's bin directory")
            bin_dir = build_binaries()
    if not bin_dir.is_dir():
        raise BinariesError(f"--bin-dir {bin_dir} is not a directory; point it at a llama.cpp build's bin directory")
    llama_server = bin_dir / "llama-server"
    rpc_server = next((bin_dir / n for n in RPC_SERVER_NAMES if (bin_dir / n).exists()), None)
    missing = [name for name, path in (("llama-server", llama_server), ("ggml-rpc-server", rpc_server))
               if path is None or not path.exists()]
    if missing:
        raise BinariesError(f"{' and '.join(missing)} not found in {bin_dir}; build llama.cpp with -DGGML_RPC=ON "
                            f"or drop --bin-dir to use the project's own build")
    rpc_help = _help_text(rpc_server)
    backend, devices = binaries_backend(llama_server)
    return Binaries(rpc_server, llama_server, loads_local_weights="--gguf" in rpc_help,
                    has_fit=_help_mentions(llama_server, "--fit "), backend=backend, devices=devices,
                    rpc_tls="--tls-allow" in rpc_help)


# Device names llama.cpp's backends register (`llama-server --list-devices`), and library names
# of their shared builds, to the backend they mean.
DEVICE_PREFIXES = (("CUDA", "cuda"), ("MTL", "metal"), ("Metal", "metal"), ("ROCm", "rocm"), ("HIP", "rocm"),
                   ("Vulkan", "vulkan"), ("SYCL", "sycl"))
LIBRARY_HINTS = (("ggml-cuda", "cuda"), ("libcudart", "cuda"), ("ggml-metal", "metal"), ("ggml-hip", "rocm"),
                 ("ggml-vulkan", "vulkan"), ("ggml-sycl", "sycl"))


def backend_from_devices(listing: str) -> str | None:
    """`llama-server --list-devices` output → the first accelerator's backend, "cpu" when it lists none,
    None when the output is not a device list. Pure, for tests."""
    if "Available devices" not in listing:
        return None
    for line in listing.splitlines():
        name = line.strip().split(":", 1)[0]
        for prefix, backend in DEVICE_PREFIXES:
            if name.startswith(prefix):
                return backend
    return "cpu"


DEVICE_LINE = re.compile(r"^\s*(\S+): .* \((\d+) MiB, (\d+) MiB free\)\s*$")


def devices_from_listing(listing: str) -> tuple[Device, ...]:
    """`llama-server --list-devices` output → its accelerators, in its order. Pure, for tests."""
    found = (DEVICE_LINE.match(line) for line in listing.splitlines())
    return tuple(Device(m[1], int(m[2]) << 20, int(m[3]) << 20) for m in found if m)


def backend_from_libraries(ldd_output: str) -> str:
    for hint, backend in LIBRARY_HINTS:
        if hint in ldd_output:
            return backend
    return "cpu"


def binaries_backend(llama_server: Path) -> tuple[str, tuple[Device, ...]]:
    """What these binaries offload to on this machine, and its devices: what llama-server itself reports
    (a CUDA build on a machine without a GPU lists none: it runs as CPU), else the libraries it links."""
    try:
        out = subprocess.run([str(llama_server), "--list-devices"], capture_output=True, text=True, timeout=30)
        found = backend_from_devices(out.stdout + out.stderr)
        if found:
            return found, devices_from_listing(out.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass
    ldd = shutil.which("ldd") or shutil.which("otool")
    if not ldd:
        return "cpu", ()
    args = [ldd, "-L", str(llama_server)] if ldd.endswith("otool") else [ldd, str(llama_server)]
    try:
        return backend_from_libraries(subprocess.run(args, capture_output=True, text=True, timeout=10).stdout), ()
    except (OSError, subprocess.TimeoutExpired):
        return "cpu", ()


def _help_text(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def _help_mentions(binary: Path, flag: str) -> bool:
    return flag in _help_text(binary)
