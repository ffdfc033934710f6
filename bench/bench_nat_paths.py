"""Decode speed of a split through a direct, a punched and a relayed path, in one run.

Three independent two-node meshes in one network-namespace lab (tests/support/nat_lab.py: a
"public" segment, real coturn as STUN servers and TURN relay, nftables NAT routers), up at once;
each is a host and a worker with SmolLM2 split over both (`--split`), plus a lite client on the
public segment as the rendezvous whose token they join (as tests/integration/test_nat.py does):

    direct    host and worker both on the public segment
    punched   host and worker each behind a port-keeping (cone) NAT: the pair punches through
              (a public host and a NATed worker would be "direct": the worker just dials out)
    relayed   host behind a cone NAT, worker behind a symmetric NAT: only the TURN relay joins them

Then rounds of the same request (temperature 0, the same prompt and max_tokens) go to each
host's API in turn, the order rotated each round, so machine load hits the three alike; the
median of llama-server's own decode tok/s per path is reported with punched/direct and
relayed/direct. The run fails unless each pair's status (meshd's path, both ways) is the path
intended. Reported too: the host's RPC path to the worker (runnerd) and its data lane (gatewayd),
the bytes the relay carried during the rounds (its namespace's interface counters, and the
nodes' own TURN allocation counters), whether the mesh secret or node ids crossed the relay in
plaintext (a capture on the relay's segment), and the load average.

    sudo .venv/bin/python -m bench.bench_nat_paths               # 8 rounds, 48 tokens
    sudo .venv/bin/python -m bench.bench_nat_paths --rounds 12 --max-tokens 64

Writes bench/results/nat-paths.json (and nat-paths.png with matplotlib). Needs root (network
namespaces), nft, conntrack and coturn; llama.cpp built (`just build`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.models import ensure_smollm2
from common.binaries import BinariesError, find_binaries
from tests.support import nat_lab
from tests.support.procs import wait_until

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PATHS = ("direct", "punched", "relayed")


@dataclass
class PathResult:
    path: str
    reported: dict = field(default_factory=dict)  # meshd's path both ways, runnerd's RPC path, gatewayd's lane
    samples: list[float] = field(default_factory=list)  # llama-server's decode tok/s per request
    tokens: list[int] = field(default_factory=list)
    decode_tps: float | None = None
    vs_direct: float | None = None
    worker_bytes: int | None = None  # in + out of the worker's namespace during the rounds: every path alike
    errors: list[str] = field(default_factory=list)


def netns_bytes(ns: str) -> int:
    """Bytes in + out of every interface of a namespace but its loopback (a node's or the relay's traffic)."""
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return sum(link["stats64"]["rx"]["bytes"] + link["stats64"]["tx"]["bytes"]
               for link in json.loads(out.stdout) if link["ifname"] != "lo")


def coturn_usage(log: Path) -> dict[str, int]:
    """coturn's own allocation counters, summed over its log's periodic and closing `usage` lines
    (each counts since the last): bytes between clients and the relay, and between the relay and peers."""
    totals = {"client_bytes": 0, "peer_bytes": 0}
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        if "usage: realm=" not in line:
            continue
        fields = dict(kv.split("=", 1) for kv in line.replace(",", " ").split() if kv[:3] in ("rb=", "sb="))
        key = "peer_bytes" if "peer usage:" in line else "client_bytes"
        totals[key] += int(fields.get("rb", 0)) + int(fields.get("sb", 0))
    return totals


def reported_paths(host, worker, ids: dict) -> dict:
    """meshd's path both ways, the host's RPC path to the worker (runnerd) and its data lane (gatewayd),
    from one status of each node (`meshctl status` is seconds on a loaded machine)."""
    host_status, worker_status = host.status(), worker.status()

    def path(status: dict, other: str) -> str | None:
        p = next((p for p in status.get("meshd", {}).get("peers", []) if p["announcement"]["node_id"] == other), None)
        return (p.get("path") or {}).get("path") if p and p["connected"] else None
    tunnel = next((t for t in host_status.get("gatewayd", {}).get("tunnels", []) if t.get("node_id") == ids[worker]),
                  None)
    return {"host_to_worker": path(host_status, ids[worker]), "worker_to_host": path(worker_status, ids[host]),
            "rpc_path": host_status.get("runnerd", {}).get("rpc_paths", {}).get(ids[worker], ""),
            "data_lane": f"{tunnel['lane']} {tunnel['path']}" if tunnel else None}


def stop_all(nodes) -> None:
    """Every node stops at once (one by one is minutes on a loaded machine); mesh() then finds them stopped."""
    threads = [threading.Thread(target=n.stop) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def build_lab(lab: nat_lab.NatLab) -> dict[str, tuple]:
    """(rendezvous site, host site, worker site, env) per path; every address its own."""
    stun = {"MESH_STUN": ",".join(nat_lab.STUN_SERVERS)}
    return {
        "direct": (lab.public_site("pd", 21), lab.public_site("dh", 31), lab.public_site("dw", 32), stun),
        "punched": (lab.public_site("pp", 22), lab.home_site("ph", 1), lab.home_site("pw", 2), stun),
        "relayed": (lab.public_site("pr", 23), lab.home_site("rh", 3), lab.home_site("rw", 4, symmetric=True),
                    stun | {"MESH_RELAY": nat_lab.RELAY_URL}),
    }


def run(args, model: Path, work: Path) -> dict:
    from tests.support.nat_lab import ask, mesh, relay_bytes, wait_split_serving
    from tests.support.sniff import read_frames

    results = {p: PathResult(p) for p in PATHS}
    report: dict = {"load_before": os.getloadavg()}
    with contextlib.ExitStack() as stack:
        lab = nat_lab.NatLab()
        stack.callback(lab.close)
        lab.start_servers(work, relay=True)
        sites = build_lab(lab)
        pairs, everyone = {}, []
        flags = ["--split", "--model", str(model)]
        started = time.monotonic()
        for path, (public, host_site, worker_site, env) in sites.items():
            _, nodes = stack.enter_context(mesh(
                work / path, public, ("host", host_site, [*flags, "--max-vram", "8G"], env),
                ("worker", worker_site, [*flags, "--max-vram", "4G"], env)))
            pairs[path], everyone = tuple(nodes[1:]), everyone + nodes
        stack.callback(stop_all, everyone)  # before each mesh() stops its own, one by one
        ids = {n: n.node_id() for n in everyone}
        for path, (host, worker) in pairs.items():
            wait_split_serving(host, {ids[host], ids[worker]})
            print(f"[{time.monotonic() - started:5.0f}s] {path}: split serving", flush=True)
        report["bring_up_s"] = round(time.monotonic() - started)
        for path, (host, worker) in pairs.items():  # warm-up, outside the timed rounds
            wait_until(lambda: ask(host, 4)["status"] == 200, timeout=180, interval=1.0, what=f"{path} answering")
        for path, (host, worker) in pairs.items():
            try:
                results[path].reported = wait_until(lambda: _settled(host, worker, ids, path), timeout=90, interval=1.0,
                                                    what=f"the {path} pair's path")
            except TimeoutError:  # measured anyway, and the run fails saying which path it was
                results[path].reported = reported_paths(host, worker, ids)
            print(f"  {path}: {results[path].reported}", flush=True)

        capture = work / "relay.frames"
        sniffer = subprocess.Popen(["ip", "netns", "exec", lab.relay_ns, sys.executable, "-m", "tests.support.sniff",
                                    str(capture)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                                   cwd=Path(__file__).resolve().parents[1])
        stack.callback(lambda: sniffer.poll() is None and sniffer.kill())
        assert sniffer.stdout.readline().strip() == "capturing"
        relay_before, turn_before = netns_bytes(lab.relay_ns), relay_bytes(list(pairs["relayed"]), "gatewayd")
        worker_before = {p: netns_bytes(pairs[p][1].netns) for p in PATHS}
        loads = []
        for rnd in range(args.rounds):
            order = PATHS[rnd % 3:] + PATHS[:rnd % 3]
            for path in order:
                answer = ask(pairs[path][0], args.max_tokens, timeout=args.request_timeout)
                r = results[path]
                if answer["status"] != 200 or not answer.get("server_tok_s"):
                    r.errors.append(str(answer.get("error") or answer)[:200])
                    print(f"  round {rnd} {path:<8} failed: {r.errors[-1]}", flush=True)
                    continue
                r.samples.append(answer["server_tok_s"])
                r.tokens.append(answer["tokens"])
            loads.append(os.getloadavg()[0])
            print(f"  round {rnd}: " + "  ".join(f"{p} {results[p].samples[-1]:5.1f}" if results[p].samples else
                                                 f"{p} -" for p in PATHS) + f"  tok/s  (load {loads[-1]:.2f})",
                  flush=True)
        relay_after, turn_after = netns_bytes(lab.relay_ns), relay_bytes(list(pairs["relayed"]), "gatewayd")
        for p in PATHS:
            results[p].worker_bytes = netns_bytes(pairs[p][1].netns) - worker_before[p]
            after = reported_paths(*pairs[p], ids)
            if after["host_to_worker"] != results[p].reported["host_to_worker"]:
                results[p].errors.append(f"path changed during the rounds: {results[p].reported} -> {after}")
        sniffer.terminate()
        sniffer.wait(timeout=60)
        seen = b"".join(read_frames(str(capture)))
        secrets = {f"{p}-secret": json.loads((work / p / "p" / "mesh.json").read_text())["secret"] for p in PATHS}
        markers = secrets | {f"{p}-{role}-id": ids[n] for p in PATHS for role, n in zip(("host", "worker"), pairs[p])}
        leaked = [name for name, marker in markers.items() if marker.encode() in seen]
        report.update({
            "relay": {"interface_bytes": relay_after - relay_before, "turn_allocation_bytes": turn_after - turn_before,
                      "captured_bytes": len(seen), "plaintext_found": leaked,
                      "checked_for": sorted(markers)},
            "load_during": loads, "load_after": os.getloadavg()})
    # after the nodes stopped: their sessions' closing usage lines are in
    report["relay"]["coturn_whole_run"] = coturn_usage(work / f"coturn-{nat_lab.STUN_IP}-3478.log")
    for r in results.values():
        if r.samples:
            r.decode_tps = statistics.median(r.samples)
    direct = results["direct"].decode_tps
    for r in results.values():
        if r.decode_tps and direct:
            r.vs_direct = r.decode_tps / direct
    report["paths"] = {p: asdict(r) for p, r in results.items()}
    return report


def _settled(host, worker, ids: dict, path: str) -> dict | None:
    """The pair's reported paths once both ends agree on the one intended (None meanwhile)."""
    seen = reported_paths(host, worker, ids)
    return seen if seen["host_to_worker"] == seen["worker_to_host"] == path else None


