"""The product's own GPU path, two nodes on one machine (bench/gpu/mesh.sh runs it on the device):
`meshctl up` builds llama.cpp for CUDA from the pinned source, each node offers the GPUs llama.cpp
lists for it (CUDA_VISIBLE_DEVICES picks them), the host splits by that memory, and llama-server's
own report of where the layers went is checked against the plan (tests/support/device_order.py).

    python -m bench.gpu.mesh --model M.gguf [--scenario one-each] [--scenario both-each] [--out-dir DIR]

one-each:  host on GPU0, worker on GPU1 (a device each);
both-each: host and worker each see both GPUs: the worker's one rpc-server offers two devices and the
           host splits over its own two and the worker's two;
one-gpu:   both on GPU0 (a machine with one GPU);
one-gpu-two-devices: both on GPU0, the worker's rpc-server serving it twice (--device CUDA0,CUDA0): one
           server with two devices, as a worker with two GPUs has, where the machine has one (--max-vram 100G,
           spread 50/50 over them, so that the other node, with the whole GPU, hosts).
Prints `meshctl status`, the placement check and a decode figure per scenario, and writes them as JSON."""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.integration.harness import Node, meshctl
from tests.support.device_order import check
from tests.support.procs import wait_until

# name: (host's CUDA_VISIBLE_DEVICES, worker's, worker's flags)
SCENARIOS = {"one-each": ("0", "1", []), "both-each": ("0,1", "0,1", []), "one-gpu": ("0", "0", []),
             "one-gpu-two-devices": ("0", "0", ["--device", "CUDA0,CUDA0", "--max-vram", "100G"])}
STOPPED = "stopped by SIGTERM (the call's time ran out)"
PROMPT = "Write a long story about a lighthouse keeper."


