"""What llama.cpp's own mutual TLS costs on the GPU, without the product benchmark's noise: llama-bench
(llama.cpp's own, several repetitions) over one ggml-rpc-server on the same GPU, half the layers on each,
through plain TCP (stock) and through our patch's TLS (llama.cpp/patches/0002), turn by turn.

    python -m bench.gpu.tls_probe --model M [--variant PATCH] [--reps 5] [--out DIR]

On the GPU machine (bench/gpu/tls_probe.sh). The build stays in /tmp/tls-probe, so a later call on the
same warm machine rebuilds only what a --variant (a patch on top of ours) changes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu.prepare import build_module
from common.binaries import Binaries
from common.identity import NodeIdentity
from tests.support.llama_procs import start_rpc_server

WORK = Path("/tmp/tls-probe")
TARGETS = ("ggml-rpc-server", "llama-bench")


def build(variant: Path | None) -> Path:
    """The binaries of the pinned source with our patches (and `variant` on top), built incrementally."""
    b = build_module()
    src = WORK / "src"
    if not (src / "build").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        b.copy_local_source(b.source_override(), src)
        b.apply_patches(src)
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", ".", "-B", "build", *gen, *b.cmake_flags("cuda")], cwd=src, check=True,
                       stdout=subprocess.DEVNULL)
    applied = WORK / "variant.patch"
    if applied.exists():  # the previous call's variant comes off first
        subprocess.run(["patch", "-p1", "-R", "-i", str(applied)], cwd=src, check=True, stdout=subprocess.DEVNULL)
        applied.unlink()
    if variant:
        subprocess.run(["patch", "-p1", "-i", str(variant)], cwd=src, check=True)
        applied.write_bytes(variant.read_bytes())
    t0 = time.monotonic()
    subprocess.run(["cmake", "--build", "build", "--target", *TARGETS, "-j", str(os.cpu_count())], cwd=src, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"build: {time.monotonic() - t0:.0f} s", flush=True)
    return src / "build" / "bin"


def llama_bench(bin_dir: Path, model: Path, endpoint: str, env: dict, reps: int, prompts: str) -> list[dict]:
    args = [str(bin_dir / "llama-bench"), "-m", str(model), "-ngl", "99", "--rpc", endpoint, "-ts", "1/1",
            "-p", prompts, "-n", "64", "-r", str(reps), "-o", "json"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        sys.exit(f"llama-bench failed ({endpoint}): {out.stderr[-2000:]}")
    return [{"test": f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}", "tok_s": r["avg_ts"],
             "stddev": r["stddev_ts"]} for r in json.loads(out.stdout)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--variant", type=Path, help="a patch applied on top of ours (-p1) before building")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", default="512,2048")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    bin_dir = build(args.variant)
    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    host, worker = (NodeIdentity.load_or_create(WORK / "ids" / n) for n in ("host", "worker"))
    (allow := WORK / "ids" / "allow").write_text(host.node_id + "\n")
    tls_flags = ["--tls-cert", str(worker.cert_path), "--tls-key", str(worker.key_path), "--tls-allow", str(allow)]
    bins = Binaries(rpc_server=bin_dir / "ggml-rpc-server", llama_server=bin_dir / "llama-server",
                    loads_local_weights=True, backend="cuda", rpc_tls=True)
    plain = start_rpc_server(bins, logs, name="rpc-plain", gguf=args.model)
    tls = start_rpc_server(bins, logs, name="rpc-tls", gguf=args.model, tls=tls_flags)
    ways = {"plain": (f"127.0.0.1:{plain.address[1]}", dict(os.environ)),
            "tls": (f"{worker.node_id}@127.0.0.1:{tls.address[1]}",
                    os.environ | {"GGML_RPC_TLS_CERT": str(host.cert_path), "GGML_RPC_TLS_KEY": str(host.key_path)})}
    rows = []
    try:
        for rnd in range(args.rounds):
            for way in (("plain", "tls") if rnd % 2 == 0 else ("tls", "plain")):
                for r in llama_bench(bin_dir, args.model, *ways[way], args.reps, args.prompts):
                    rows.append(r | {"way": way, "round": rnd, "load": os.getloadavg()[0]})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        plain.stop()
        tls.stop()
    summary = {}
    for test in dict.fromkeys(r["test"] for r in rows):
        best = {w: max(r["tok_s"] for r in rows if r["test"] == test and r["way"] == w) for w in ways}
        summary[test] = {**best, "tls_vs_plain": best["tls"] / best["plain"]}
        print(f"{test}: plain {best['plain']:.1f} tok/s, TLS {best['tls']:.1f} tok/s, TLS/plain {best['tls'] / best['plain']:.3f}")
    name = "tls-probe" + (f"-{args.variant.stem}" if args.variant else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"variant": str(args.variant or ""), "rows": rows,
                                                       "best_of_rounds": summary}, indent=1))


if __name__ == "__main__":
    main()
