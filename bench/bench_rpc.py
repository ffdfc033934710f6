"""Benchmark of the RPC data plane: decode and prefill tok/s and load time of llama-server driving
two ggml-rpc-servers on 127.0.0.1 through each named path (bench/paths.py), at injected RTTs; one
run, same binaries, model and split (all layers offloaded, split 1:1). `local` is llama-server
alone, for reference.

Then the load of a two-node split as the mesh runs it (runnerd's own llama-server command line:
the host keeps half of the model, one worker's ggml-rpc-server the other half) against a local
load of the whole model, llama-server start -> /health ok, each repeated and interleaved.

    python -m bench.bench_rpc                                  # every path, RTT 0,5,10,20 ms
    python -m bench.bench_rpc --paths local,stock-direct --rtts 0,10 --quick
    python -m bench.bench_rpc --paths local,stock-direct,mesh --rtts 0 --load-rtts 0,20

Writes bench/results/latest.json and bench/results/latest.png (the plot only where matplotlib is
installed). On a GPU machine, `--quiet-wait` and `--load-timeout` bound the waits of each run.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.paths import PATHS
from common.binaries import Binaries, BinariesError, find_binaries
from common.gguf_info import inspect_gguf
from common.messages import ModelInfo, Plan, PlanMember
from services.runnerd.commands import llama_server_args
from tests.support.delay_relay import TrafficStats
from tests.support.llama_procs import (DEFAULT_MODEL, ProcessDied, ServerProcess, start_llama_server,
                                       start_rpc_server, wait_until_healthy)
from tests.support.procs import free_port, popen_in_own_session

LOCAL = "local"
BASELINE = "stock-direct"  # ratios are to this path; its 0 ms time per token is the bound's base
RESULTS_DIR = Path(__file__).resolve().parent / "results"
N_RPC_SERVERS = 2
CTX_SIZE = 2048
LOAD_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0
# Before each run, wait (at most QUIET_WAIT_S) until other programs use under QUIET_CORES of CPU:
# on a shared 2-core machine a neighbour's job halves a result (noise only ever slows things down).
QUIET_CORES = 0.25
QUIET_WAIT_S = 30.0

DECODE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PREFILL_SOURCE = (
    "The history of lighthouses begins with fires lit on hilltops to guide ships home. Later, "
    "towers of stone carried lanterns of oil, then lenses that bent the light into a beam seen "
    "twenty miles away. Keepers trimmed wicks, wound clockwork, logged the weather and the ships, "
    "and on stormy nights stayed awake until the dawn. "
)


@dataclass(frozen=True)
class Workload:
    repeats: int = 3
    n_predict: int = 64
    prefill_tokens: int = 512
    seed: int = 42


QUICK_WORKLOAD = Workload(repeats=1, n_predict=32, prefill_tokens=256)
# A request costs round trips of its own (slot setup, prompt batch) besides its tokens' (~2 each
# here); a metered short request before the timed ones lets the per-token figure leave them out.
SHORT_N_PREDICT = 4


def _busy_cpu_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system


def _cpu_seconds_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


class OtherLoad:
    """CPU used by programs other than ours (`pids` + this process) since start, in cores."""

    def __init__(self, pids: list[int]):
        self.pids = [os.getpid(), *pids]
        self.started = time.monotonic()
        self.busy, self.ours = _busy_cpu_seconds(), _cpu_seconds_of(self.pids)

    def cores(self) -> float:
        elapsed = time.monotonic() - self.started
        others = (_busy_cpu_seconds() - self.busy) - (_cpu_seconds_of(self.pids) - self.ours)
        return max(others, 0.0) / elapsed if elapsed > 0 else 0.0


def wait_for_quiet(our_pids: list[int], *, cores: float = QUIET_CORES, timeout: float = QUIET_WAIT_S) -> float:
    """Wait until other programs use under `cores` for a second; return the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        load = OtherLoad(our_pids)
        time.sleep(1.0)
        if load.cores() < cores:
            break
    return time.monotonic() - started