def decode(node: Node, max_tokens: int) -> dict:
    body = {"model": "any", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    node.chat("Hi", max_tokens=4)  # warm-up: llama.cpp's one-time set-up
    started = time.monotonic()
    r = httpx.post(f"{node.api}/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    wall = time.monotonic() - started
    timings = r.json().get("timings") or {}  # llama-server's own figures; else the wall clock's
    tokens = timings.get("predicted_n") or r.json()["usage"]["completion_tokens"]
    decode_rate = timings.get("predicted_per_second") or tokens / wall
    return {"decode_tok_s": round(decode_rate, 1), "prefill_tok_s": round(timings.get("prompt_per_second") or 0, 1),
            "tokens": tokens, "wall_s": round(wall, 2)}


def scenario(name: str, model: Path, root: Path, max_tokens: int, out_dir: Path) -> dict:
    host_gpus, worker_gpus, worker_flags = SCENARIOS[name]
    common = ["--split", "--bind-host", "127.0.0.1", "--model", str(model)]
    host = Node(root / name / "host", extra=common, env={"CUDA_VISIBLE_DEVICES": host_gpus})
    worker = Node(root / name / "worker", extra=[*common, *worker_flags], env={"CUDA_VISIBLE_DEVICES": worker_gpus})
    result: dict = {"scenario": name, "host_gpus": host_gpus, "worker_gpus": worker_gpus}
    try:
        started = time.monotonic()
        host.start()
        # The host's runnerd builds llama.cpp when the cache lacks it; the worker then finds it built.
        def host_ready():
            if host.proc.poll() is not None:
                raise RuntimeError(f"meshctl up exited {host.proc.returncode}")
            return host.runner().get("memory_bytes")
        wait_until(host_ready, timeout=900, interval=2, what="the host's runnerd ready (llama.cpp built, GPUs detected)")
        result["host_ready_s"] = round(time.monotonic() - started, 1)
        print(f"[{name}] host ready in {result['host_ready_s']} s: {host.runner().get('memory_source')}", flush=True)
        worker.start("--join", host.token())
        nodes = {host.node_id(): host, worker.node_id(): worker}

        said = [0.0]

        def serving():
            # Both offer the same memory here, so the higher node id hosts: ask whichever the plan names.
            s = host.status()
            plan = s.get("electd", {})
            if time.monotonic() - said[0] > 15:  # a wait that runs out says where it stood
                said[0] = time.monotonic()
                print(f"[{name}] waiting: plan {plan.get('state')} ({plan.get('reason')}); host llama-server "
                      f"{s.get('runnerd', {}).get('llama', {})}", flush=True)
            if plan.get("state") != "split" or len(plan.get("members", [])) != 2 or plan.get("host") not in nodes:
                return None
            s = nodes[plan["host"]].status()
            plan, runner = s.get("electd", {}), s.get("runnerd", {})
            return s if runner.get("placement") and runner.get("llama_plan_key") == plan.get("key") else None
        joined = time.monotonic()
        status = wait_until(serving, timeout=180, interval=0.5, what="the host serving the split")
        result["join_to_serving_s"] = round(time.monotonic() - joined, 1)
        plan, runner = status["electd"], status["runnerd"]
        serving_host = nodes[plan["host"]]
        text = meshctl("status", home=serving_host.home, timeout=30).stdout
        print(f"[{name}] meshctl status on the host ({serving_host.home.name}):\n{text}", flush=True)
        result["status_text"] = text
        result["plan"] = [{"node": m["node_id"][:8], "ratio": m["ratio"],
                           "devices_gb": [round(d / 2**30, 1) for d in m["devices"]]} for m in plan["members"]]
        result["memory"] = {n.home.name: n.runner().get("memory_source") for n in (host, worker)}
        args = psutil.Process(runner["llama"]["pid"]).cmdline()
        result["llama_server_args"] = args[1:]
        log = (serving_host.home / "logs" / "llama-server.log").read_text(errors="replace")
        try:
            result["placement_check"] = check(plan, args, status["gatewayd"]["rpc_forwards"], log,
                                              runner["model"]["path"], runner["model"]["n_layers"], plan["host"])
            print(f"[{name}] device order checked: {json.dumps(result['placement_check'])}", flush=True)
        except AssertionError as exc:  # reported, and the decode is still measured
            result["error"] = f"device order: {exc}"
            print(f"[{name}] DEVICE ORDER WRONG: {exc}", flush=True)
        result.update(decode(serving_host, max_tokens))
        print(f"[{name}] decode {result['decode_tok_s']} tok/s, prefill {result['prefill_tok_s']} tok/s "
              f"({result['tokens']} tokens, {result['wall_s']} s)", flush=True)
    except (Exception, SystemExit) as exc:  # one scenario's failure is a result too; SIGTERM (124) ends the run
        result["error"] = (STOPPED if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}")
        print(f"[{name}] FAILED: {result['error']}", flush=True)
        for n in (host, worker):
            for log in [n.home / "meshctl-up.out", *sorted((n.home / "logs").glob("*.log"))]:
                if not log.exists():
                    continue
                print(f"--- {n.home.name}/{log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    finally:
        for n in (host, worker):
            n.stop()
            if (n.home / "logs").is_dir():  # kept with the results, to read later
                shutil.copytree(n.home / "logs", out_dir / "mesh-gpu-logs" / name / n.home.name, dirs_exist_ok=True)
    return result


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=30)
    except OSError:
        return 0
    return len(out.stdout.splitlines()) if out.returncode == 0 else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--root", type=Path, default=Path("/tmp/mesh-gpu"))
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args(argv)
    # The device tool's time limit ends us with SIGTERM: unwind, so the nodes' logs are still kept.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    shutil.rmtree(args.root, ignore_errors=True)
    default = ["one-each", "both-each"] if gpu_count() > 1 else ["one-gpu-two-devices", "one-gpu"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.scenario or default:
        results.append(scenario(name, args.model, args.root, args.max_tokens, args.out_dir))
        (args.out_dir / "mesh-gpu.json").write_text(json.dumps(results, indent=2))  # each as it ends
        if results[-1].get("error") == STOPPED:
            break
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
