"""Product-layout benchmark: the mesh as a user runs it against stock llama.cpp RPC by hand.

One host and one worker (ggml-rpc-server) on this machine; the host's llama-server runs runnerd's
own command line (the host keeps half of the layers and the output matrix). Three ways, the very
same command line apart from `--rpc` and the speculation flags, same binaries, same run:

    stock      llama-server --rpc straight to the worker's rpc-server (through a delay relay with RTT)
    mesh-off   the mesh's path to the worker (--lane), speculation off
    mesh       the same path, speculation as `--speculative auto` chooses for that round trip

Lanes: rpc-tls (the default: llama.cpp's own mutual TLS, pinned to node ids, straight to the worker's
rpc-server, what the host uses where the worker's address connects), tcp (gatewayd's tunnel, TLS
over TCP: the fallback), quic (gatewayd's QUIC lane), plain (direct TCP without TLS, the mesh's
rpc-server otherwise: to tell TLS's cost from the rest). The tunnels carry llama.cpp's mutual TLS
inside, end to end, as runnerd runs a tunnelled worker; tcp-plain and quic-plain carry plain RPC.

Workloads on real text (bench/workloads.py): an agent-style edit that returns its input with one
rename, and free text, greedy (temperature 0). At each RTT the three ways are up at once and take
turns, prompt by prompt, so the noise of a shared machine hits all of them alike; medians reported.

    python -m bench.bench_product                         # gemma + smollm2, RTT 0,5,20,50 ms
    python -m bench.bench_product --quick                 # one prompt per workload, fewer tokens
    python -m bench.bench_product --models smollm2 --rtts 0,20

Writes bench/results/product-latest.json and product-latest.png.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.models import ensure_model
from bench.paths import PATHS, Endpoints
from bench.workloads import WORKLOADS
from common.binaries import BinariesError, find_binaries
from common.gguf_info import inspect_gguf
from common.identity import NodeIdentity
from common.messages import Plan, PlanMember
from services.runnerd.commands import llama_server_args
from services.runnerd.speculation import choose_speculation, draft_counts, speculation_args
from tests.support.llama_procs import ServerProcess, start_rpc_server, wait_until_healthy
from tests.support.procs import free_port, popen_in_own_session

RESULTS_DIR = Path(__file__).resolve().parent / "results"
WAYS = ("stock", "mesh-off", "mesh")
HOST, WORKER = "host", "worker"
CTX_SIZE = 4096
LOOPBACK_RTT_MS = 0.1  # what meshd measures between two nodes on one machine
MAX_TOKENS = {"edit": 256, "free": 96}
QUICK_MAX_TOKENS = {"edit": 160, "free": 48}
LANES = ("rpc-tls", "tcp", "quic", "plain", "tcp-plain", "quic-plain")
TLS_LANES = ("rpc-tls", "tcp", "quic")
TUNNEL_PATHS = {"tcp": "mesh", "quic": "mesh-quic", "tcp-plain": "mesh", "quic-plain": "mesh-quic"}


@dataclass
class Sample:
    model: str
    workload: str
    rtt_ms: float
    way: str
    prompt: int
    decode_tps: float
    prefill_tps: float
    tokens: int
    drafted: int | None = None
    accepted: int | None = None
    text_sha: str = ""
    round: int = 0
    load: float = 0.0  # 1-minute load average when the answer came


@dataclass
class Cell:
    """Medians of one (model, workload, RTT, way)."""
    model: str
    workload: str
    rtt_ms: float
    way: str
    speculation: str = ""
    decode_tps: float | None = None
    prefill_tps: float | None = None
    decode_vs_stock: float | None = None
    prefill_vs_stock: float | None = None
    acceptance: float | None = None
    # median over (round, prompt) of this way's decode / stock's decode of the same prompt in the same
    # round: adjacent in time, so load drift cancels better than in the ratio of medians
    decode_vs_stock_paired: float | None = None
    samples: list[float] = field(default_factory=list)
    error: str | None = None


class Setup:
    """One way's processes at one RTT: rpc-server, the path to it, llama-server."""

    def __init__(self, way: str, rtt_ms: float, bins, model: Path, log_dir: Path, stack: contextlib.ExitStack,
                 lane: str = "tcp", speculation: str = "auto", threads: int | None = None,
                 spec_extra: list[str] = (), server_extra: list[str] = ()):
        self.way = way
        info = inspect_gguf(model)
        mesh = way != "stock"
        tls_env, tls_flags, pin = None, [], ""
        # The tunnel lanes carry llama.cpp's own mutual TLS inside, as runnerd runs a tunnelled worker
        # ("tunnel, TLS inside": the patch writes each RPC message as one TLS record); *-plain: plain RPC inside.
        if mesh and lane in TLS_LANES:
            host_id, worker_id = (NodeIdentity.load_or_create(log_dir / "identities" / n) for n in (HOST, WORKER))
            (allow := log_dir / "identities" / "rpc-allow").write_text(host_id.node_id + "\n")
            tls_flags = ["--tls-cert", str(worker_id.cert_path), "--tls-key", str(worker_id.key_path), "--tls-allow",
                         str(allow)]
            tls_env = os.environ | {"GGML_RPC_TLS_CERT": str(host_id.cert_path), "GGML_RPC_TLS_KEY": str(host_id.key_path)}
            pin = f"{worker_id.node_id}@"
        worker = start_rpc_server(bins, log_dir, name=f"rpc-{way}-{rtt_ms:g}", threads=threads,
                                  gguf=model if mesh and bins.loads_local_weights else None, tls=tls_flags)
        stack.callback(worker.stop)
        path = PATHS[TUNNEL_PATHS.get(lane, "stock-direct") if mesh else "stock-direct"]
        endpoints: Endpoints = stack.enter_context(path.open([worker.address], rtt_ms))
        plan = Plan(state="split", host=HOST, key="bench", members=[PlanMember(node_id=HOST, memory_bytes=1, ratio=0.5),
                                                                    PlanMember(node_id=WORKER, memory_bytes=1, ratio=0.5)])
        if way == "mesh":
            self.choice = choose_speculation(speculation, draft_model=None, remote_rtts_ms=[max(rtt_ms, LOOPBACK_RTT_MS)])
        else:
            self.choice = choose_speculation("off", draft_model=None, remote_rtts_ms=[])
        spec = speculation_args(self.choice.mode, draft_model=None, backend=_backend(), device=None)
        if spec:
            spec += list(spec_extra)
        port = free_port()
        args = llama_server_args(bins, port, info, plan, HOST, {WORKER: f"{pin}127.0.0.1:{endpoints[0][1]}"}, backend=_backend(),
                                 ctx_size=CTX_SIZE, threads=threads, speculation=spec) + list(server_extra)
        log_path = log_dir / f"llama-{way}-{rtt_ms:g}.log"
        self.llama = ServerProcess(f"llama-{way}", popen_in_own_session(args, log_path=log_path, env=tls_env),
                                   "127.0.0.1", port, log_path)
        stack.callback(self.llama.stop)
        self.args = args

    def ready(self, timeout: float) -> None:
        wait_until_healthy(self.llama, timeout=timeout)

    def ask(self, client: httpx.Client, messages: list[dict], max_tokens: int, ignore_eos: bool = False) -> dict:
        before = self.draft_counts(client)
        response = client.post(f"{self.llama.url}/v1/chat/completions", json={
            "messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 42, "cache_prompt": False,
            "ignore_eos": ignore_eos})
        if response.status_code != 200:
            self.llama.check_alive()
            response.raise_for_status()
        body = response.json()
        after = self.draft_counts(client)
        body["_drafts"] = (after[0] - before[0], after[1] - before[1]) if before and after else None
        return body

    def draft_counts(self, client: httpx.Client) -> tuple[int, int] | None:
        return draft_counts(client.get(f"{self.llama.url}/metrics").text)