@dataclass
class RunResult:
    label: str
    path: str
    rtt_ms: float
    load_s: float | None = None
    decode_tps: list[float] = field(default_factory=list)
    prefill_tps: list[float] = field(default_factory=list)
    decode_tokens: int = 0
    prefill_prompt_tokens: int = 0
    traffic_load: dict | None = None      # through the path's meters, start -> healthy
    traffic_short: dict | None = None     # over one request of SHORT_N_PREDICT tokens
    traffic_decode: dict | None = None    # over the timed decode requests
    traffic_total: dict | None = None     # start -> last request
    error: str | None = None
    waited_for_quiet_s: float = 0.0
    other_load_cores: float | None = None  # other programs' CPU use during the timed requests
    # Derived after all runs:
    decode_median: float | None = None
    prefill_median: float | None = None
    decode_vs_baseline: float | None = None
    prefill_vs_baseline: float | None = None
    round_trips_per_token: float | None = None
    bytes_per_token: float | None = None
    bound_tps: float | None = None
    decode_vs_bound: float | None = None


@dataclass
class LoadResult:
    """Loads of one setup of the two-node split: llama-server start -> /health ok, in seconds."""
    label: str
    path: str
    rtt_ms: float
    seconds: list[float] = field(default_factory=list)
    bytes_to_worker: list[int] = field(default_factory=list)  # through the path's meters, where metered
    error: str | None = None
    median_s: float | None = None
    vs_local: float | None = None


# Load runs: the local reference and the two-node split through these paths (where asked for).
LOAD_PATHS = ("stock-direct", "mesh")
LOAD_REPEATS = 5
HOST, WORKER = "host", "worker"


