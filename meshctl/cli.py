"""meshctl: the one command a user runs — up, down, status, token, join, logs, console."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from pydantic import ValidationError

from common import addresses
from common.binaries import BinariesError, find_binaries
from common.bus import request
from common.default_model import ModelInstallError, ensure_default_model
from common.gguf_info import ModelError, inspect_gguf
from common.messages import JoinRequest, StatusRequest, TokenRequest
from common.plan_text import plan_line
from common.settings import Settings, home_from_env, load_settings
from common.settings_cli import add_settings_flags, env_name, flag_name, overrides_from_args, settings_env_names
from common.tokens import TokenError, decode_token

SUPERVISORD_CONF = Path(__file__).resolve().parent / "supervisord.conf"  # package data; ./supervisord.conf links here


class UsageError(Exception):
    """One line for the user: what is wrong and what to do."""


# --- up / down -----------------------------------------------------------------------------------

def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = overrides_from_args(args)
    if args.home:
        os.environ["MESH_HOME"] = str(Path(args.home).expanduser())  # the config file lives there
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ", ".join(f"{flag_name(str(p))} ({env_name(str(p))})" for p in err["loc"][:1])
        msg = err["msg"].removeprefix("Value error, ")
        raise UsageError(f"invalid {where}: {msg}" if where else msg) from None


def supervisord_pid(home: Path) -> int | None:
    """The pid of this home's running supervisord; a stale pidfile (crash, reused pid) counts as none,
    and so does a stopped one a foreground `meshctl up`'s parent has not reaped yet (a zombie)."""
    try:
        pid = int(addresses.supervisord_pidfile(home).read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "supervisord" not in " ".join(proc.cmdline()):
            return None
        return pid
    except (OSError, ValueError, psutil.Error):
        return None


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"API port {port} on {host} is unavailable ({exc.strerror}); "
                             f"stop whatever uses it or pick another with --port") from None


def preflight(settings: Settings) -> Settings:
    """Everything a user can get wrong, checked before any service starts."""
    if supervisord_pid(settings.home):
        raise UsageError(f"a node is already running for MESH_HOME={settings.home}; "
                         f"`meshctl down` first, or use another --home")
    if problem := settings.api_exposure_problem():  # also checked by Settings itself
        raise UsageError(problem)
    for token in settings.join:
        try:
            decode_token(token)
        except TokenError as exc:
            raise UsageError(str(exc)) from None
    check_port_free(settings.api_bind_host, settings.port)
    if settings.client:
        return settings
    # the model store and build settings (maybe from config.toml) also hold for what runs in this process
    os.environ.update(settings.build_env())
    try:
        if settings.model is None:
            settings = settings.model_copy(update={"model": ensure_default_model()})
        inspect_gguf(settings.model, settings.home / "cache")
        find_binaries(settings.bin_dir, build_if_missing=True, build_env=settings.build_env())
    except (ModelError, ModelInstallError, BinariesError) as exc:
        raise UsageError(str(exc)) from None
    return settings


def supervisord_command(settings: Settings) -> list[str]:
    exe = shutil.which("supervisord", path=str(Path(sys.executable).parent)) or shutil.which("supervisord")
    if not exe:
        raise UsageError("supervisord is not installed; run `pip install -e .` in the project")
    return [exe, "-c", str(SUPERVISORD_CONF), "-j", str(addresses.supervisord_pidfile(settings.home)),
            "-l", str(addresses.log_path(settings.home, "supervisord"))]


def service_env(settings: Settings) -> dict[str, str]:
    # Every setting's MESH_* variable comes from the settings just computed (flags and config.toml
    # included), so each service, and a build any of them starts, sees the same values.
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings_env_names()}
    env.update(settings.to_env())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # our console scripts first
    return env


