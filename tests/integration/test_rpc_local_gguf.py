"""Workers load weights from their own GGUF: almost nothing on the wire, the same tokens, safe on mismatch.

Real processes, as the user runs them: the binaries `llama.cpp/build.py` builds with our patch
(`patches/0001-rpc-load-weights-from-local-gguf.patch`), a `ggml-rpc-server --gguf` on 127.0.0.1,
and a `llama-server --rpc` reaching it through a byte-counting asyncio relay started here, so the
bytes on the wire are measured rather than assumed. Greedy completions are compared with a
llama-server that runs the same model alone.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.procs import free_port, kill_process_tree, popen_in_own_session, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first run may build llama.cpp (~9 min)

REPO = Path(__file__).resolve().parents[2]
LOAD_TIMEOUT = 180.0
PROMPT = "The capital of France is Paris. The capital of Italy is"
# One line of the patch's log format (see the comment at the top of the patch).
RPC_GGUF_LINE = re.compile(r"rpc-gguf: (?P<kind>\w+)(?P<fields>(?: \w+=\S*)*)\s*$")


# ---------------------------------------------------------------------------------------------
# fixtures: binaries, models, the local reference


def _load_build_module():
    spec = importlib.util.spec_from_file_location("llama_cpp_build", REPO / "llama.cpp" / "build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    """The patched binaries: $MESH_BIN_DIR if set, else build.py's cached build (built if needed)."""
    if os.environ.get("MESH_BIN_DIR"):
        out = Path(os.environ["MESH_BIN_DIR"]).expanduser()
    else:
        build = _load_build_module()
        try:
            out = build.build()
        except (SystemExit, subprocess.CalledProcessError, OSError) as e:
            pytest.skip(f"llama.cpp binaries could not be built with llama.cpp/build.py: {e}")
    rpc = out / "ggml-rpc-server"
    if not (rpc.is_file() and (out / "llama-server").is_file()):
        pytest.skip(f"no ggml-rpc-server and llama-server in {out}")
    usage = subprocess.run([str(rpc), "--help"], capture_output=True, text=True, timeout=30)
    assert "--gguf" in usage.stdout + usage.stderr, f"{rpc} lacks --gguf: is the patch applied?"
    return out


@pytest.fixture(scope="module")
def model() -> Path:
    try:
        from common.default_model import ensure_default_model
        return ensure_default_model()
    except (SystemExit, subprocess.CalledProcessError, ImportError, OSError) as e:
        pytest.skip(f"the default model is not available: {e}")


@pytest.fixture(scope="module")
def local_completion(bin_dir: Path, model: Path, tmp_path_factory) -> str:
    """What llama-server alone answers: the reference every RPC setup must reproduce."""
    logs = tmp_path_factory.mktemp("local")
    with LlamaServer(bin_dir, model, logs / "llama-server.log") as server:
        return server.complete(PROMPT)


@pytest.fixture
def perturbed_model(model: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the model that differs from it in a few tensors: {name: expected miss reason}.

    Two tensors keep their name and shape but get other bytes all over, as in another fine-tune or
    quantization (the hash must catch them); one is renamed in the tensor table (a same-length name,
    so the layout stays put).
    """
    from gguf import GGUFReader

    where = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(model).tensors}
    other_bytes = ["blk.0.ffn_down.weight", "blk.5.attn_q.weight"]
    renamed = "blk.3.ffn_up.weight"
    assert all(name in where for name in [*other_bytes, renamed])

    out = tmp_path / "perturbed.gguf"
    shutil.copyfile(model, out)
    with open(out, "r+b") as f:
        for name in other_bytes:
            offset, n_bytes = where[name]
            f.seek(offset)
            flipped = bytes(b ^ 0x5A for b in f.read(n_bytes))
            f.seek(offset)
            f.write(flipped)
        f.seek(0)
        head = f.read(where[renamed][0])
        old = len(renamed).to_bytes(8, "little") + renamed.encode()
        assert head.count(old) == 1
        f.seek(head.index(old) + 8)
        f.write(renamed[:-1].encode() + b"X")
    return out, {**{name: "hash" for name in other_bytes}, renamed: "name"}


# ---------------------------------------------------------------------------------------------
# processes


class ByteCountingRelay:
    """A TCP relay on 127.0.0.1 to an upstream port, counting the bytes it moves each way.

    It runs its own asyncio loop in a thread, as the mesh's tunnels would run theirs.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.to_server = 0
        self.to_client = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    def __enter__(self) -> "ByteCountingRelay":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def close() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def total(self) -> int:
        return self.to_server + self.to_client

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            await asyncio.gather(self._pump(client_r, upstream_w, "to_server"),
                                 self._pump(upstream_r, client_w, "to_client"))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            client_w.close()
            self._tasks.discard(asyncio.current_task())

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str) -> None:
        try:
            while data := await r.read(1 << 16):
                setattr(self, direction, getattr(self, direction) + len(data))
                w.write(data)
                await w.drain()
        finally:
            w.close()


