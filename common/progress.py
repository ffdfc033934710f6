"""Progress of long steps (model install, llama.cpp build, llama-server load): a bar in a terminal,
a line now and then in a log, and a figure for `meshctl status` through an optional reporter.

A service that wants the figure sets `set_reporter(fn)`; fn(step, fraction) is then called from
whatever thread does the work (runnerd publishes it in its state).
"""
from __future__ import annotations

import sys
import time
from typing import Callable

Reporter = Callable[[str, float], None]
_reporter: Reporter | None = None
LOG_EVERY_S = 5.0


def set_reporter(fn: Reporter | None) -> None:
    global _reporter
    _reporter = fn


def report(step: str, fraction: float) -> None:
    """Tell the reporter (if any) how far `step` is, 0..1."""
    fn = _reporter
    if fn is not None:
        fn(step, max(0.0, min(1.0, fraction)))


class StepProgress:
    """`with StepProgress("installing model", total=n_bytes, unit="B") as p: p.advance(k)`."""

    def __init__(self, step: str, total: float, *, unit: str = "", tag: str = "") -> None:
        self.step, self.total, self.unit, self.tag = step, max(total, 1), unit, tag or step
        self.done = 0.0
        self._bar = None
        self._task = None
        self._last_line = 0.0

    def __enter__(self) -> "StepProgress":
        if sys.stderr.isatty():
            try:
                from rich.progress import (BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn,
                                           TimeRemainingColumn)
                columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
                if self.unit == "B":
                    columns.append(DownloadColumn())
                columns.append(TimeRemainingColumn())
                self._bar = Progress(*columns, transient=False)
                self._bar.start()
                self._task = self._bar.add_task(self.step, total=self.total)
            except ImportError:  # llama.cpp/build.py may run before the project's dependencies are installed
                self._bar = None
        report(self.step, 0.0)
        return self

    def update(self, done: float) -> None:
        self.done = min(done, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        else:
            now = time.monotonic()
            if now - self._last_line >= LOG_EVERY_S:
                self._last_line = now
                print(f"[{self.tag}] {self.step}: {self.done * 100 / self.total:.0f}%", file=sys.stderr, flush=True)
        report(self.step, self.done / self.total)

    def advance(self, amount: float) -> None:
        self.update(self.done + amount)

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.update(self.total)
        if self._bar is not None:
            self._bar.stop()
