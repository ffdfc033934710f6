"""Real `llama-server` and `ggml-rpc-server` processes for tests and benchmarks: start on free
ports, wait for readiness with a deadline, stop the whole process tree."""
from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from common.binaries import Binaries
from common.default_model import model_path
from tests.support.procs import free_port, kill_process_tree, popen_in_own_session

Address = tuple[str, int]
# The benchmarks measure Gemma 3 270M (`just download-model gemma`): its 262k vocabulary makes the logits
# heavy, and the README's tables come from it.
DEFAULT_MODEL = model_path("gemma")


class ProcessDied(RuntimeError):
    """A server exited while we waited for it; the message carries its log's tail."""


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen
    host: str
    port: int
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def address(self) -> Address:
        return self.host, self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n_lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n_lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProcessDied(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        kill_process_tree(self.proc)


def start_rpc_server(bins: Binaries, log_dir: Path, *, name: str = "rpc-server", threads: int | None = None,
                     gguf: Path | None = None, timeout: float = 30.0, tls: list[str] = (),
                     env: dict[str, str] | None = None) -> ServerProcess:
    """ggml-rpc-server on 127.0.0.1 only (without `tls`, its --tls-* flags, it is insecure by design), ready
    to accept."""
    port = free_port()
    args = [str(bins.rpc_server), "-H", "127.0.0.1", "-p", str(port), *tls]
    if threads:
        args += ["-t", str(threads)]
    if gguf:  # our patch: load weights from this local file instead of receiving them
        args += ["--gguf", str(gguf)]
    server = ServerProcess(name, popen_in_own_session(args, log_path=log_dir / f"{name}.log", env=env),
                           "127.0.0.1", port, log_dir / f"{name}.log")
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            # A bare connect+close is harmless: the server drops a client that never says hello.
            with socket.create_connection(server.address, timeout=1):
                return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(f"{name} did not listen on {port} within {timeout:.0f}s")
            time.sleep(0.05)


def start_llama_server(bins: Binaries, model: Path, log_dir: Path, *, name: str = "llama-server",
                       rpc: list[Address] | None = None, n_gpu_layers: int = 99, ctx_size: int = 2048,
                       extra_args: list[str] = ()) -> ServerProcess:
    """llama-server on a free 127.0.0.1 port, one slot; not yet ready (see `wait_until_healthy`)."""
    port = free_port()
    args = [str(bins.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(ctx_size), "-np", "1", "-ngl", str(n_gpu_layers), *extra_args]
    if rpc:
        args += ["--rpc", ",".join(f"{h}:{p}" for h, p in rpc)]
    log_path = log_dir / f"{name}.log"
    return ServerProcess(name, popen_in_own_session(args, log_path=log_path), "127.0.0.1", port, log_path)


def wait_until_healthy(server: ServerProcess, *, timeout: float = 120.0) -> float:
    """Poll /health until 200 (503 while loading); return seconds since the server was started."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            server.check_alive()
            try:
                if client.get(f"{server.url}/health").status_code == 200:
                    return time.monotonic() - server.started_at
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.name} not healthy within {timeout:.0f}s; log tail:\n{server.log_tail()}")
            time.sleep(0.02)
