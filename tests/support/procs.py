"""Free ports, polling with a deadline, and killing whole process trees."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from typing import Callable, TypeVar

import psutil

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for programs that cannot take port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], T], *, timeout: float, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


async def wait_for_condition(condition: Callable[[], object], timeout: float, what: str) -> None:
    """`wait_until` for coroutines: poll without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def kill_process_tree(proc: subprocess.Popen | int, *, grace: float = 5.0,
                      first: signal.Signals = signal.SIGTERM) -> None:
    """`first` (SIGTERM) to a process and all its descendants, then SIGKILL whatever is left after `grace` s.

    Descendants are collected before the signal, so children re-parented on the parent's death
    are still reached.
    """
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(first)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=grace)  # reap it, so no zombie is left behind
        except subprocess.TimeoutExpired:
            pass


def popen_in_own_session(args: list[str], *, log_path: os.PathLike | str | None = None,
                         **kwargs) -> subprocess.Popen:
    """Start a child in its own session (a terminal's Ctrl-C reaches only us), output to a log."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    finally:
        if log_path:
            out.close()  # the child holds its own copy of the descriptor