def _backend() -> str:
    from bench.bench_rpc import gpu_names
    return "cuda" if gpu_names() else "cpu"


def measure_rtt(model_name: str, model: Path, rtt_ms: float, args, bins, log_dir: Path) -> list[Sample]:
    samples: list[Sample] = []
    with contextlib.ExitStack() as stack, httpx.Client(timeout=args.request_timeout) as client:
        setups = [Setup(way, rtt_ms, bins, model, log_dir, stack, args.off_lane if way == "mesh-off" else args.lane,
                        args.speculation, args.threads, args.spec_extra.split(), args.server_extra.split())
                  for way in WAYS]
        for s in setups:
            s.ready(args.load_timeout)
        for s in setups:  # warm-up: llama.cpp's one-time set-up, outside the timed requests
            s.ask(client, WORKLOADS["free"](99), 4)
        max_tokens = QUICK_MAX_TOKENS if args.quick else MAX_TOKENS
        if args.max_tokens:
            max_tokens = {w: args.max_tokens for w in max_tokens}
        turns = [(r, workload, prompt) for r in range(args.rounds) for workload in args.workloads
                 for prompt in range(args.prompts)]
        for turn, (round_number, workload, prompt) in enumerate(turns):
            order = setups[turn % 3:] + setups[:turn % 3]  # rotate who goes first
            for s in order:
                body = s.ask(client, WORKLOADS[workload](prompt), max_tokens[workload], args.ignore_eos)
                timings = body["timings"]
                text = body["choices"][0]["message"]["content"]
                drafts = body["_drafts"]
                samples.append(Sample(model_name, workload, rtt_ms, s.way, prompt,
                                      timings["predicted_per_second"], timings["prompt_per_second"],
                                      timings["predicted_n"], *(drafts or (None, None)),
                                      text_sha=hashlib.sha256(text.encode()).hexdigest()[:12],
                                      round=round_number, load=os.getloadavg()[0]))
                print(f"  {model_name} {workload} {rtt_ms:g} ms {s.way:<8} round {round_number} prompt {prompt}: "
                      f"{timings['predicted_per_second']:6.1f} tok/s ({timings['predicted_n']} tokens"
                      + (f", drafts {drafts[1]}/{drafts[0]}" if drafts and drafts[0] else "")
                      + f", load {os.getloadavg()[0]:.1f})", flush=True)
    return samples