def cmd_up(args: argparse.Namespace) -> int:
    settings = preflight(settings_from_args(args))
    addresses.ensure_dirs(settings.home)
    command, env = supervisord_command(settings), service_env(settings)
    api = f"http://{'localhost' if settings.api_bind_host == '127.0.0.1' else settings.api_bind_host}:{settings.port}/v1"
    if not args.detach:
        print(f"Starting node (MESH_HOME={settings.home}); API at {api}; Ctrl-C stops it.", flush=True)
        if os.fork() == 0:  # prints the token to this terminal only: meshd never logs it
            reply = wait_for_token(settings.home, 60)
            if reply.ok:
                print(f"Invite token: {reply.data['token']}", flush=True)
                for line in join_outcome(settings.home, settings.join):
                    print(line, flush=True)
            os._exit(0)
        os.execve(command[0], command, env)
    log = open(addresses.log_path(settings.home, "node"), "ab")
    subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                     start_new_session=True)
    reply = wait_for_token(settings.home, 30)
    if not reply.ok:
        raise UsageError(f"the node did not come up within 30 s; see `meshctl logs` ({addresses.logs_dir(settings.home)})")
    print(f"Node started in the background (MESH_HOME={settings.home}).")
    print(f"Invite token: {reply.data['token']}")
    print(f"API at {api} — `meshctl status` shows when the model is served.")
    failed = [line for line in join_outcome(settings.home, settings.join) if line.startswith("join failed")]
    if failed:
        raise UsageError("; ".join(failed))
    return 0


JOIN_OUTCOME_TIMEOUT_S = 40.0  # a join's dials give up well before this (common/nat/reach.py)


def join_outcome(home: Path, tokens: list[str]) -> list[str]:
    """One line per --join token once meshd has reached the inviting node or given up on it (for now:
    an inviter that does not answer is dialed again and again, which the line says)."""
    pending = {decode_token(t).node_id: t for t in tokens}
    lines: list[str] = []
    deadline = time.monotonic() + JOIN_OUTCOME_TIMEOUT_S
    mesh: dict = {}
    while pending and time.monotonic() < deadline:
        reply = request(home, "meshd", StatusRequest(), timeout=1.5)
        mesh = reply.data if reply.ok else {}
        connected = {p["announcement"]["node_id"] for p in mesh.get("peers", []) if p.get("connected")}
        errors = [e.removeprefix("join: ") for e in mesh.get("errors", []) if e.startswith("join: ")]
        for node_id in [n for n in pending if n in connected]:
            lines.append(f"joined mesh {mesh.get('mesh_id')} through node {node_id[:8]}")
            del pending[node_id]
        if errors and pending:  # meshd keeps the latest join error only
            lines += [join_failed_line(errors[-1], node_id in retried(mesh)) for node_id in pending]
            pending.clear()
        if pending:
            time.sleep(0.3)
    lines += [join_failed_line(f"no answer from node {n[:8]} within {JOIN_OUTCOME_TIMEOUT_S:g} s", n in retried(mesh))
              for n in pending]
    return lines


def retried(mesh: dict) -> set[str]:
    """Inviters whose --join meshd keeps retrying (services/meshd/joining.py)."""
    return {j["node_id"] for j in mesh.get("joining", [])}


def join_failed_line(reason: str, retrying: bool) -> str:
    if retrying:
        return (f"join failed: {reason} — the node runs alone and keeps retrying (every 5-30 s; `meshctl status` "
                f"shows it), and joins as soon as the inviting node answers; `meshctl down` stops it")
    return f"join failed: {reason} — the node runs alone; retry with `meshctl join TOKEN` or stop it with `meshctl down`"


