"""The OpenAI-compatible HTTP API every node serves on :9337.

Requests go to whichever llama-server serves the mesh: the local one on the host, or the host's
through a tunnel. While there is none, a request waits (bounded by `wait_for_host`) and then gets
an OpenAI-style 503. Streams are passed through chunk by chunk; a stream whose path dies ends
with an error event instead of hanging.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger("gatewayd")
MAX_BODY_BYTES = 32 << 20
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "authorization", "accept-encoding"}


RETRY_HEADER = "x-mesh-retry"  # a mesh gateway's "nothing reached the model": the asking gateway may retry


def openai_error(status: int, message: str, kind: str, code: str | None = None, *, retry: bool = False) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status,
                        headers={RETRY_HEADER: "1"} if retry else None)


def embeddings_unsupported() -> JSONResponse:
    # llama-server answers 501 "start it with --embeddings"; runnerd does that by itself for an
    # embedding model, so what the user can change is the model.
    return openai_error(400, "the model this mesh serves is a generative model and does not produce embeddings; "
                             "start the nodes with an embedding GGUF (one that sets a pooling type) "
                             "to use /v1/embeddings", "invalid_request_error", "embeddings_not_supported")


class Upstream:
    """Where requests go now; `wait` blocks until there is somewhere or the deadline passes."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.label = ""
        self.key: str | None = None  # the local llama-server's own key (local_keys); none through a tunnel
        self._changed = asyncio.Event()

    def set(self, port: int | None, label: str, key: str | None = None) -> None:
        if (port, label, key) != (self.port, self.label, self.key):
            self.port, self.label, self.key = port, label, key
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait(self, deadline: float) -> int | None:
        while self.port is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return self.port

    async def changed(self, timeout: float) -> None:
        """Return when the upstream changes (a new host to try at once) or after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass


def build_app(upstream: Upstream, *, wait_for_host: float, api_key: str | None,
              status: Callable[[], dict] | None, metrics: Callable[[], str] | None, counters: dict[str, int]) -> FastAPI:
    """The API. Without `status`/`metrics` it is the mesh members' API (the OpenAI routes only), which HTTP
    tunnels end at; its refusals carry RETRY_HEADER, so the asking gateway retries them."""
    app = FastAPI(title="mesh-inference", docs_url=None, redoc_url=None)
    for_members = status is None
    client = httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=10.0),
                               limits=httpx.Limits(max_connections=512, max_keepalive_connections=64))

    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        # Every route: /mesh/status and /metrics describe the mesh too. Constant-time comparison.
        if expected is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                            expected):
            return openai_error(401, "missing or wrong API key; send `Authorization: Bearer <key>`",
                                "invalid_request_error", "invalid_api_key")
        return await call_next(request)

    async def forward(request: Request, path: str, body: bytes | None) -> Response:
        deadline = time.monotonic() + wait_for_host
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        while True:
            port = await upstream.wait(deadline)
            if port is None:
                counters["failed"] += 1
                return openai_error(503, f"no host is serving the model yet (waited {wait_for_host:g} s); "
                                         f"see `meshctl status`", "service_unavailable", "no_host", retry=for_members)
            sent = dict(headers)
            if upstream.key:
                sent["authorization"] = f"Bearer {upstream.key}"
            try:
                upstream_request = client.build_request(request.method, f"http://127.0.0.1:{port}{path}",
                                                        content=body, headers=sent, params=request.query_params)
                response = await client.send(upstream_request, stream=True)
                if response.headers.get(RETRY_HEADER) and time.monotonic() < deadline:
                    await response.aclose()  # the host's gateway had no llama-server: as good as no answer
                    raise httpx.ConnectError("the host's gateway has no model server right now")
                break
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectTimeout) as exc:
                # Nothing reached the model yet, so trying again is safe: the host may be restarting.
                log.info("upstream %s not answering (%s); retrying", upstream.label, type(exc).__name__)
                if time.monotonic() >= deadline:
                    counters["failed"] += 1
                    return openai_error(503, f"the host did not answer: {exc}", "service_unavailable", "host_unreachable",
                                        retry=for_members)
                await upstream.changed(0.5)
            except httpx.HTTPError as exc:
                counters["failed"] += 1
                return openai_error(502, f"the host failed: {type(exc).__name__}; try again", "server_error", "host_failed")
        passthrough = {k: v for k, v in response.headers.items() if k.lower() in ("content-type", "cache-control")}
        if "text/event-stream" in response.headers.get("content-type", ""):
            return StreamingResponse(relay_stream(response), status_code=response.status_code, headers=passthrough)
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:
            counters["failed"] += 1
            return openai_error(502, f"the host failed mid-response: {type(exc).__name__}; try again",
                                "server_error", "host_failed")
        finally:
            await response.aclose()
        counters["served"] += 1
        return Response(content, status_code=response.status_code, headers=passthrough)

    async def relay_stream(response: httpx.Response):
        try:
            async for chunk in response.aiter_raw():
                yield chunk
            counters["served"] += 1
        except httpx.HTTPError as exc:
            counters["failed"] += 1
            error = {"error": {"message": f"the host failed mid-stream ({type(exc).__name__}); try again",
                               "type": "server_error", "code": "host_failed"}}
            yield f"data: {json.dumps(error)}\n\n".encode()
        finally:
            await response.aclose()

    async def read_json_body(request: Request) -> bytes | Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return openai_error(413, f"request body is larger than {MAX_BODY_BYTES >> 20} MiB", "invalid_request_error")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return openai_error(413, f"request body is larger than {MAX_BODY_BYTES >> 20} MiB", "invalid_request_error")
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return openai_error(400, "request body is not valid JSON", "invalid_request_error", "invalid_json")
        if not isinstance(parsed, dict):
            return openai_error(400, "request body must be a JSON object", "invalid_request_error", "invalid_json")
        return bytes(body)

    def post_route(path: str) -> None:
        async def handler(request: Request) -> Response:
            body = await read_json_body(request)
            if isinstance(body, Response):
                return body
            response = await forward(request, path, body)
            if path == "/v1/embeddings" and response.status_code == 501:
                return embeddings_unsupported()
            return response
        app.post(path)(handler)

    for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        post_route(route)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forward(request, "/v1/models", None)

    @app.get("/health")
    async def health() -> Response:
        ok = upstream.port is not None
        return JSONResponse({"status": "ok" if ok else "no host", "upstream": upstream.label}, status_code=200 if ok else 503)

    if status is not None:
        @app.get("/mesh/status")
        async def mesh_status() -> Response:
            return JSONResponse(status())

    if metrics is not None:
        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.on_event("shutdown")
    async def close_client() -> None:
        await client.aclose()

    return app
