"""`just bundle`'s tarball installs into a fresh virtualenv with no package registry (pip --no-index) and
the installed meshctl — a plain, non-editable install, run away from the clone — serves the default
model. Building the bundle itself needs the registry (it collects the dependency wheels)."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_port, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No registry: no index, no extra wheel folders or pip config of this machine; own cache and models."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "PIP_", "VIRTUAL_ENV", "PYTHONPATH"))}
    return env | {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "MESH_LLAMA_CACHE": str(tmp_path / "cache"),
                  "MESH_MODELS_DIR": str(tmp_path / "models")}


def test_bundle_installs_without_a_registry_and_serves(tmp_path):
    made = subprocess.run([sys.executable, "scripts/bundle.py", "--out", str(tmp_path / "dist")], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert made.returncode == 0, made.stderr[-3000:]
    tarball = Path(made.stdout.strip().splitlines()[-1])
    print(f"bundle: {tarball.name}, {tarball.stat().st_size / 1e6:.0f} MB")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (root,) = (tmp_path / "unpacked").iterdir()
    env = offline_env(tmp_path)
    venv = tmp_path / "venv"
    installed = subprocess.run([str(root / "install.sh"), str(venv)], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    meshctl = venv / "bin" / "meshctl"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import meshctl.cli, mesh_llama_cpp.build as b; "
                            "print(meshctl.cli.__file__); print(b.is_built())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    module_file, built = where.stdout.split()
    assert module_file.startswith(str(venv)) and built == "True", where  # the wheel's copy, binaries in place

    home, port = tmp_path / "home", free_port()
    up = subprocess.run([str(meshctl), "up", "-d", "--home", str(home), "--port", str(port)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    try:
        wait_until(lambda: _healthy(port), timeout=180, interval=0.5, what="the installed node serving")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "Hello!"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop", r.text
    finally:
        subprocess.run([str(meshctl), "down", "--home", str(home)], env=env, capture_output=True, timeout=60)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
