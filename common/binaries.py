"""Where the llama.cpp binaries come from: `--bin-dir`, or the project's cached build of pinned source."""
from __future__ import annotations

import importlib.util
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # the older builds call it rpc-server


class BinariesError(Exception):
    """Binaries we cannot use; the message says what to do."""


@dataclass(frozen=True)
class Binaries:
    rpc_server: Path
    llama_server: Path
    loads_local_weights: bool  # our patch: rpc-server loads weights from its own GGUF (--gguf)
    has_fit: bool = False      # llama-server's --fit pass (on by default in builds since late 2025)


@lru_cache(maxsize=1)
def _build_module():
    spec = importlib.util.spec_from_file_location("llama_build", REPO_ROOT / "llama.cpp" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_bin_dir() -> Path:
    return _build_module().bin_dir()


def build_binaries() -> Path:
    """Build llama.cpp from the pinned source if this source + patches + backend is not cached yet."""
    return _build_module().build()


def find_binaries(bin_dir: Path | None, *, build_if_missing: bool = False) -> Binaries:
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
    return Binaries(rpc_server, llama_server, loads_local_weights=_help_mentions(rpc_server, "--gguf"),
                    has_fit=_help_mentions(llama_server, "--fit "))


def _help_mentions(binary: Path, flag: str) -> bool:
    try:
        out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out.stdout + out.stderr
