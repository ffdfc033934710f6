"""Starting and stopping this MESH_HOME's node from the console, through meshctl's own functions.

A restart keeps the settings the node was started with: they are the MESH_* variables of its
running supervisord (meshctl up passes every setting that way), with only the model or the client
switch changed. A node started for the first time gets the settings from env / config.toml.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
from pydantic import ValidationError

from common import addresses
from common.binaries import BinariesError, find_binaries
from common.bus import request
from common.default_model import default_model_path
from common.gguf_info import ModelError, inspect_gguf
from common.messages import TokenRequest
from common.settings import Settings, load_settings
from meshctl.cli import UsageError, preflight, service_env, supervisord_command, supervisord_pid

log = logging.getLogger("console")
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 40


def running_node_env(home: Path) -> dict[str, str] | None:
    """The MESH_* settings of this home's running node, or None when none runs."""
    pid = supervisord_pid(home)
    if pid is None:
        return None
    try:
        return {k: v for k, v in psutil.Process(pid).environ().items() if k.startswith("MESH_")}
    except psutil.Error:
        return {}


def settings_for(home: Path, base_env: dict[str, str] | None, *, model: str | None, client: bool | None) -> Settings:
    """Settings for a (re)start: the running node's, else env / config; then the console's changes."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MESH_")}
    try:
        if base_env is not None:
            for key in saved:
                os.environ.pop(key, None)
            # Membership persists in MESH_HOME; a start-up --join would undo a later leave.
            os.environ.update({k: v for k, v in base_env.items() if k != "MESH_JOIN"})
        os.environ["MESH_HOME"] = str(home)
        overrides: dict = {"home": home}
        if client is not None:
            overrides["client"] = client
        if model:
            overrides["model"] = Path(model)
        try:
            return load_settings(**overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UsageError(f"invalid {'/'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    finally:
        for key in list(os.environ):
            if key.startswith("MESH_"):
                del os.environ[key]
        os.environ.update(saved)


def check_model_path(path: str, cache_dir: Path) -> str:
    """A model the user typed or picked: it must be a readable GGUF (one clear line if not)."""
    if not path or not path.strip():
        raise UsageError("enter the path of a .gguf file, or pick one from the list")
    resolved = Path(path.strip()).expanduser()
    try:
        inspect_gguf(resolved, cache_dir)
    except ModelError as exc:  # the shared messages speak to the command line
        raise UsageError(str(exc).replace("pass --model with the path of a .gguf file", "enter the path of a .gguf file")) from None
    return str(resolved.resolve())


class NodeControl:
    """One start/stop at a time; `busy` says what is going on for the page."""

    def __init__(self, home: Path):
        self.home = home
        self.busy = ""
        self.last_error = ""
        self.last_env: dict[str, str] | None = None  # settings of the node we last saw or started
        self._lock = threading.Lock()

    def running(self) -> bool:
        return supervisord_pid(self.home) is not None

    def state(self) -> dict:
        env = running_node_env(self.home)
        if env:
            self.last_env = env
        return {"running": env is not None, "busy": self.busy, "error": self.last_error,
                "model": (env or {}).get("MESH_MODEL", ""), "client": (env or {}).get("MESH_CLIENT") == "1",
                "api_port": int((env or self.last_env or {}).get("MESH_PORT") or load_settings().port)}

    def api_target(self) -> tuple[str, str | None]:
        """The node's local API base URL and the key it requires."""
        env = running_node_env(self.home) or self.last_env or {}
        port = env.get("MESH_PORT") or str(load_settings().port)
        return f"http://127.0.0.1:{port}", env.get("MESH_API_KEY") or None

    def start(self, *, model: str | None = None, client: bool | None = None) -> None:
        """Start (or restart with changes) in this thread; raises UsageError with the reason."""
        with self._guard("starting"):
            base = running_node_env(self.home)
            if base is None:
                base = self.last_env
            if model:
                model = check_model_path(model, self.home / "cache")
            settings = settings_for(self.home, base, model=model, client=client)
            if self.running():
                self.busy = "stopping the old node"
                self._stop()
            self.busy = self.first_start_work(settings) or "starting"
            try:
                settings = preflight(settings)
            except SystemExit as exc:  # a failed llama.cpp build or model fetch exits with its message
                raise UsageError(str(exc.code).removeprefix("error: ")) from None
            self.busy = "starting"
            addresses.ensure_dirs(settings.home)
            env = service_env(settings)
            out = open(addresses.log_path(settings.home, "node"), "ab")
            subprocess.Popen(supervisord_command(settings), env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()
            self.last_env = {k: v for k, v in env.items() if k.startswith("MESH_")}
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if request(self.home, "meshd", TokenRequest(), timeout=1.0).ok:
                    log.info("node started (model %s, client %s)", settings.model, settings.client)
                    return
                time.sleep(0.3)
            raise UsageError(f"the node did not come up within {START_TIMEOUT_S} s; see {addresses.logs_dir(self.home)}")

    @staticmethod
    def first_start_work(settings: Settings) -> str:
        """What a first start does before any service runs, so the page can say why it takes minutes."""
        if settings.client:
            return ""
        try:
            find_binaries(settings.bin_dir, build_if_missing=False)
        except BinariesError:
            return "building llama.cpp (first start only: several minutes; see the console's output)"
        if settings.model is None and not default_model_path().exists():
            return "fetching the default model (first start only, ~250 MB)"
        return ""

    def stop(self) -> None:
        with self._guard("stopping"):
            self._stop()

    def _stop(self) -> None:
        pid = supervisord_pid(self.home)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if supervisord_pid(self.home) != pid:
                return
            time.sleep(0.2)
        raise UsageError(f"the node (supervisord pid {pid}) did not stop within {STOP_TIMEOUT_S} s")

    def _guard(self, what: str):
        control = self

        class Guard:
            def __enter__(self):
                if not control._lock.acquire(blocking=False):
                    raise UsageError(f"the node is already {control.busy or 'busy'}; wait for it to finish")
                control.busy, control.last_error = what, ""

            def __exit__(self, kind, exc, tb):
                control.busy = ""
                if isinstance(exc, UsageError):
                    control.last_error = str(exc)
                control._lock.release()
                return False
        return Guard()
