"""Supervised long-running tasks: a service whose loop dies must not limp on half-dead.

Every loop and bus handler of a service runs as a task of its `Supervisor`. If one raises (or a
loop that should run forever returns), the supervisor logs it and the service's `serve()` stops
the rest, cleans up and exits non-zero, so supervisord restarts it with fresh state — instead of
a service that answers `status` while its gossip, planning or child-keeping has silently stopped.

Tests make a loop fail on purpose (`test_faults` setting): a file named
`fault-<service>-<task>` under MESH_HOME/run makes that task raise, once.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Coroutine

from common import addresses

log = logging.getLogger("tasks")
FAULT_POLL_S = 0.2


class InjectedFault(RuntimeError):
    """Raised in a task by a test (see the module docstring)."""


def fault_file(home: Path, service: str, task: str) -> Path:
    return addresses.run_dir(home) / f"fault-{service}-{task}"


class Supervisor:
    def __init__(self, service: str, home: Path, *, test_faults: bool = False):
        self.service, self.home, self.test_faults = service, home, test_faults
        self.tasks: dict[str, asyncio.Task] = {}
        self._failed: asyncio.Future | None = None

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run `coro` for the life of the service: its end, by exception or return, ends the service."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._guarded(name, coro) if self.test_faults else coro)
        task.add_done_callback(lambda t: self._ended(name, t))
        self.tasks[name] = task
        return task

    async def _guarded(self, name: str, coro: Coroutine[Any, Any, Any]) -> Any:
        inner = asyncio.ensure_future(coro)
        path = fault_file(self.home, self.service, name)
        try:
            while not inner.done():
                await asyncio.wait({inner}, timeout=FAULT_POLL_S)
                if not inner.done() and path.exists():
                    path.unlink(missing_ok=True)
                    inner.cancel()
                    raise InjectedFault(f"fault injected into {self.service}'s {name} by a test")
            return inner.result()
        finally:
            inner.cancel()

    def _ended(self, name: str, task: asyncio.Task) -> None:
        if task.cancelled() or self._failed is None or self._failed.done():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("%s: %s failed; exiting so supervisord restarts it", self.service, name,
                         exc_info=(type(exc), exc, exc.__traceback__))
            self._failed.set_result(f"{name} failed: {type(exc).__name__}: {exc}")
        else:
            log.critical("%s: %s ended unexpectedly; exiting so supervisord restarts it", self.service, name)
            self._failed.set_result(f"{name} ended")

    async def run_until(self, stopping: asyncio.Event) -> str | None:
        """Wait for a stop request (None) or the first failed task (its description); then cancel them all."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({stop, self._failed}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        failure = self._failed.result() if self._failed.done() else None
        if not self._failed.done():
            self._failed.set_result(None)  # from here on, tasks end because we cancel them
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        return failure