class RpcServer:
    """`ggml-rpc-server` on 127.0.0.1 (rpc-server cannot take port 0, hence a free port)."""

    def __init__(self, bin_dir: Path, log: Path, gguf: Path | None) -> None:
        self.port = free_port()
        self.log = log
        args = [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(self.port), "-t", "1"]
        if gguf:
            args += ["--gguf", str(gguf)]
        self.args = args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RpcServer":
        self.proc = popen_in_own_session(self.args, log_path=self.log)
        # look at its socket rather than connect: it serves one client at a time, and its stdout
        # is block-buffered into the log
        wait_until(self._listening, timeout=60, what=f"ggml-rpc-server listening on {self.port}")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ggml-rpc-server exited ({self.proc.returncode}):\n{tail(self.log)}")
        return any(c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(self.proc.pid).net_connections("tcp"))

    def __exit__(self, *exc) -> None:
        kill_process_tree(self.proc)


class LlamaServer:
    """`llama-server` on 127.0.0.1, alone or with every layer on RPC devices; times its load."""

    def __init__(self, bin_dir: Path, model: Path, log: Path, rpc: list[str] | None = None,
                 extra_args: list[str] = ()) -> None:
        self.port = free_port()
        self.log = log
        # no warm-up: /health then marks the end of the load proper (the warm-up decode alone brings
        # ~2 MB of logits back from the rpc device: 262k-token vocabulary)
        self.args = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                     "--port", str(self.port), "-c", "512", "-np", "1", "-t", "2", "--no-webui",
                     "--no-warmup", *extra_args]
        if rpc:
            self.args += ["--rpc", ",".join(rpc), "-ngl", "99"]
        else:
            self.args += ["-ngl", "0"]
        self.proc: subprocess.Popen | None = None
        self.load_s = 0.0

    def __enter__(self) -> "LlamaServer":
        started = time.monotonic()
        self.proc = popen_in_own_session(self.args, log_path=self.log)
        wait_until(self._healthy, timeout=LOAD_TIMEOUT, interval=0.05, what="llama-server /health")
        self.load_s = time.monotonic() - started
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n{tail(self.log)}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def complete(self, prompt: str) -> str:
        body = {"prompt": prompt, "n_predict": 16, "temperature": 0, "top_k": 1, "seed": 42,
                "cache_prompt": False}
        r = httpx.post(f"http://127.0.0.1:{self.port}/completion", json=body, timeout=120)
        r.raise_for_status()
        return r.json()["content"]

    def __exit__(self, *exc) -> None:
        kill_process_tree(self.proc)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class GgufLog:
    """The `rpc-gguf:` lines of one log."""

    lines: list[tuple[str, dict[str, str]]]

    @classmethod
    def read(cls, path: Path) -> "GgufLog":
        lines = []
        for line in path.read_text(errors="replace").splitlines():
            at = line.find("rpc-gguf: ")
            if at < 0:
                continue
            m = RPC_GGUF_LINE.match(line[at:])
            assert m, f"malformed rpc-gguf line: {line!r}"
            fields = dict(f.split("=", 1) for f in m.group("fields").split())
            lines.append((m.group("kind"), fields))
        return cls(lines)

    def of(self, kind: str) -> list[dict[str, str]]:
        return [fields for k, fields in self.lines if k == kind]

    def totals(self) -> dict[str, int]:
        """The summaries added up (a load may end in several bursts)."""
        out = {"hits": 0, "misses": 0, "hit_bytes": 0, "miss_bytes": 0}
        for fields in self.of("summary"):
            for key in out:
                out[key] += int(fields[key])
        return out