def summarise(samples: list[Sample], speculation_by_rtt: dict[float, str]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for s in samples:
        key = (s.model, s.workload, s.rtt_ms, s.way)
        cell = cells.setdefault(key, Cell(s.model, s.workload, s.rtt_ms, s.way))
        cell.samples.append(s.decode_tps)
    for (model, workload, rtt, way), cell in cells.items():
        mine = [s for s in samples if (s.model, s.workload, s.rtt_ms, s.way) == (model, workload, rtt, way)]
        cell.decode_tps = statistics.median(s.decode_tps for s in mine)
        cell.prefill_tps = statistics.median(s.prefill_tps for s in mine)
        drafted = sum(s.drafted or 0 for s in mine)
        cell.acceptance = sum(s.accepted or 0 for s in mine) / drafted if drafted else None
        cell.speculation = speculation_by_rtt.get(rtt, "off") if way == "mesh" else "off"
    for cell in cells.values():
        stock = cells.get((cell.model, cell.workload, cell.rtt_ms, "stock"))
        if stock and stock.decode_tps:
            cell.decode_vs_stock = cell.decode_tps / stock.decode_tps
            cell.prefill_vs_stock = cell.prefill_tps / stock.prefill_tps
            stock_by_turn = {(s.round, s.prompt): s.decode_tps for s in samples
                             if (s.model, s.workload, s.rtt_ms, s.way) == (cell.model, cell.workload, cell.rtt_ms, "stock")}
            ratios = [s.decode_tps / stock_by_turn[(s.round, s.prompt)] for s in samples
                      if (s.model, s.workload, s.rtt_ms, s.way) == (cell.model, cell.workload, cell.rtt_ms, cell.way)
                      and stock_by_turn.get((s.round, s.prompt))]
            cell.decode_vs_stock_paired = statistics.median(ratios) if ratios else None
    return sorted(cells.values(), key=lambda c: (c.model, c.workload, c.rtt_ms, WAYS.index(c.way)))


def format_table(cells: list[Cell]) -> str:
    lines = ["| model | workload | RTT | stock tok/s | mesh-off tok/s | mesh tok/s (speculation) | mesh-off / stock | "
             "mesh / stock | paired mesh-off / stock | paired mesh / stock | prefill mesh-off / stock | "
             "prefill mesh / stock | drafts accepted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, dict[str, Cell]] = {}
    for c in cells:
        groups.setdefault((c.model, c.workload, c.rtt_ms), {})[c.way] = c
    for (model, workload, rtt), ways in groups.items():
        stock, off, mesh = (ways.get(w) for w in WAYS)

        def f(c: Cell | None, attr: str, spec: str) -> str:
            value = getattr(c, attr) if c else None
            return "-" if value is None else format(value, spec)
        lines.append(f"| {model} | {workload} | {rtt:g} ms | {f(stock, 'decode_tps', '.1f')} | {f(off, 'decode_tps', '.1f')} | "
                     f"{f(mesh, 'decode_tps', '.1f')} ({mesh.speculation if mesh else '-'}) | "
                     f"{f(off, 'decode_vs_stock', '.2f')}× | {f(mesh, 'decode_vs_stock', '.2f')}× | "
                     f"{f(off, 'decode_vs_stock_paired', '.2f')}× | {f(mesh, 'decode_vs_stock_paired', '.2f')}× | "
                     f"{f(off, 'prefill_vs_stock', '.2f')}× | {f(mesh, 'prefill_vs_stock', '.2f')}× | "
                     f"{f(mesh, 'acceptance', '.0%')} |")
    return "\n".join(lines)


def plot(cells: list[Cell], out: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c.model, c.workload) for c in cells})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 8), squeeze=False)
    for i, (model, workload) in enumerate(panels):
        for way in WAYS:
            rows = sorted((c for c in cells if (c.model, c.workload, c.way) == (model, workload, way)),
                          key=lambda c: c.rtt_ms)
            xs = [c.rtt_ms for c in rows]
            color = {"stock": "C0", "mesh-off": "C1", "mesh": "C2"}[way]
            axes[0][i].plot(xs, [c.decode_tps for c in rows], marker="o", label=way, color=color)
            if way != "stock":
                axes[1][i].plot(xs, [c.decode_vs_stock for c in rows], marker="o", label=f"{way} / stock", color=color)
        axes[0][i].set_title(f"{model}, {workload}: decode tok/s")
        axes[1][i].set_title(f"{model}, {workload}: decode / stock")
        axes[1][i].axhline(1.0, color="grey", linestyle="--")
        for ax in axes[:, i]:
            ax.set_xlabel("injected RTT (ms)")
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
        axes[0][i].legend(fontsize=8)
        axes[1][i].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def _list(text: str, convert=str) -> list:
    return [convert(x.strip()) for x in text.split(",") if x.strip()]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_list, default=["gemma", "smollm2"], help="gemma, smollm2 or GGUF paths")
    parser.add_argument("--rtts", type=lambda s: _list(s, float), default=[0.0, 5.0, 20.0, 50.0])
    parser.add_argument("--workloads", type=_list, default=list(WORKLOADS), help="edit, free")
    parser.add_argument("--prompts", type=int, default=3, help="distinct prompts per workload (median reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times through the prompts (more samples per cell on a noisy machine)")
    parser.add_argument("--quick", action="store_true", help="one prompt per workload, fewer tokens")
    parser.add_argument("--max-tokens", type=int, help="tokens per answer for every workload (default: per workload)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="always decode --max-tokens (for random-weight models, whose answers end anywhere)")
    parser.add_argument("--speculation", choices=("auto", "off", "ngram"), default="auto",
                        help="the `mesh` way's --speculative (default auto, as a user runs it; ngram: to measure it "
                             "where auto leaves it off)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of every llama-server and rpc-server (runnerd's --threads; default llama.cpp's)")
    parser.add_argument("--spec-extra", default="", help="more llama-server flags for the mesh way when it "
                        "speculates, to try settings (e.g. \"--spec-ngram-mod-n-max 16\")")
    parser.add_argument("--server-extra", default="", help="more llama-server flags for all three ways alike "
                        "(the command line stays the same for stock and mesh), e.g. \"--poll 0\"")
    parser.add_argument("--lane", choices=LANES, default="rpc-tls",
                        help="the mesh's path: rpc-tls (llama.cpp's own mutual TLS, direct: the default between "
                             "reachable nodes), tcp (the tunnel's TLS lane, the fallback), quic (its QUIC lane) — "
                             "both tunnels with llama.cpp's TLS inside, as the product runs them; tcp-plain and "
                             "quic-plain carry plain RPC inside instead; plain (direct TCP without TLS: what TLS "
                             "itself costs, against rpc-tls)")
    parser.add_argument("--off-lane", choices=LANES,
                        help="the mesh-off way's path instead (default: --lane); e.g. --off-lane tcp --speculation off "
                             "compares the tunnel with the direct path in one run")
    parser.add_argument("--bin-dir", type=Path)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="product-latest", help="file name of the results (json, png)")
    parser.add_argument("--load-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts = 1
    args.off_lane = args.off_lane or args.lane
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    try:
        bins = find_binaries(args.bin_dir)
        models = {(name if name in ("gemma", "smollm2") else Path(name).stem): ensure_model(name) for name in args.models}
    except (BinariesError, FileNotFoundError) as e:
        print(f"bench_product: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-product-"))
    started, samples, errors = time.monotonic(), [], []
    speculation_by_rtt = {rtt: choose_speculation(args.speculation, draft_model=None,
                                                  remote_rtts_ms=[max(rtt, LOOPBACK_RTT_MS)]).mode for rtt in args.rtts}
    try:
        for name, path in models.items():
            for rtt in args.rtts:
                print(f"[{time.monotonic() - started:6.0f}s] {name} at {rtt:g} ms", flush=True)
                try:
                    samples += measure_rtt(name, path, rtt, args, bins, log_dir)
                except (httpx.HTTPError, RuntimeError, TimeoutError, OSError) as e:
                    errors.append(f"{name} {rtt:g} ms: {type(e).__name__}: {e}")
                    print(f"  failed: {errors[-1]}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", file=sys.stderr)
    cells = summarise(samples, speculation_by_rtt)
    table = format_table(cells)
    print()
    print(table)
    texts: dict[tuple, set[str]] = {}
    for s in samples:
        texts.setdefault((s.model, s.workload, s.rtt_ms, s.prompt, s.round), set()).add(s.text_sha)
    same = sum(len(v) == 1 for v in texts.values())
    print(f"\nsame answer from all three ways (temperature 0): {same} of {len(texts)} prompts")
    print(f"\n{len(samples)} requests in {time.monotonic() - started:.0f} s; logs in {log_dir}")
    from bench.bench_rpc import gpu_names
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpu_names()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "lane": args.lane,
              "server_extra": args.server_extra, "threads": args.threads,
              "off_lane": args.off_lane,
              "models": {k: str(v) for k, v in models.items()}, "rtts_ms": args.rtts, "quick": args.quick,
              "rounds": args.rounds, "speculation_by_rtt": speculation_by_rtt, "errors": errors,
              "load_range": [min((s.load for s in samples), default=0), max((s.load for s in samples), default=0)],
              "same_answer_prompts": [same, len(texts)], "table": table,
              "cells": [asdict(c) for c in cells], "samples": [asdict(s) for s in samples]}
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    where = "GPU: " + machine["gpus"][0] if machine["gpus"] else f"{os.cpu_count()}-core CPU"
    plotted = bool(cells) and plot(cells, args.out_dir / f"{args.name}.png",
                                   f"product layout, host + 1 worker, {where}: stock vs mesh-off ({args.off_lane}, "
                                   f"speculation off) and mesh ({args.lane}, speculation {args.speculation})")
    print(f"wrote {args.out_dir / (args.name + '.json')}" + (" and .png" if plotted else ""))
    return 0 if samples and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