def check(report: dict) -> list[str]:
    """What makes the run fail: a pair not on its intended path, failed requests, plaintext at the relay."""
    problems = []
    for path, r in report["paths"].items():
        seen = r["reported"]
        if not (seen.get("host_to_worker") == seen.get("worker_to_host") == path):
            problems.append(f"the {path} pair reports {seen.get('host_to_worker')} / {seen.get('worker_to_host')}, "
                            f"not {path}")
        problems += [f"{path}: {e}" for e in r["errors"]]
        if not r["samples"]:
            problems.append(f"{path}: no answer measured")
    if report["relay"]["plaintext_found"]:
        problems.append(f"crossed the relay in plaintext: {report['relay']['plaintext_found']}")
    return problems


def format_summary(report: dict) -> str:
    lines = ["| path | decode tok/s (median) | / direct | requests | host's RPC path | data lane | worker's bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for path, r in report["paths"].items():
        tps = "-" if r["decode_tps"] is None else f"{r['decode_tps']:.1f}"
        ratio = "-" if r["vs_direct"] is None else f"{r['vs_direct']:.2f}×"
        lines.append(f"| {path} | {tps} | {ratio} | {len(r['samples'])} | {r['reported'].get('rpc_path') or '-'} | "
                     f"{r['reported'].get('data_lane') or '-'} | {r['worker_bytes']} |")
    relay = report["relay"]
    coturn = relay.get("coturn_whole_run") or {}
    lines.append(f"\nrelay: {relay['interface_bytes']} bytes through its interfaces during the rounds, "
                 f"{relay['turn_allocation_bytes']} through the relayed pair's TURN allocations (their gatewayd's "
                 f"count); coturn's own counters, whole run: {coturn.get('client_bytes')} client<->relay, "
                 f"{coturn.get('peer_bytes')} relay<->peer; plaintext of "
                 f"{len(relay['checked_for'])} markers (mesh secrets, node ids) in its capture: "
                 f"{relay['plaintext_found'] or 'none'}")
    lo = report["load_before"], report["load_after"]
    lines.append(f"load average (1/5/15 min): before {' '.join(f'{x:.2f}' for x in lo[0])}, "
                 f"after {' '.join(f'{x:.2f}' for x in lo[1])}")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (path, r) in enumerate(report["paths"].items()):
        ax.scatter([i] * len(r["samples"]), r["samples"], color=f"C{i}", alpha=0.5)
        if r["decode_tps"]:
            ax.bar(i, r["decode_tps"], color=f"C{i}", alpha=0.4)
    ax.set_xticks(range(len(PATHS)), PATHS)
    ax.set_ylabel("decode tok/s (llama-server)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"SmolLM2 split over two nodes, by host-worker path (load {report['load_before'][0]:.1f})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="requests per path (rotated order; median reported)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="nat-paths", help="file name of the results (json, png)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.max_tokens < 1:
        parser.error("--rounds and --max-tokens must be at least 1")
    why = "needs root (network namespaces, nftables): sudo .venv/bin/python -m bench.bench_nat_paths" \
        if os.geteuid() != 0 else nat_lab.available()
    if why:
        print(f"bench_nat_paths: {why}", file=sys.stderr)
        return 2
    try:
        find_binaries(None)
        model = ensure_smollm2()
    except (BinariesError, FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as e:
        print(f"bench_nat_paths: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="bench-nat-paths-"))
    started = time.monotonic()
    try:
        report = run(args, model, work)
    except KeyboardInterrupt:
        print("bench_nat_paths: interrupted; namespaces and nodes removed", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError, OSError, AssertionError) as e:
        print(f"bench_nat_paths: {type(e).__name__}: {e} (logs in {work})", file=sys.stderr)
        return 1
    report = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - started),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": str(model),
              "rounds": args.rounds, "max_tokens": args.max_tokens,
              "command": "python -m bench.bench_nat_paths " + " ".join(argv if argv is not None else sys.argv[1:]),
              } | report
    problems = check(report)
    report["problems"] = problems
    print()
    print(format_summary(report))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plotted = plot(report, args.out_dir / f"{args.name}.png")
    print(f"wrote {args.out_dir / (args.name + '.json')}" + (" and .png" if plotted else "") + f"; logs in {work}")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
