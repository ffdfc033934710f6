"""The llama.cpp processes runnerd starts: own session, tracked pid, die with runnerd.

runnerd only ever signals pids it spawned itself — never processes found by name.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
from pathlib import Path

log = logging.getLogger("runnerd")
PR_SET_PDEATHSIG = 1
# ggml's abort attaches gdb for a backtrace when gdb is installed: seconds on a loaded machine, all of
# them outage (llama-server aborts on any RPC error). The abort's own message still reaches the log.
NO_BACKTRACE = {"GGML_NO_BACKTRACE": "1"}


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel SIGKILLs it if runnerd dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: runnerd's own shutdown still stops it
        pass


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """One llama.cpp process with its output appended to a log file."""

    def __init__(self, name: str, args: list[str], log_file: Path, env: dict[str, str] | None = None):
        self.name, self.args, self.log_file = name, args, log_file
        self.env = {**os.environ, **env} if env else None  # added to runnerd's own
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            out.write(f"\n=== starting: {' '.join(self.args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent,
                                         env=os.environ | NO_BACKTRACE | (self.env or {}),
                                         # keep Python's SIGPIPE=ignore: a client that hangs up mid-reply
                                         # must be an error on that socket, not kill ggml-rpc-server
                                         restore_signals=False)
        log.info("%s started (pid %d), log: %s", self.name, self.proc.pid, self.log_file)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_description(self) -> str:
        code = self.proc.poll() if self.proc else None
        if code is None:
            return "running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def wait(self) -> int:
        while self.running():
            await asyncio.sleep(0.2)
        return self.proc.returncode if self.proc else 0

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL what is left after `grace` seconds."""
        if not self.running():
            return
        assert self.proc
        self._signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except asyncio.TimeoutError:
            self._signal_group(signal.SIGKILL)
            await self.wait()
        log.info("%s stopped (pid %d)", self.name, self.proc.pid)

    def kill_now(self) -> None:
        if self.running():
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # its own session: the group is exactly what we started
        except ProcessLookupError:
            pass

    def log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def log_text(self, start: int = 0) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())