@dataclass
class RpcRun:
    completion: str
    relayed: int
    to_server: int
    load_s: float
    client: GgufLog
    server: GgufLog
    connections: int  # that llama-server opened to the rpc-server


def run_over_rpc(bin_dir: Path, model: Path, logs: Path, rpc_gguf: Path | None,
                 llama_args: list[str] = ()) -> RpcRun:
    """Load `model` in a llama-server whose every layer is on one rpc-server (given `rpc_gguf`)."""
    logs.mkdir(parents=True, exist_ok=True)
    with RpcServer(bin_dir, logs / "rpc-server.log", rpc_gguf) as rpc, \
            ByteCountingRelay(rpc.port) as relay, \
            LlamaServer(bin_dir, model, logs / "llama-server.log", rpc=[f"127.0.0.1:{relay.port}"],
                        extra_args=llama_args) as server:
        relayed, to_server = relay.total, relay.to_server  # everything up to /health ok
        completion = server.complete(PROMPT)
    connections = (logs / "rpc-server.log").read_text(errors="replace").count("Accepted client connection")
    return RpcRun(completion, relayed, to_server, server.load_s,
                  GgufLog.read(logs / "llama-server.log"), GgufLog.read(logs / "rpc-server.log"), connections)


# ---------------------------------------------------------------------------------------------
# tests


# mmap (llama.cpp's default): the loader offers the whole model to the server first and never reads
# the server's share; without mmap every weight write asks the server first, with a hash of all its bytes.
@pytest.mark.parametrize("load_mode", ["mmap", "none"])
def test_weights_load_from_the_local_gguf(bin_dir, model, local_completion, tmp_path, load_mode):
    run = run_over_rpc(bin_dir, model, tmp_path, rpc_gguf=model, llama_args=["--load-mode", load_mode])
    size = model.stat().st_size
    print(f"\nlocal gguf ({load_mode}): {run.relayed} bytes relayed during load ({run.relayed / size:.3%} of {size}), "
          f"{run.to_server} to the server, load {run.load_s:.2f} s")

    assert run.relayed < 0.01 * size
    assert bool(run.server.of("offer")) == (load_mode == "mmap")  # which of the two ways it loaded
    assert run.connections == 1  # kept for the whole load: each new one costs the tunnel round trips
    server = run.server.totals()
    assert server["hits"] > 0 and server["misses"] == 0, run.server.lines
    assert run.client.of("miss") == [] and run.client.totals()["misses"] == 0
    assert run.client.totals()["hit_bytes"] == server["hit_bytes"]
    assert server["hit_bytes"] > 0.5 * size  # the layers really were loaded there
    assert run.completion == local_completion


def test_a_different_gguf_misses_and_the_bytes_are_sent(bin_dir, model, local_completion,
                                                        perturbed_model, tmp_path):
    other, expected = perturbed_model
    run = run_over_rpc(bin_dir, model, tmp_path, rpc_gguf=other)
    print(f"\nperturbed gguf: {run.relayed} bytes relayed during load, load {run.load_s:.2f} s")

    client_misses = {m["name"]: m["reason"] for m in run.client.of("miss")}
    server_misses = {m["name"]: m["reason"] for m in run.server.of("miss")}
    assert client_misses == expected
    assert server_misses == expected
    missed = sum(int(m["bytes"]) for m in run.client.of("miss"))
    assert run.client.totals()["misses"] == len(expected)
    assert run.client.totals()["miss_bytes"] == missed
    assert run.relayed > missed  # those tensors crossed the wire
    assert run.relayed < missed + 0.01 * model.stat().st_size  # and nothing else did
    assert run.completion == local_completion


def test_without_gguf_the_server_behaves_as_stock(bin_dir, model, local_completion, tmp_path):
    run = run_over_rpc(bin_dir, model, tmp_path, rpc_gguf=None)
    print(f"\nno --gguf: {run.relayed} bytes relayed during load, load {run.load_s:.2f} s")

    assert run.client.lines == [] and run.server.lines == []
    assert run.relayed > 0.5 * model.stat().st_size
    assert run.completion == local_completion


def test_an_unreadable_gguf_is_a_clear_startup_error(bin_dir, tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is no gguf")
    proc = subprocess.run([str(bin_dir / "ggml-rpc-server"), "-p", str(free_port()), "--gguf", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"Failed to read the tensor table of '{bad}'" in proc.stderr
