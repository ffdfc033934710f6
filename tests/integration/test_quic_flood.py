"""A bounded flood of QUIC handshakes from a stranger at a node's mesh port, while a member joins.

Strangers complete the TLS handshake (anyone can) and then never answer the admission challenge, so
each holds one of the endpoint's MAX_UNAUTHENTICATED slots (common/quic/limits.py) until it is closed. The
cap bounds what they cost, and a member's join still gets through (here: the slots are full when it
dials, and free again within seconds). Not covered yet: address validation (QUIC Retry) and a
per-source cap, so a stranger that keeps every slot filled can delay joins by up to the
authentication timeout per wave.
"""
from __future__ import annotations

import asyncio
import ssl
import time

import pytest
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

from common.quic.limits import MAX_UNAUTHENTICATED
from services.meshd.main import ALPN
from tests.integration.harness import Node, meshctl
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow


def test_a_member_joins_during_a_flood_of_stranger_handshakes(tmp_path):
    a = Node(tmp_path / "a", extra=["--client", "--bind-host", "127.0.0.1"]).start()
    b = Node(tmp_path / "b", extra=["--client", "--bind-host", "127.0.0.1"]).start()
    try:
        token = a.token()
        b.node_id()
        host, port = a.status()["meshd"]["listen"][0]
        flood = MAX_UNAUTHENTICATED + 44
        joined: dict = {}
        held: list = []

        async def stranger(hold: float) -> None:
            config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], verify_mode=ssl.CERT_NONE)
            try:
                async with connect(host, port, configuration=config, wait_connected=True) as client:
                    held.append(client)
                    await asyncio.sleep(hold)  # says nothing: holds a slot until admission times out
            except (ConnectionError, OSError, asyncio.TimeoutError):
                pass

        async def main() -> None:
            strangers = [asyncio.ensure_future(stranger(12.0)) for _ in range(flood)]
            await asyncio.to_thread(wait_until, lambda: len(held) >= MAX_UNAUTHENTICATED, timeout=30,
                                    what="the stranger handshakes filling the cap")
            started = time.monotonic()
            joined["held"] = len(held)
            joined["open"] = sum(1 for c in held if not c._closed.is_set())
            out = await asyncio.to_thread(meshctl, "join", token, home=b.home, timeout=60)
            joined.update(rc=out.returncode, err=out.stderr.strip(), s=time.monotonic() - started)
            for task in strangers:
                task.cancel()
            await asyncio.gather(*strangers, return_exceptions=True)
        asyncio.run(main())
        print(f"join during a flood of {flood} handshakes: {joined}")
        assert joined["held"] >= MAX_UNAUTHENTICATED and joined["rc"] == 0, joined
        wait_until(lambda: a.status()["meshd"]["node_id"], timeout=30, what="A still answering")
    finally:
        b.stop()
        a.stop()