@dataclass
class Bench:
    bins: Binaries
    model: Path
    workload: Workload
    log_dir: Path
    rpc_threads: int | None = None  # None: ggml-rpc-server's default
    prefill_prompt: list[int] | None = None  # token ids, made once with the first server's tokenizer
    quiet_wait_s: float = QUIET_WAIT_S
    load_timeout_s: float = LOAD_TIMEOUT_S
    cold: bool = False  # two-node split loads start with an empty page cache
    worker_model: Path | None = None  # the worker's copy of the model (default: the same file)

    def run(self, path: str, rtt_ms: float) -> RunResult:
        label = path if rtt_ms <= 0 else f"{path}+{rtt_ms:g}ms"
        result = RunResult(label, path, rtt_ms)
        _record_error(result, self._measure)
        return result

    def _measure(self, result: RunResult) -> None:
        slug = result.label.replace("+", "_")
        with contextlib.ExitStack() as stack:  # unwinds in reverse: llama-server, path, rpc-servers
            rpc_endpoints, meters, extra_args, rpc_servers = None, [], [], []
            if result.path != LOCAL:
                # The mesh runs its rpc-servers with our patch (weights from the local GGUF); stock paths don't.
                local_weights = self.model if result.path.startswith("mesh") and self.bins.loads_local_weights else None
                for i in range(N_RPC_SERVERS):
                    server = start_rpc_server(self.bins, self.log_dir, name=f"rpc-server{i}-{slug}",
                                              threads=self.rpc_threads, gguf=local_weights)
                    stack.callback(server.stop)
                    rpc_servers.append(server)
                rpc_endpoints = stack.enter_context(
                    PATHS[result.path].open([s.address for s in rpc_servers], result.rtt_ms))
                meters = getattr(rpc_endpoints, "meters", [])
                extra_args = ["--tensor-split", ",".join(["1"] * N_RPC_SERVERS)]  # same split every run
            result.waited_for_quiet_s = wait_for_quiet([s.proc.pid for s in rpc_servers], timeout=self.quiet_wait_s)
            llama = start_llama_server(self.bins, self.model, self.log_dir, name=f"llama-server-{slug}",
                                       rpc=rpc_endpoints, ctx_size=CTX_SIZE, extra_args=extra_args)
            stack.callback(llama.stop)

            def traffic() -> TrafficStats | None:
                return sum((m.snapshot() for m in meters), TrafficStats()) if meters else None

            result.load_s = wait_until_healthy(llama, timeout=self.load_timeout_s)
            after_load = traffic()
            other_load = OtherLoad([llama.proc.pid, *(s.proc.pid for s in rpc_servers)])
            with httpx.Client(base_url=llama.url, timeout=REQUEST_TIMEOUT_S) as client:
                self._complete(llama, client, DECODE_PROMPT, n_predict=SHORT_N_PREDICT)  # warm-up: one-time setup
                before_short = traffic()
                self._complete(llama, client, DECODE_PROMPT, n_predict=SHORT_N_PREDICT)
                before_decode = traffic()
                for _ in range(self.workload.repeats):
                    timings = self._complete(llama, client, DECODE_PROMPT, n_predict=self.workload.n_predict)
                    result.decode_tps.append(timings["predicted_per_second"])
                    result.decode_tokens += timings["predicted_n"]
                after_decode = traffic()
                prompt = self._prefill_prompt(client)
                for _ in range(self.workload.repeats):
                    timings = self._complete(llama, client, prompt, n_predict=1)
                    result.prefill_tps.append(timings["prompt_per_second"])
                    result.prefill_prompt_tokens = timings["prompt_n"]
            result.other_load_cores = other_load.cores()
            if meters:
                result.traffic_load = asdict(after_load)
                result.traffic_short = asdict(before_decode - before_short)
                result.traffic_decode = asdict(after_decode - before_decode)
                result.traffic_total = asdict(traffic())

    def load_split(self, result: LoadResult) -> None:
        """One load of the model as runnerd starts it: alone (`local`), or as the host of a 50/50
        split with one worker whose ggml-rpc-server it reaches through `result.path`."""
        _record_error(result, self._load_split)

    @functools.cached_property
    def _model_and_backend(self) -> tuple[ModelInfo, str]:
        """What runnerd would know of this node: the model's shape and the backend (once per bench)."""
        return inspect_gguf(self.model), "cuda" if gpu_names() else "cpu"

    def _load_split(self, result: LoadResult) -> None:
        model_info, backend = self._model_and_backend
        members = [PlanMember(node_id=HOST, memory_bytes=1, ratio=0.5)]
        slug = f"split-{result.label.replace('+', '_')}-{len(result.seconds)}"
        with contextlib.ExitStack() as stack:
            forwards, meters, our_pids = {}, [], []
            if result.path != LOCAL:
                members.append(PlanMember(node_id=WORKER, memory_bytes=1, ratio=0.5))
                own_copy = self.worker_model or self.model
                weights = own_copy if result.path.startswith("mesh") and self.bins.loads_local_weights else None
                worker = start_rpc_server(self.bins, self.log_dir, name=f"rpc-server-{slug}",
                                          threads=self.rpc_threads, gguf=weights)
                stack.callback(worker.stop)
                our_pids.append(worker.proc.pid)
                endpoints = stack.enter_context(PATHS[result.path].open([worker.address], result.rtt_ms))
                forwards[WORKER] = f"127.0.0.1:{endpoints[0][1]}"
                meters = getattr(endpoints, "meters", [])
            plan = Plan(state="split" if forwards else "solo", host=HOST, members=members)
            port = free_port()
            args = llama_server_args(self.bins, port, model_info, plan, HOST, forwards, backend=backend,
                                     ctx_size=CTX_SIZE, threads=None)
            wait_for_quiet(our_pids, timeout=self.quiet_wait_s)
            if self.cold:
                drop_page_cache()
            log_path = self.log_dir / f"llama-server-{slug}.log"
            llama = ServerProcess(f"llama-server-{slug}", popen_in_own_session(args, log_path=log_path),
                                  "127.0.0.1", port, log_path)
            stack.callback(llama.stop)
            result.seconds.append(wait_until_healthy(llama, timeout=self.load_timeout_s))
            if meters:
                result.bytes_to_worker.append(sum(m.snapshot().bytes_to_server for m in meters))

    def _complete(self, llama: ServerProcess, client: httpx.Client, prompt: str | list[int],
                  *, n_predict: int) -> dict[str, Any]:
        """One /completion, greedy and uncached, exactly `n_predict` tokens; returns its timings."""
        try:
            response = client.post("/completion", json={
                "prompt": prompt, "n_predict": n_predict, "temperature": 0, "seed": self.workload.seed,
                "cache_prompt": False, "ignore_eos": True,
            })
        except httpx.HTTPError:
            llama.check_alive()  # a crashed server explains the failure better than the socket error
            raise
        response.raise_for_status()
        return response.json()["timings"]

    def _prefill_prompt(self, client: httpx.Client) -> list[int]:
        if self.prefill_prompt is None:
            n_tokens = self.workload.prefill_tokens
            text = PREFILL_SOURCE * (n_tokens // 40 + 1)  # the paragraph is ~60 tokens
            tokens = client.post("/tokenize", json={"content": text}).raise_for_status().json()["tokens"]
            if len(tokens) < n_tokens:
                raise ValueError(f"prefill text gave {len(tokens)} tokens, need {n_tokens}")
            self.prefill_prompt = tokens[:n_tokens]
        return self.prefill_prompt


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def _record_error(result: RunResult | LoadResult, measure) -> None:
    """Run `measure(result)`; a failure becomes `result.error` and the benchmark goes on."""
    try:
        measure(result)
    except NotImplementedError as e:
        result.error = f"not implemented: {e}"
    except (ProcessDied, TimeoutError, httpx.HTTPError, OSError, RuntimeError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"


def derive(results: list[RunResult]) -> dict[str, Any]:
    """Medians, ratios to the baseline, round trips per token, and the delay bound per row."""
    for r in results:
        r.decode_median = statistics.median(r.decode_tps) if r.decode_tps else None
        r.prefill_median = statistics.median(r.prefill_tps) if r.prefill_tps else None
        if r.traffic_decode and r.decode_tokens:
            # Marginal cost of a token: a timed request minus the short one, over the extra tokens.
            requests = len(r.decode_tps)
            extra_tokens = r.decode_tokens / requests - SHORT_N_PREDICT
            long, short = TrafficStats(**r.traffic_decode), TrafficStats(**r.traffic_short)
            r.round_trips_per_token = (long.round_trips / requests - short.round_trips) / extra_tokens
            r.bytes_per_token = (long.total_bytes / requests - short.total_bytes) / extra_tokens
    baseline = next((r for r in results if r.path == BASELINE and r.rtt_ms <= 0 and r.decode_median), None)
    # Round trips per token are llama.cpp's protocol, not the path's: unmetered rows borrow them.
    metered = [r.round_trips_per_token for r in results if r.round_trips_per_token]
    typical_round_trips = statistics.median(metered) if metered else None
    for r in results:
        if baseline is None or r.decode_median is None:
            continue
        r.decode_vs_baseline = r.decode_median / baseline.decode_median
        if r.prefill_median and baseline.prefill_median:
            r.prefill_vs_baseline = r.prefill_median / baseline.prefill_median
        round_trips = r.round_trips_per_token or typical_round_trips
        if r.rtt_ms > 0 and round_trips:
            r.bound_tps = 1 / (1 / baseline.decode_median + round_trips * r.rtt_ms / 1000)
            r.decode_vs_bound = r.decode_median / r.bound_tps
    return {"baseline": BASELINE, "base_ms_per_token": 1000 / baseline.decode_median if baseline else None,
            "typical_round_trips_per_token": typical_round_trips}


def derive_loads(loads: list[LoadResult]) -> None:
    local = next((r for r in loads if r.path == LOCAL and r.seconds), None)
    for r in loads:
        r.median_s = statistics.median(r.seconds) if r.seconds else None
    for r in loads:
        if local and r.median_s:
            r.vs_local = r.median_s / local.median_s


def format_load_table(loads: list[LoadResult]) -> str:
    width = max(len(r.label) for r in loads)
    lines = [f"{'two-node split':<{width}}  {'load s':>6}  {'/ local':>7}  {'MB to worker':>12}  each run (s)",
             "-" * (width + 50)]
    for r in loads:
        sent = statistics.median(r.bytes_to_worker) / 1e6 if r.bytes_to_worker else None
        runs = " ".join(f"{t:.2f}" for t in r.seconds)
        if r.error and not r.seconds:
            lines.append(f"{r.label:<{width}}  {r.error}")
        else:
            lines.append(f"{r.label:<{width}}  {_fmt(r.median_s, '6.2f')}  {_fmt(r.vs_local, '7.2f')}  "
                         f"{_fmt(sent, '12.1f')}  {runs}" + (f"  ({r.error})" if r.error else ""))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[RunResult]) -> str:
    header = ("path", "decode t/s", "prefill t/s", "load s", "dec/stock", "pre/stock",
              "bound t/s", "dec/bound", "RT/tok", "tunnel MB", "B/tok", "other")
    rows = []
    for r in results:
        total = r.traffic_total
        rows.append((
            r.label, _fmt(r.decode_median, ".1f"), _fmt(r.prefill_median, ".0f"), _fmt(r.load_s, ".2f"),
            _fmt(r.decode_vs_baseline, ".2f"), _fmt(r.prefill_vs_baseline, ".2f"),
            _fmt(r.bound_tps, ".1f"), _fmt(r.decode_vs_bound, ".2f"), _fmt(r.round_trips_per_token, ".2f"),
            _fmt(total and (total["bytes_to_server"] + total["bytes_to_client"]) / 1e6, ".1f"),
            _fmt(r.bytes_per_token, ".0f"), _fmt(r.other_load_cores, ".2f"),
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    lines = [line(header), "-" * len(line(header))]
    for r, row in zip(results, rows):
        lines.append(f"{r.label.ljust(widths[0])}  {r.error}" if r.error else line(row))
    return "\n".join(lines)


def plot(results: list[RunResult], summary: dict[str, Any], out: Path) -> bool:
    """Draw the results to `out`; False (and no plot) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("decode_median", "decode tok/s"), ("prefill_median", "prefill tok/s"), ("load_s", "load s"))
    paths = list(dict.fromkeys(r.path for r in results if not r.error))
    for ax, (attr, title) in zip(axes, panels):
        for path in paths:
            rows = sorted((r for r in results if r.path == path and not r.error), key=lambda r: r.rtt_ms)
            xs, ys = [r.rtt_ms for r in rows], [getattr(r, attr) for r in rows]
            if path == LOCAL:
                ax.axhline(ys[0], linestyle="--", color="grey", label="local (no RPC)")
            else:
                ax.plot(xs, ys, marker="o", label=path)
        base_ms, round_trips = summary["base_ms_per_token"], summary["typical_round_trips_per_token"]
        if attr == "decode_median" and base_ms and round_trips:
            rtts = sorted({0.0, *(r.rtt_ms for r in results)})
            ax.plot(rtts, [1000 / (base_ms + round_trips * rtt) for rtt in rtts], linestyle=":", color="black",
                    label=f"bound: {BASELINE} at 0 ms + {round_trips:.1f} RT/token x RTT")
        ax.set_title(title)
        ax.set_xlabel("injected RTT (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("llama.cpp RPC through each data path (2 rpc-servers, loopback)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def gpu_names() -> list[str]:
    """The GPUs nvidia-smi lists (empty where there is none), for the report."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _parse_list(text: str, convert=str) -> list:
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so SIGTERM unwinds the same way as Ctrl-C and kills the children


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--paths", type=_parse_list, default=[LOCAL, *PATHS],
                        help=f"comma-separated, from: {', '.join([LOCAL, *PATHS])}")
    parser.add_argument("--rtts", type=lambda s: _parse_list(s, float), default=[0.0, 5.0, 10.0, 20.0],
                        help="injected round-trip delays in ms (local runs at 0 only)")
    parser.add_argument("--quick", action="store_true",
                        help=f"one repeat, {QUICK_WORKLOAD.n_predict} tokens, {QUICK_WORKLOAD.prefill_tokens}-token prefill")
    parser.add_argument("--repeats", type=int, help="timed requests of each kind per run (median is reported)")
    parser.add_argument("--rpc-threads", type=int, help="ggml-rpc-server -t (default: its own default)")
    parser.add_argument("--bin-dir", type=Path, help="llama.cpp bin dir (default: the project's build)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quiet-wait", type=float, default=QUIET_WAIT_S,
                        help="at most this many seconds to wait for other programs to go quiet before each run")
    parser.add_argument("--load-timeout", type=float, default=LOAD_TIMEOUT_S,
                        help="seconds llama-server may take to load the model (a 7B over a slow path needs more)")
    parser.add_argument("--load-repeats", type=int, default=LOAD_REPEATS,
                        help="loads of each two-node split setup (median reported; 0: skip that part)")
    parser.add_argument("--load-rtts", type=lambda s: _parse_list(s, float), default=[0.0, 20.0],
                        help="injected round-trip delays in ms for the two-node split loads")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before each two-node split load (needs root); the worker then "
                             "reads its own copy of the model, as a second machine would (one disk serves both here)")
    args = parser.parse_args(argv)

    unknown = [p for p in args.paths if p != LOCAL and p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join([LOCAL, *PATHS])}")
    if not args.model.is_file():
        print(f"bench_rpc: model {args.model} not found; pass --model or install it "
              "(./scripts/just download-model gemma)", file=sys.stderr)
        return 2
    try:
        bins = find_binaries(args.bin_dir)
    except BinariesError as e:
        print(f"bench_rpc: {e}", file=sys.stderr)
        return 2

    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        print(f"bench_rpc: --cold writes {DROP_CACHES} to empty the page cache; run as root or drop --cold",
              file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    workload = QUICK_WORKLOAD if args.quick else Workload()
    if args.repeats:
        workload = replace(workload, repeats=args.repeats)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-rpc-logs-"))
    bench = Bench(bins, args.model, workload, log_dir, rpc_threads=args.rpc_threads,
                  quiet_wait_s=args.quiet_wait, load_timeout_s=args.load_timeout, cold=args.cold)
    if args.cold:
        bench.worker_model = log_dir / f"worker-copy-{args.model.name}"
        shutil.copyfile(args.model, bench.worker_model)
    plan = [(LOCAL, 0.0)] if LOCAL in args.paths else []
    # RTT-major order: every path sees the machine in about the same state at each RTT.
    plan += [(path, rtt) for rtt in args.rtts for path in args.paths if path != LOCAL]

    load_paths = [p for p in args.paths if p in LOAD_PATHS] if args.load_repeats > 0 else []
    loads = ([LoadResult(LOCAL, LOCAL, 0.0)] if load_paths else []) + [
        LoadResult(path if rtt <= 0 else f"{path}+{rtt:g}ms", path, rtt) for rtt in args.load_rtts for path in load_paths]

    started, results = time.monotonic(), []
    try:
        for path, rtt in plan:
            result = bench.run(path, rtt)
            status = result.error or (f"decode {statistics.median(result.decode_tps):.1f} t/s, "
                                      f"prefill {statistics.median(result.prefill_tps):.0f} t/s, "
                                      f"load {result.load_s:.2f} s")
            print(f"[{time.monotonic() - started:6.1f}s] {result.label}: {status}", flush=True)
            results.append(result)
        # Interleaved, so that every setup sees the machine in about the same state.
        for _ in range(args.load_repeats if loads else 0):
            for load in loads:
                bench.load_split(load)
                status = load.error or f"load {load.seconds[-1]:.2f} s"
                print(f"[{time.monotonic() - started:6.1f}s] two-node split, {load.label}: {status}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; reporting what was measured", file=sys.stderr)
    finally:
        if bench.worker_model:
            bench.worker_model.unlink(missing_ok=True)
    duration = time.monotonic() - started

    summary = derive(results)
    derive_loads(loads)
    print()
    print(format_table(results))
    base = summary["base_ms_per_token"]
    print(f"\nbound = 1 / ({BASELINE} time per token at 0 ms"
          f"{f' ({base:.1f} ms)' if base else ''} + round trips per token x RTT); "
          f"RT/tok and B/tok: per extra decoded token (timed request minus a short one);\n"
          f"tunnel MB: through the path from start to the last request; "
          f"other = CPU cores used by other programs during the timed requests (noise indicator).")
    if loads:
        print()
        print(format_load_table(loads))
        print(f"\nload = llama-server start -> /health ok (includes llama.cpp's warm-up decode); the host keeps half "
              f"of the model, the worker's ggml-rpc-server the other half (runnerd's command line); median of "
              f"{args.load_repeats}; MB to worker: through the delay relay, where there is one.")
    print(f"{len(results)} runs and {sum(len(r.seconds) for r in loads)} loads in {duration:.0f} s; logs in {log_dir}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(duration, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpu_names()},
        "model": str(args.model),
        "binaries": {"llama_server": str(bins.llama_server), "rpc_server": str(bins.rpc_server)},
        "setup": {"rpc_servers": N_RPC_SERVERS, "n_gpu_layers": 99, "tensor_split": [1] * N_RPC_SERVERS,
                  "ctx_size": CTX_SIZE, "rpc_server_threads": args.rpc_threads or "default",
                  "split_loads_cold": args.cold},
        "workload": asdict(workload),
        **summary,
        "runs": [asdict(r) for r in results],
        "split_loads": [asdict(r) for r in loads],
    }
    (args.out_dir / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    plotted = any(not r.error for r in results) and plot(results, summary, args.out_dir / "latest.png")
    print(f"wrote {args.out_dir / 'latest.json'}"
          + (f" and {args.out_dir / 'latest.png'}" if plotted else " (no plot: matplotlib is not installed)"))
    failed = [r for r in [*results, *loads] if r.error and not r.error.startswith("not implemented")]
    return 0 if (results or loads) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
