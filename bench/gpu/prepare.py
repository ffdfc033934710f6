"""Pack what the GPU machine needs into .gpu/ (ignored by git; at most 64 MiB, the device tool's limit):

    .gpu/llama-src.tar.gz   the pinned llama.cpp source (from the verified sdist), trimmed of what a CUDA
                            build of ggml-rpc-server + llama-server does not use (models, docs, other backends)
    .gpu/wheels/*.whl       the Python packages the benchmark needs that the machine's image lacks (cp312)

No real model fits beside them: the registry's smallest, SmolLM2-135M-Instruct, is 98 MB as Q4_1, and its
576-wide rows rule out the 2-3 bit K-quants (they need multiples of 256), so a requantized copy stays near
80 MB. run.sh writes a random-weight 7B there instead (tests/support/random_gguf.py).

    python -m bench.gpu.prepare            # then: the device tool runs `bash bench/gpu/run.sh` with carry [".gpu"]

The machine has no package registry, so everything comes from here; bench/gpu/run.sh builds CUDA from
that source with llama.cpp/build.py (MESH_LLAMA_SOURCE) and runs the product-layout benchmark.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / ".gpu"
LIMIT = 64 << 20
# Not in the GPU machine's image (or too old there): the product's dependencies the benchmark imports.
WHEELS = ["pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection",
          "typing-extensions", "python-dotenv", "gguf", "aioquic", "pylsqpack", "pyopenssl", "service-identity",
          "cryptography", "cffi", "pycparser", "pyzmq", "httpx", "httpcore", "h11", "anyio", "sniffio", "idna",
          "aioice", "dnspython", "ifaddr"]  # the last three: common/nat (the tunnel lane imports it)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_26_x86_64", "manylinux_2_24_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]
# Trimmed from the source: nothing a CUDA (or CPU) build of the two targets reads.
SKIP_DIRS = ("models", "docs", "examples", "tests", "gguf-py", "benches", "media", ".github", "tools/ui/tests",
             *(f"ggml/src/ggml-{b}" for b in ("vulkan", "sycl", "opencl", "cann", "musa", "hip", "metal",
                                               "hexagon", "et", "openvino", "virtgpu", "webgpu", "zdnn", "zendnn")))


def build_module():
    spec = importlib.util.spec_from_file_location("llama_cpp_build", REPO / "llama.cpp" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trimmed_source(target: Path) -> None:
    build = build_module()
    pin = build.load_pin()
    sdist = build.cache_root() / "sdist" / pin["sdist"]
    if not sdist.is_file() or build.sha256_of(sdist) != pin["sha256"]:
        raise SystemExit(f"{sdist} does not match pin.json's sha256; run llama.cpp/build.py first")
    prefix = f"{pin['sdist'][:-len('.tar.gz')]}/{pin['subdir']}/"
    skip = tuple(prefix + d + "/" for d in SKIP_DIRS)
    with tarfile.open(sdist) as src, tarfile.open(target, "w:gz") as dst:
        for member in src:
            if not member.name.startswith(prefix) or member.name.startswith(skip) or member.name == prefix + ".git":
                continue
            member.name = "llama.cpp/" + member.name[len(prefix):]
            member.pax_headers.pop("path", None)  # a long name lives there too, and would win over .name
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)


def wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        version = importlib.metadata.version(name)
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                        f"{name}=={version}"], check=True)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    source = OUT / "llama-src.tar.gz"
    if not source.exists():
        trimmed_source(source)
    if not (OUT / "wheels").exists():
        wheels(OUT / "wheels")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {total / (1 << 20):.1f} MiB (limit {LIMIT >> 20} MiB with the repo)")
    return 0 if total < LIMIT - (4 << 20) else 1


if __name__ == "__main__":
    sys.exit(main())
