"""Real nodes for integration tests: `meshctl up` in a home of their own, on ports of their own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from common import addresses
from tests.support.procs import free_port, kill_process_tree, wait_until
from tests.support.request_loop import longest_outage, read_outcomes

MESHCTL = [sys.executable, "-m", "meshctl.cli"]
STARTED: list["Node"] = []  # nodes started by the running test, for its failure report (conftest.py)
RECOVERIES: list[dict] = []  # fault → recovery rows, printed at the end of the run (conftest.py)


# A test's node takes its settings from the test alone; where llama.cpp builds and models live is the
# machine's (MESH_LLAMA_CACHE=… ./scripts/just test uses that cache for every node).
MACHINE_SETTINGS = ("MESH_LLAMA_CACHE", "MESH_LLAMA_BACKEND", "MESH_CUDA_ARCH", "MESH_LLAMA_SOURCE", "MESH_MODELS_DIR")


def node_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESH_") or k in MACHINE_SETTINGS}


def meshctl(*args: str, home: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = node_env() | (env or {})
    return subprocess.run([*MESHCTL, *args, "--home", str(home)], capture_output=True, text=True, timeout=timeout,
                          env=full_env)


class Node:
    def __init__(self, home: Path, *, extra: list[str] | None = None, env: dict | None = None,
                 netns: str | None = None):
        self.home, self.extra, self.env, self.netns = home, extra or [], env or {}, netns
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.stopped_at: float | None = None  # wall clock of the last stop or kill

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        """The API key this node was started with (--api-key), as a request header."""
        flags = self.extra
        key = flags[flags.index("--api-key") + 1] if "--api-key" in flags else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def start(self, *flags: str) -> "Node":
        args = [*MESHCTL, "up", "--home", str(self.home), "--port", str(self.port), *self.extra, *flags]
        env = node_env()
        env.update({"MESH_SETTLE_DELAY": "1", "MESH_WAIT_FOR_HOST": "60"} | self.env)
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self.home.mkdir(parents=True, exist_ok=True)
        self.stopped_at = None
        if self not in STARTED:
            STARTED.append(self)
        self.proc = subprocess.Popen(args, env=env, stdout=open(self.home / "meshctl-up.out", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def status(self) -> dict:
        out = meshctl("status", "--json", home=self.home, timeout=30)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return {}

    def node_id(self) -> str:
        return wait_until(lambda: self.status().get("meshd", {}).get("node_id"), timeout=60, what="meshd up")

    def token(self) -> str:
        def get():
            out = meshctl("token", home=self.home, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        return wait_until(get, timeout=60, interval=0.5, what="an invite token")

    def answers(self) -> bool:
        if self.netns:
            return self.status().get("gatewayd", {}).get("upstream", "") != ""
        try:
            return httpx.get(f"{self.api}/health", timeout=2, headers=self.headers).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_serving(self, timeout: float = 240) -> None:
        wait_until(self.answers, timeout=timeout, interval=0.3, what=f"{self.home.name} serving")

    def chat(self, prompt: str = "Count from one to five.", **kw) -> str:
        body = {"model": "any", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "seed": 1,
                "max_tokens": 24} | kw
        if self.netns:  # the API listens on the namespace's own loopback
            code = ("import httpx,json,sys; r=httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=180);"
                    "r.raise_for_status(); print(json.dumps(r.json()))")
            out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code,
                                  f"{self.api}/v1/chat/completions", json.dumps(body)], capture_output=True, text=True,
                                 timeout=200)
            if out.returncode != 0:
                raise httpx.HTTPError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
            return json.loads(out.stdout)["choices"][0]["message"]["content"]
        r = httpx.post(f"{self.api}/v1/chat/completions", json=body, timeout=180, headers=self.headers)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    def service_pid(self, service: str) -> int:
        return int(addresses.lock_path(self.home, service).read_text())

    def runner(self) -> dict:
        return self.status().get("runnerd", {})

    def kill(self) -> None:
        """The whole node dies at once (power cut, laptop lid): SIGKILL to supervisord and everything under it."""
        if self.proc is None:
            return
        kill_process_tree(self.proc, grace=10, first=signal.SIGKILL)
        self.proc, self.stopped_at = None, time.time()

    def stop(self) -> None:
        if self.proc is None:
            return
        meshctl("down", home=self.home, timeout=60)
        kill_process_tree(self.proc, grace=10)
        # Anything still holding this home's lock files is ours and left behind by a failure.
        for service in addresses.SERVICES:
            try:
                pid = self.service_pid(service)
                if psutil.pid_exists(pid) and "mesh" in " ".join(psutil.Process(pid).cmdline()):
                    kill_process_tree(pid, grace=5)
            except (OSError, ValueError, psutil.Error):
                pass
        self.proc, self.stopped_at = None, time.time()


class RequestLoop:
    """tests/support/request_loop.py against a node's API (inside its namespace if it has one)."""

    def __init__(self, node: Node, out: Path):
        self.out = out
        args = [sys.executable, "-m", "tests.support.request_loop", f"{node.api}/v1/chat/completions", str(out)]
        if node.netns:
            args = ["ip", "netns", "exec", node.netns, *args]
        out.unlink(missing_ok=True)
        self.proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2])

    def outcomes(self):
        return read_outcomes(self.out)

    def stop(self):
        """Let the request in flight finish (it may be waiting for a host), then the outcomes."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=330)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("a request hung: the loop did not stop within 330 s")
        return self.outcomes()


def record_recovery(fault: str, outcomes, since: float, back_to_full_s: float | None) -> dict:
    """One row of the recovery table; the caller asserts on `lost`."""
    after = [o for o in outcomes if o.end >= since]
    row = {"fault": fault, "requests": len(after), "lost": sum(not o.ok for o in after),
           "outage_s": round(longest_outage(outcomes, since), 1),
           "back_to_full_s": round(back_to_full_s, 1) if back_to_full_s is not None else None,
           "errors": sorted({o.detail[:120] for o in after if not o.ok})[:3]}
    RECOVERIES.append(row)
    print(row)
    return row
