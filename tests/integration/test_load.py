"""64 concurrent streaming requests through a lite client's :9337 and 64 through the host's, together."""
from __future__ import annotations

import asyncio
import json

import httpx
import psutil
import pytest

from tests.integration.harness import Node

pytestmark = pytest.mark.slow
PER_NODE = 64


async def stream_one(client: httpx.AsyncClient, base: str, i: int) -> str:
    body = {"model": "any", "messages": [{"role": "user", "content": f"Say the number {i}."}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    text, done = "", False
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
    assert done, f"stream {i} ended without [DONE]"
    return text


async def flood(bases: list[str]) -> list:
    limits = httpx.Limits(max_connections=PER_NODE * len(bases))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        jobs = [stream_one(client, base, i) for base in bases for i in range(PER_NODE)]
        return await asyncio.gather(*jobs, return_exceptions=True)


def test_128_concurrent_streams_complete(tmp_path):
    host = Node(tmp_path / "host", extra=["--bind-host", "127.0.0.1"])
    lite = Node(tmp_path / "lite", extra=["--client", "--bind-host", "127.0.0.1"])
    try:
        host.start()
        lite.start("--join", host.token())
        host.wait_serving()
        lite.wait_serving()
        gateways = [psutil.Process(n.service_pid("gatewayd")) for n in (host, lite)]
        before = [g.memory_info().rss for g in gateways]
        results = asyncio.run(flood([host.api, lite.api]))
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, f"{len(failures)} of {len(results)} failed, e.g. {failures[0]!r}"
        assert all(r for r in results)
        after = [g.memory_info().rss for g in gateways]
        print("gatewayd RSS MB before/after:", [(b >> 20, a >> 20) for b, a in zip(before, after)])
        assert all(a - b < 150 << 20 for b, a in zip(before, after)), "gatewayd memory grew by more than 150 MB"
        served = lite.status()["gatewayd"]["requests_served"]
        assert served >= PER_NODE
    finally:
        for n in (lite, host):
            n.stop()
