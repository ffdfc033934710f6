"""`meshctl up`'s flags come from the Settings model; the README's flag table matches `meshctl up --help`."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.binaries import backend_from_devices, backend_from_libraries
from common.settings import NOT_FLAGS, Settings
from common.settings_cli import flag_name
from meshctl.cli import build_parser, service_env, settings_from_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("MESH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MESH_HOME", str(tmp_path))


def up(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["up", *argv]))


def test_every_setting_is_a_flag_of_up():
    options = {opt for action in build_parser()._subparsers._group_actions[0].choices["up"]._actions
               for opt in action.option_strings}
    assert {flag_name(name) for name in Settings.model_fields if name not in NOT_FLAGS} <= options


def test_flags_reach_settings_with_their_types():
    s = up("--port", "9400", "--join", "t1", "--join", "t2,t3", "--split", "--tensor-split", "0.85,0.15",
           "--max-vram", "6G", "--llama-backend", "cpu", "--wait-for-host", "5")
    assert (s.port, s.join, s.split, s.tensor_split, s.max_vram, s.llama_backend, s.wait_for_host) == \
        (9400, ["t1", "t2", "t3"], True, [0.85, 0.15], 6 << 30, "cpu", 5.0)


def test_unset_flags_leave_variables_and_config_file_in_force(monkeypatch, tmp_path):
    (tmp_path / "config.toml").write_text('ctx_size = 2048\nllama_cache = "/srv/llama-cache"\n')
    monkeypatch.setenv("MESH_PORT", "9500")
    s = up("--threads", "3")
    assert (s.port, s.ctx_size, s.threads, s.llama_cache) == (9500, 2048, 3, Path("/srv/llama-cache"))
    assert up("--port", "9600").port == 9600


def test_build_settings_reach_every_service(monkeypatch, tmp_path):
    """A build setting given only in config.toml still reaches supervisord's children; MESH_* variables
    that are not settings pass through untouched."""
    (tmp_path / "config.toml").write_text('llama_cache = "/srv/llama-cache"\ncuda_arch = "90"\n')
    monkeypatch.setenv("MESH_LLAMA_BACKEND", "cpu")
    monkeypatch.setenv("MESH_SOMETHING_ELSE", "kept")
    env = service_env(up("--llama-source", str(tmp_path / "src.tar.gz"), "--models-dir", str(tmp_path / "m")))
    assert env["MESH_LLAMA_CACHE"] == "/srv/llama-cache" and env["MESH_CUDA_ARCH"] == "90"
    assert env["MESH_LLAMA_BACKEND"] == "cpu" and env["MESH_LLAMA_SOURCE"] == str(tmp_path / "src.tar.gz")
    assert env["MESH_MODELS_DIR"] == str(tmp_path / "m") and env["MESH_SOMETHING_ELSE"] == "kept"


@pytest.mark.parametrize("argv,expected", [
    (["up", "--port", "0"], "--port (MESH_PORT)"),
    (["up", "--llama-backend", "opencl"], "--llama-backend (MESH_LLAMA_BACKEND)"),
    (["up", "--max-vram", "lots"], "--max-vram (MESH_MAX_VRAM)"),
])
def test_a_bad_flag_is_one_line_naming_the_flag(argv, expected, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")} | {"MESH_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "meshctl.cli", *argv], capture_output=True, text=True, env=env,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid ") and expected in lines[0], out.stderr


def help_flags() -> dict[str, str]:
    """{flag: default} as `meshctl up --help` prints them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")} | {"COLUMNS": "300"}
    text = subprocess.run([sys.executable, "-m", "meshctl.cli", "up", "--help"], capture_output=True, text=True,
                          env=env, check=True, timeout=60, cwd=REPO).stdout
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    flags = {}
    for block in blocks:
        block = " ".join(block.split())
        names = re.findall(r"(?:^|, )(--?[a-z][\w-]*)", block.split("  ")[0])
        long = [n for n in names if n.startswith("--")]
        if not long or long[0] == "--help":
            continue
        default = re.search(r"\(default: (.*?)[;)]", block)
        flags[long[0]] = default.group(1) if default else "?"
    return flags


def readme_flags() -> dict[str, str]:
    section = (REPO / "README.md").read_text().split("## Flags of `meshctl up`", 1)[1].split("\n## ", 1)[0]
    flags = {}
    for row in re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", section, re.M):
        long = [n for n in re.findall(r"--?[a-z][\w-]*", row[0]) if n.startswith("--")]
        flags[long[0]] = row[1].strip()
    return flags


def test_readme_flag_table_matches_meshctl_up_help():
    help_side, readme_side = help_flags(), readme_flags()
    assert len(help_side) > 20
    missing = sorted(set(help_side) - set(readme_side))
    extra = sorted(set(readme_side) - set(help_side))
    assert not missing and not extra, f"README flag table: missing {missing}, not a flag {extra} " \
                                      f"(regenerate: python -m common.settings_cli --write README.md)"
    assert {f: d for f, d in readme_side.items()} == help_side


@pytest.mark.parametrize("listing,backend", [
    ("Available devices:\n", "cpu"),
    ("Available devices:\n  CUDA0: NVIDIA H200 (143771 MiB, 143180 MiB free)\n", "cuda"),
    ("Available devices:\n  MTL0: Apple M2 Max (49152 MiB, 49151 MiB free)\n", "metal"),
    ("Available devices:\n  Vulkan0: AMD Radeon (8192 MiB, 8000 MiB free)\n", "vulkan"),
    ("error: unknown argument: --list-devices", None),
])
def test_backend_from_device_listing(listing, backend):
    assert backend_from_devices(listing) == backend


def test_backend_from_linked_libraries():
    assert backend_from_libraries("libggml-cuda.so => /opt/x/libggml-cuda.so\nlibc.so.6 => /lib/libc.so.6") == "cuda"
    assert backend_from_libraries("libm.so.6 => /lib/libm.so.6") == "cpu"
