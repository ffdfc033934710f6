"""Solo node: time from `meshctl up` to the first answer, and decode speed through :9337 vs llama-server
directly, in one run with the same llama-server (python -m bench.bench_solo [--model PATH])."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common.local_keys import read_llama_key
from tests.support.procs import free_port, wait_until

BODY = {"prompt": "Write a short story about a lighthouse keeper.", "max_tokens": 128, "temperature": 0,
        "seed": 1, "cache_prompt": False}


def meshctl(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshctl.cli", *args, "--home", str(home)], capture_output=True,
                          text=True, timeout=600)


def completion(base: str, headers: dict | None = None) -> tuple[float, float]:
    """(server-side decode tok/s, client-side tok/s over the whole request)."""
    started = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", json=BODY, timeout=300, headers=headers)
    r.raise_for_status()
    wall = time.monotonic() - started
    data = r.json()
    return data["timings"]["predicted_per_second"], data["usage"]["completion_tokens"] / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-solo-"))
    port = free_port()
    flags = ["--port", str(port)] + (["--model", args.model] if args.model else [])
    started = time.monotonic()
    out = meshctl("up", "-d", *flags, home=home)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return 1
    api = f"http://127.0.0.1:{port}"
    try:
        def answered() -> bool:
            try:
                return httpx.post(f"{api}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=30).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(answered, timeout=600, interval=0.2, what="the first answer")
        first_answer = time.monotonic() - started
        status = json.loads(meshctl("status", "--json", home=home).stdout)
        direct = f"http://127.0.0.1:{status['runnerd']['llama']['port']}"
        llama_key = {"Authorization": f"Bearer {read_llama_key(home)}"}  # runnerd's llama-server wants its key
        rows = {"mesh :9337": [], "llama-server direct": []}
        for _ in range(args.runs):  # interleaved, so load from elsewhere hits both alike
            rows["llama-server direct"].append(completion(direct, llama_key))
            rows["mesh :9337"].append(completion(api))
        print(f"meshctl up → first answer: {first_answer:.1f} s (model and llama.cpp already cached)")
        print(f"{'path':<22} {'decode tok/s (server)':>22} {'end-to-end tok/s':>18}")
        medians = {}
        for name, results in rows.items():
            medians[name] = (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))
            print(f"{name:<22} {medians[name][0]:>22.1f} {medians[name][1]:>18.1f}")
        ratio = medians["mesh :9337"][1] / medians["llama-server direct"][1]
        print(f"end-to-end ratio mesh/direct: {ratio:.3f}")
    finally:
        meshctl("down", home=home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
