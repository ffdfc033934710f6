"""What exact small batches cost: our llama.cpp patch 0004 makes a batch of up to 32 tokens compute
every token as a batch of one does, so that speculation at temperature 0 gives the very text decoding
without it gives (tests/integration/test_speculation.py). `GGML_CPU_EXACT_BATCH=0` gives the stock
kernels back, in the same binaries, so both run here side by side and take turns.

For each round, each numerics (exact, stock), each layout (solo; split: host + one ggml-rpc-server on
loopback, runnerd's command line) and each speculation mode (off, ngram): the test's three prompts
(two edits, one free text), 200 tokens, greedy. Prints the median prefill and decode tok/s of each
and whether the text with speculation equals the text without it.

    python -m bench.bench_exact                      # smollm2, 2 rounds
    python -m bench.bench_exact --model gemma --rounds 3 --modes off

Writes bench/results/exact-latest.json. Note the load average (printed) next to any figure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from bench.models import ensure_model
from bench.workloads import edit_messages, free_messages
from common.binaries import find_binaries
from common.gguf_info import inspect_gguf
from common.messages import Plan, PlanMember
from services.runnerd.commands import llama_server_args
from services.runnerd.speculation import speculation_args
from tests.support.llama_procs import ServerProcess, start_rpc_server, wait_until_healthy
from tests.support.procs import free_port, popen_in_own_session

RESULTS = Path(__file__).resolve().parent / "results"
NUMERICS = {"exact": {}, "stock": {"GGML_CPU_EXACT_BATCH": "0"}}


def numerics_env(name: str) -> dict[str, str]:
    """exact, stock, or partsN: only the paths in mask N exact (1 sgemm, 2 tiled, 4 repack, 8 flash attention)."""
    if name.startswith("parts"):
        return {"GGML_CPU_EXACT_PARTS": name[len("parts"):]}
    return NUMERICS[name]
PLANS = {
    "solo": Plan(state="solo", host="host", key="k", members=[PlanMember(node_id="host", memory_bytes=1, ratio=1.0)]),
    "split": Plan(state="split", host="host", key="k", members=[PlanMember(node_id="host", memory_bytes=1, ratio=0.5),
                                                               PlanMember(node_id="worker", memory_bytes=1, ratio=0.5)]),
}
PROMPTS = (edit_messages(0), edit_messages(1), free_messages(0))


def run_one(bins, model: Path, tmp: Path, numerics: str, layout: str, mode: str, max_tokens: int) -> list[dict]:
    env = os.environ | numerics_env(numerics)
    info = inspect_gguf(model)
    name = f"{numerics}-{layout}-{mode}"
    with contextlib.ExitStack() as stack:
        endpoints = {}
        if layout == "split":
            worker = start_rpc_server(bins, tmp, name=f"rpc-{name}", gguf=model if bins.loads_local_weights else None,
                                      env=env)
            stack.callback(worker.stop)
            endpoints = {"worker": f"127.0.0.1:{worker.port}"}
        port = free_port()
        args = llama_server_args(bins, port, info, PLANS[layout], "host", endpoints, backend="cpu", ctx_size=4096,
                                 threads=None, speculation=speculation_args(mode, draft_model=None, backend="cpu",
                                                                            device=None))
        log = tmp / f"llama-{name}.log"
        llama = ServerProcess(f"llama-{name}", popen_in_own_session(args, log_path=log, env=env), "127.0.0.1", port, log)
        stack.callback(llama.stop)
        wait_until_healthy(llama, timeout=180)
        out = []
        with httpx.Client(base_url=llama.url, timeout=600) as client:
            for messages in PROMPTS:
                body = client.post("/v1/chat/completions", json={
                    "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                    "cache_prompt": False}).raise_for_status().json()
                t = body["timings"]
                out.append({"text": body["choices"][0]["message"]["content"], "prefill": t["prompt_per_second"],
                            "decode": t["predicted_per_second"], "prompt_n": t["prompt_n"],
                            "predicted_n": t["predicted_n"]})
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma or a GGUF path")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layouts", default="solo,split")
    ap.add_argument("--modes", default="off,ngram")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--numerics", default="exact,stock", help="exact, stock, partsN (mask N: 1 sgemm, 2 tiled, "
                    "4 repack, 8 flash attention), comma-separated; they take turns")
    ap.add_argument("--name", default="exact-latest")
    a = ap.parse_args()
    bins = find_binaries(None, build_if_missing=True)
    model = ensure_model(a.model) if a.model in ("smollm2", "gemma") else Path(a.model)
    layouts, modes = a.layouts.split(","), a.modes.split(",")
    runs: dict[str, list[list[dict]]] = {}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench-exact-") as tmp:
        # Not counted: the first run here was 5-8x slower than every later one, whichever numerics ran first.
        run_one(bins, model, Path(tmp), a.numerics.split(",")[0], layouts[0], modes[0], 16)
        for r in range(a.rounds):
            variants = a.numerics.split(",")
            order = variants if r % 2 == 0 else variants[::-1]  # alternate: load drift hits all alike
            for numerics in order:
                for layout in layouts:
                    for mode in modes:
                        key = f"{numerics} {layout} {mode}"
                        got = run_one(bins, model, Path(tmp), numerics, layout, mode, a.max_tokens)
                        runs.setdefault(key, []).append(got)
                        loads.append(os.getloadavg()[0])
                        print(f"round {r + 1} {key:20s} prefill " + " ".join(f"{x['prefill']:6.0f}" for x in got)
                              + "  decode " + " ".join(f"{x['decode']:5.1f}" for x in got)
                              + f"  load {loads[-1]:.1f}", file=sys.stderr, flush=True)
    summary = {}
    print(f"\nmodel {model.name}, {a.rounds} rounds, load average {min(loads):.1f}-{max(loads):.1f}; medians over "
          "rounds and prompts, tok/s")
    print(f"{'numerics':8s} {'layout':6s} {'spec':6s} {'prefill':>8s} {'decode':>7s}  text = spec off")
    for key, rounds in runs.items():
        numerics, layout, mode = key.split()
        flat = [x for got in rounds for x in got]
        same = None
        base = runs.get(f"{numerics} {layout} off")
        if mode != "off" and base:
            same = all(x["text"] == y["text"] for got, ref in zip(rounds, base) for x, y in zip(got, ref))
        summary[key] = {"prefill": statistics.median(x["prefill"] for x in flat),
                        "decode": statistics.median(x["decode"] for x in flat), "same_text_as_off": same}
        s = summary[key]
        print(f"{numerics:8s} {layout:6s} {mode:6s} {s['prefill']:8.0f} {s['decode']:7.1f}  "
              f"{'' if same is None else ('yes' if same else 'NO')}")
    for layout in layouts:
        for mode in modes:
            e, s = summary.get(f"exact {layout} {mode}"), summary.get(f"stock {layout} {mode}")
            if e and s:
                print(f"exact/stock {layout} {mode}: prefill {e['prefill'] / s['prefill']:.2f}x, "
                      f"decode {e['decode'] / s['decode']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(
        {"model": model.name, "rounds": a.rounds, "load": [min(loads), max(loads)], "summary": summary,
         "runs": {k: [[{f: v for f, v in x.items() if f != "text"} for x in got] for got in rs]
                  for k, rs in runs.items()}}, indent=1))


if __name__ == "__main__":
    main()