def wait_for_token(home: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        reply = request(home, "meshd", TokenRequest(), timeout=1.0)
        if reply.ok or time.monotonic() > deadline:
            return reply
        time.sleep(0.3)


def cmd_down(args: argparse.Namespace) -> int:
    home = settings_home(args)
    pid = supervisord_pid(home)
    if pid is None:
        print(f"no node is running for MESH_HOME={home}")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if supervisord_pid(home) != pid:
            print("node stopped")
            return 0
        time.sleep(0.2)
    raise UsageError(f"supervisord (pid {pid}) did not stop within 40 s; kill it with `kill {pid}`")


# --- status / token / join / logs ------------------------------------------------------------------

def settings_home(args: argparse.Namespace) -> Path:
    if args.home:
        os.environ["MESH_HOME"] = str(Path(args.home).expanduser())
    return home_from_env()


def gather_status(home: Path) -> dict:
    out = {}
    for service in addresses.SERVICES:
        reply = request(home, service, StatusRequest(), timeout=1.5)
        out[service] = reply.data if reply.ok else {"error": reply.error}
    return out


def gb(n: int | None) -> str:
    return f"{(n or 0) / (1 << 30):.1f} GB"


def short_bytes(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def peer_path_text(peer: dict, tunnel: dict | None) -> str:
    """How we reach the peer (direct / punched / relayed) and the data lane last used."""
    path = (peer.get("path") or {}).get("path") or "-"
    return f"{path} {tunnel['lane']}" if tunnel else path


def peer_bytes_text(peer: dict, tunnel: dict | None) -> str:
    """Bytes each way with this peer: control connection plus data tunnels (sent/received)."""
    path = peer.get("path") or {}
    sent = path.get("bytes_sent", 0) + (tunnel or {}).get("bytes_out", 0)
    received = path.get("bytes_received", 0) + (tunnel or {}).get("bytes_in", 0)
    return f"{short_bytes(sent)}/{short_bytes(received)}" if path or tunnel else "-"


def render_status(status: dict) -> str:
    mesh, plan, runner, gateway = (status.get(s, {}) for s in addresses.SERVICES)
    if "error" in mesh and "error" in gateway:
        return f"node is not running ({mesh['error']})"
    me = mesh.get("node_id", "")
    lines = [f"node {me or '?'}  mesh {mesh.get('mesh_id', '?')}"]
    if runner.get("error"):
        lines.append(f"  ERROR: {runner['error']}")
    if runner.get("progress"):
        lines.append(f"in progress: {runner['progress']}")
    if gateway.get("error") and isinstance(gateway.get("error"), str):
        lines.append(f"  ERROR: {gateway['error']}")
    if "state" in plan:
        lines.append(f"plan: {plan_line(plan['state'], plan.get('reason', ''))}")
        if plan.get("host"):
            lines.append(f"host: {plan['host'][:12]}{' (this node)' if plan['host'] == me else ''}")
        if plan.get("members"):
            lines.append("split: " + ", ".join(f"{m['node_id'][:8]} {m['ratio']:.2f}" for m in plan["members"]))
    model = runner.get("model") or {}
    if model:
        lines.append(f"model: {model.get('name')} ({model.get('size_bytes', 0) / 1e6:.0f} MB, {model.get('n_layers')} layers,"
                     f" fingerprint {model.get('fingerprint', '')[:12]})")
    if "rpc" in runner:
        tls = runner.get("rpc_tls") or []
        where = (f"{runner.get('rpc_host')}:{runner['rpc'].get('port')}, mutual TLS, only the plan's host" if tls
                 else f"port {runner['rpc'].get('port')}")
        lines.append(f"rpc-server: {runner['rpc']['state']} ({where})  "
                     f"llama-server: {runner['llama']['state']} {runner['llama'].get('detail', '')}")
    if runner.get("llama", {}).get("state") in ("starting", "ready"):
        for worker, path in (runner.get("rpc_paths") or {}).items():
            lines.append(f"rpc path to {worker[:8]}: {path}")
    spec = runner.get("speculation") or {}
    if spec.get("mode"):
        rate = spec.get("acceptance_rate")
        accepted = (f"; drafts accepted {rate:.0%} ({spec['accepted_tokens']}/{spec['drafted_tokens']} tokens)"
                    if rate is not None else ("; no drafts yet" if spec["mode"] != "off" else ""))
        lines.append(f"speculative decoding: {spec['mode']} — {spec.get('reason', '')}{accepted}")
    decode = runner.get("decode") or {}
    if decode.get("tok_s"):
        lines.append(f"decode: {decode['tok_s']:.1f} tok/s (recent requests: {decode['tokens']} tokens, "
                     f"{max(time.time() - decode['at'], 0):.0f} s ago)")
    for w in runner.get("weights", []):
        lines.append(f"weights of {w['node_id'][:8]}: {w['local_bytes'] / 1e6:.1f} MB from its own GGUF, "
                     f"{w['sent_bytes'] / 1e6:.1f} MB sent" + (f" ({w['misses']} tensors missed)" if w["misses"] else ""))
    if runner.get("placement"):  # llama-server's own report: which device holds how much of the model
        lines.append("placed: " + ", ".join(
            f"{p['device']} ({'this node' if p['node_id'] == me else p['node_id'][:8] or '?'}) "
            f"{p['model_bytes'] / 1e6:.0f} MB" for p in runner["placement"]))
    if runner.get("memory_bytes"):
        lines.append(f"memory offered: {gb(runner['memory_bytes'])} ({runner.get('memory_source')})")
    if "upstream" in gateway:
        lines.append(f"API: {gateway.get('api_url')} → {gateway.get('upstream') or 'no host yet'}"
                     f"  (served {gateway.get('requests_served', 0)}, failed {gateway.get('requests_failed', 0)})")
    nat = mesh.get("nat") or {}
    if nat.get("servers"):
        lines.append(f"NAT: {nat.get('detail')}")
    excluded = {e["node_id"]: e["reason"] for e in plan.get("excluded", [])}
    members = {m["node_id"] for m in plan.get("members", [])}
    tunnels = {t["node_id"]: t for t in gateway.get("tunnels", [])}
    peers = mesh.get("peers", [])
    if peers:
        lines.append("")
        lines.append(f"{'PEER':<10} {'ROLE':<7} {'MEMORY':>9} {'MODEL':<10} {'RTT':>8} {'PATH':<14} {'SENT/RECEIVED':<15} "
                     f"STATUS")
        my_fp = model.get("fingerprint")
        for p in peers:
            a = p["announcement"]
            match = "-" if a["role"] == "client" else ("same" if a.get("model_fingerprint") == my_fp else "different")
            rtt = f"{p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else "-"
            role = "host" if a["node_id"] == plan.get("host") else a["role"]
            why = excluded.get(a["node_id"]) or ("in split" if a["node_id"] in members else "")
            lines.append(f"{a['node_id'][:8]:<10} {role:<7} {gb(a['memory_bytes']):>9} {match:<10} {rtt:>8} "
                         f"{peer_path_text(p, tunnels.get(a['node_id'])):<14} "
                         f"{peer_bytes_text(p, tunnels.get(a['node_id'])):<15} {p['status']}{'; ' + why if why else ''}")
            via = (p.get("path") or {}).get("via", "")
            if via.startswith("relay "):
                lines.append(f"{'':<10} via {via}")
    for retry in mesh.get("joining", []):
        lines.append(joining_text(retry))
    for err in mesh.get("errors", []):
        lines.append(f"mesh error: {err}")
    if dropped := {k: v for k, v in (mesh.get("gossip_dropped") or {}).items() if v}:
        lines.append("gossip dropped (not believed): " + ", ".join(f"{n} {kind.replace('_', ' ')}"
                                                                   for kind, n in sorted(dropped.items())))
    return "\n".join(lines)


def joining_text(retry: dict) -> str:
    """A --join being retried: `joining: retrying ADDR in N s (K failed)`."""
    where = ", ".join(f"{h}:{p}" for h, p in retry.get("addrs", [])) or "no address"
    if retry.get("retry_in_s") is None:
        return f"joining: dialing {where} (attempt {retry.get('attempts', 0) + 1})"
    return f"joining: retrying {where} in {retry['retry_in_s']:.0f} s ({retry.get('attempts', 0)} failed)"


def cmd_status(args: argparse.Namespace) -> int:
    status = gather_status(settings_home(args))
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0 if "error" not in status["meshd"] else 1


def cmd_token(args: argparse.Namespace) -> int:
    reply = request(settings_home(args), "meshd", TokenRequest(rotate=args.rotate))
    if not reply.ok:
        raise UsageError(reply.error or "meshd refused")
    print(reply.data["token"])
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    try:
        decode_token(args.token)
    except TokenError as exc:
        raise UsageError(str(exc)) from None
    reply = request(settings_home(args), "meshd", JoinRequest(token=args.token), timeout=30.0)
    if not reply.ok:
        raise UsageError(f"join failed: {reply.error}")
    print(f"joined mesh {reply.data['mesh_id']} through node {reply.data['via'][:8]}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    home = settings_home(args)
    names = [args.service] if args.service else list(addresses.SERVICES)
    paths = [addresses.log_path(home, n) for n in names]
    existing = [p for p in paths if p.exists()]
    if not existing:
        raise UsageError(f"no logs yet in {addresses.logs_dir(home)}")
    tail = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(p) for p in existing]
    return subprocess.call(tail)


def cmd_console(args: argparse.Namespace) -> int:
    from services.console.app import serve
    from services.console.security import bind_check
    home = settings_home(args)
    try:
        settings = load_settings(console_port=args.port, console_host=args.host, console_api_key=args.api_key)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"invalid {'/'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    why_not = bind_check(settings.console_host, settings.console_api_key)
    if why_not:
        raise UsageError(why_not)
    check_port_free(settings.console_host, settings.console_port)
    serve(home, settings.console_host, settings.console_port, api_key=settings.console_api_key,
          open_browser=not args.no_open)
    return 0


# --- argument parsing ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Distributed LLM inference over a QUIC mesh.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_home(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--home", help="node state directory (MESH_HOME, default ~/.mesh-inference)")
        return p

    # Every Settings field is a flag of `up` (common/settings_cli.py); only meshctl's own options are added here.
    up = sub.add_parser("up", help="start a node (foreground unless -d)",
                        description="Start a node. Every flag is also a MESH_* variable and a config.toml key.")
    add_settings_flags(up)
    up.add_argument("-d", "--detach", action="store_true", help="run in the background (default: off)")
    up.set_defaults(func=cmd_up)

    with_home(sub.add_parser("down", help="stop the node")).set_defaults(func=cmd_down)
    status = with_home(sub.add_parser("status", help="peers, roles, host, split, tunnels"))
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    token = with_home(sub.add_parser("token", help="print this mesh's invite token"))
    token.add_argument("--rotate", action="store_true", help="new secret: old tokens stop admitting new nodes")
    token.set_defaults(func=cmd_token)
    join = with_home(sub.add_parser("join", help="join a mesh from a running node"))
    join.add_argument("token")
    join.set_defaults(func=cmd_join)
    logs = with_home(sub.add_parser("logs", help="show service logs"))
    logs.add_argument("service", nargs="?", choices=list(addresses.SERVICES) + ["llama-server", "rpc-server", "supervisord", "node"])
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.set_defaults(func=cmd_logs)
    console = with_home(sub.add_parser("console", help="web console: see the mesh, join, pick or download a model, chat"))
    console.add_argument("--port", type=int, help="console port (default 3131)")
    console.add_argument("--host", help="address to listen on (default 127.0.0.1; anything else needs --api-key)")
    console.add_argument("--api-key", help="key the console page asks for (MESH_CONSOLE_API_KEY)")
    console.add_argument("--no-open", action="store_true", help="do not open a browser")
    console.set_defaults(func=cmd_console)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
