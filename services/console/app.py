"""The web console (`meshctl console`): a small FastAPI app beside the node, not under supervisord.

It must work before the node is up, because it starts and stops the node itself; so it is its own
process, and it talks to the node's services only over the bus (control requests, and their PUB
sockets for the live view), like meshctl. Every asset is in static/ — no build step, no CDN.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import webbrowser
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from common.bus import request as bus_request
from common.messages import JoinRequest, LeaveRequest, TokenRequest
from common.tokens import TokenError, decode_token
from meshctl.cli import UsageError
from services.console import models as hub
from services.console.downloads import DownloadManager
from services.console.live import LiveState
from services.console.node import NodeControl, check_model_path
from services.console.security import AccessPolicy, SecurityError, allowed_hosts

log = logging.getLogger("console")
STATIC = Path(__file__).parent / "static"
SENSITIVE_READS = ("/api/token",)
RECENT_CHATS = 10


def problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise SecurityError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise SecurityError(400, "the request body must be a JSON object")
    return body


def text_field(body: dict, name: str, *, required: bool = True) -> str:
    value = body.get(name, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise SecurityError(400, f"{name} is missing; fill it in")
    return value.strip()


def tokens_per_second(chunk_times: list[float]) -> float | None:
    """Decode rate of a stream from when each content chunk (one token from llama-server) arrived."""
    if len(chunk_times) < 3:
        return None
    span = chunk_times[-1] - chunk_times[0]
    return (len(chunk_times) - 1) / span if span > 0 else None


def build_app(home: Path, policy: AccessPolicy) -> FastAPI:
    app = FastAPI(title="mesh-inference console", docs_url=None, redoc_url=None, openapi_url=None)
    live = LiveState(home)
    node = NodeControl(home)
    loop_holder: dict = {}

    def downloads_changed() -> None:
        loop = loop_holder.get("loop")
        if loop:
            asyncio.run_coroutine_threadsafe(live.bump(), loop)

    downloads = DownloadManager(hub.models_folder(), on_change=downloads_changed)
    chats: list[dict] = []
    client = httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=600.0, write=30.0, pool=10.0))

    @app.on_event("startup")
    async def start_live() -> None:
        loop_holder["loop"] = asyncio.get_running_loop()
        loop_holder["task"] = asyncio.ensure_future(live.receive_forever())

    @app.on_event("shutdown")
    async def stop_live() -> None:
        loop_holder["task"].cancel()
        await client.aclose()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            policy.check_host(request.headers.get("host"))
            if request.url.path.startswith("/api/"):
                policy.check_key(request.headers.get("authorization"))
                policy.check_origin(request.method, request.headers.get("origin"),
                                    request.headers.get("sec-fetch-site"),
                                    sensitive=request.url.path in SENSITIVE_READS)
            response = await call_next(request)
        except SecurityError as exc:
            return problem(exc.status, exc.message)
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                       "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(SecurityError)
    async def bad_input(_: Request, exc: SecurityError) -> JSONResponse:
        return problem(exc.status, exc.message)

    @app.exception_handler(UsageError)
    async def usage(_: Request, exc: UsageError) -> JSONResponse:
        return problem(400, str(exc))

    @app.exception_handler(hub.HubError)
    async def hub_error(_: Request, exc: hub.HubError) -> JSONResponse:
        return problem(400, str(exc))

    def snapshot() -> dict:
        node_state = node.state()
        if not node_state["running"] and not node_state["busy"]:
            live.forget()
        return {"view": live.view(), "node": node_state, "downloads": downloads.snapshot(),
                "chats": chats[-RECENT_CHATS:], "needs_key": bool(policy.api_key), "home": str(home),
                "models_dir": str(hub.models_folder()), "time": time.time()}

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/state")
    async def state() -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(snapshot))

    @app.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        async def stream():
            version = -1
            while not await request.is_disconnected():
                data = await asyncio.to_thread(snapshot)
                yield f"data: {json.dumps(data)}\n\n".encode()
                version = await live.wait_change(version, timeout=1.0)
                await asyncio.sleep(0.2)  # at most five pushes a second
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def require_node() -> None:
        if not node.running():
            raise UsageError("no node is running for this MESH_HOME; start it first (Start node)")

    @app.post("/api/token")
    async def token(request: Request) -> JSONResponse:
        body = await json_body(request)
        require_node()
        reply = await asyncio.to_thread(bus_request, home, "meshd", TokenRequest(rotate=bool(body.get("rotate"))))
        if not reply.ok:
            return problem(503, reply.error or "meshd refused")
        return JSONResponse({"token": reply.data["token"]})

    @app.post("/api/join")
    async def join(request: Request) -> JSONResponse:
        text = text_field(await json_body(request), "token")
        try:
            decode_token(text)
        except TokenError as exc:
            return problem(400, str(exc))
        require_node()
        reply = await asyncio.to_thread(bus_request, home, "meshd", JoinRequest(token=text), 30.0)
        if not reply.ok:
            return problem(400, f"join failed: {reply.error}")
        return JSONResponse({"mesh_id": reply.data["mesh_id"], "via": reply.data["via"]})

    @app.post("/api/leave")
    async def leave() -> JSONResponse:
        require_node()
        reply = await asyncio.to_thread(bus_request, home, "meshd", LeaveRequest(), 10.0)
        if not reply.ok:
            return problem(503, f"leave failed: {reply.error}")
        return JSONResponse(reply.data)

    @app.post("/api/node/start")
    async def node_start(request: Request) -> JSONResponse:
        body = await json_body(request)
        model = text_field(body, "model", required=False) or None
        client_mode = body.get("client")
        await asyncio.to_thread(node.start, model=model, client=bool(client_mode) if client_mode is not None else None)
        return JSONResponse(node.state())

    @app.post("/api/node/stop")
    async def node_stop() -> JSONResponse:
        await asyncio.to_thread(node.stop)
        return JSONResponse(node.state())

    @app.post("/api/models/check")
    async def model_check(request: Request) -> JSONResponse:
        path = text_field(await json_body(request), "path", required=False)
        return JSONResponse({"path": await asyncio.to_thread(check_model_path, path, home / "cache")})

    @app.get("/api/models/local")
    async def local_models() -> JSONResponse:
        return JSONResponse({"folder": str(hub.models_folder()),
                             "models": await asyncio.to_thread(hub.list_local_models, hub.models_folder(), home / "cache")})

    @app.get("/api/hub/search")
    async def hub_search(q: str = "") -> JSONResponse:
        return JSONResponse({"results": await asyncio.to_thread(hub.search_repos, q)})

    @app.get("/api/hub/files")
    async def hub_files(repo: str = "") -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(hub.repo_gguf_files, repo))

    @app.post("/api/hub/download")
    async def hub_download(request: Request) -> JSONResponse:
        body = await json_body(request)
        repo, file = text_field(body, "repo"), text_field(body, "file")
        listing = await asyncio.to_thread(hub.repo_gguf_files, repo)
        entry = next((f for f in listing["files"] if f["file"] == file), None)
        if entry is None:
            raise hub.HubError(f"{file!r} is not a GGUF file of {listing['repo']}; pick one from the list")
        job = downloads.start(listing["repo"], file, entry["size_bytes"], entry["sha256"], listing["revision"])
        return JSONResponse(job.public())

    @app.post("/api/hub/download/stop")
    async def hub_download_stop(request: Request) -> JSONResponse:
        body = await json_body(request)
        how = body.get("how", "cancel")
        if how not in ("cancel", "pause"):
            raise SecurityError(400, "how must be cancel or pause")
        downloads.stop(text_field(body, "id"), how)
        return JSONResponse({"ok": True})

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = await json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise SecurityError(400, "messages is missing; type a message first")
        base, key = node.api_target()
        upstream_body = {"model": "mesh", "messages": messages, "stream": True,
                         "max_tokens": int(body.get("max_tokens") or 512)}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            upstream = await client.send(client.build_request("POST", f"{base}/v1/chat/completions",
                                                              json=upstream_body, headers=headers), stream=True)
        except httpx.HTTPError as exc:
            return problem(503, f"the node's API at {base} does not answer ({type(exc).__name__}); start the node first")
        if upstream.status_code != 200:
            text = (await upstream.aread()).decode(errors="replace")
            await upstream.aclose()
            try:
                text = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            return problem(upstream.status_code, f"the node refused the chat: {text}")

        async def relay():
            record = {"started": time.time(), "tokens": 0, "tok_s": None, "stopped": False, "error": ""}
            chunk_times: list[float] = []
            buffer = b""
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.startswith(b"data: {") and b'"content"' in line:
                            chunk_times.append(time.monotonic())
                        elif b'"error"' in line:
                            record["error"] = line.decode(errors="replace")[:200]
            except (asyncio.CancelledError, GeneratorExit):
                record["stopped"] = True
                raise
            except httpx.HTTPError as exc:
                record["error"] = f"the stream broke: {type(exc).__name__}"
            finally:
                await upstream.aclose()  # closing our side makes llama-server stop generating
                record["tokens"], record["tok_s"] = len(chunk_times), tokens_per_second(chunk_times)
                chats.append(record)
                del chats[:-RECENT_CHATS]
                await live.bump()
        return StreamingResponse(relay(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app


def interface_names() -> tuple[str, ...]:
    """What other machines may call us when we listen on every interface: our addresses and host name."""
    import socket

    import psutil
    found = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    return tuple(sorted(found | {socket.gethostname()}))


def serve(home: Path, host: str, port: int, *, api_key: str | None, open_browser: bool) -> None:
    extra = interface_names() if host in ("0.0.0.0", "::") else ()
    policy = AccessPolicy(hosts=allowed_hosts(host, port, extra), api_key=api_key)
    app = build_app(home, policy)
    url = f"http://{'localhost' if host in ('127.0.0.1', 'localhost') else host}:{port}/"
    print(f"Console for MESH_HOME={home} at {url} — Ctrl-C stops it (the node keeps running).", flush=True)
    if open_browser:
        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
