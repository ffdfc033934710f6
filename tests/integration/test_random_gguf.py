"""A random-weight GGUF loads in the real llama-server and generates tokens."""
from __future__ import annotations

import httpx
import pytest

from common.binaries import BinariesError, find_binaries
from tests.support.llama_procs import start_llama_server, wait_until_healthy
from tests.support.random_gguf import write_preset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bins():
    try:
        return find_binaries(None)
    except BinariesError as e:
        pytest.skip(str(e))


def test_tiny_random_gguf_loads_and_generates(bins, tmp_path):
    model = write_preset(tmp_path / "tiny.gguf", "tiny", seed=1)
    server = start_llama_server(bins, model, tmp_path, ctx_size=512)
    try:
        load_s = wait_until_healthy(server, timeout=60)
        response = httpx.post(f"{server.url}/completion", timeout=60, json={
            "prompt": "The quick brown fox", "n_predict": 8, "temperature": 0, "seed": 1,
            "ignore_eos": True, "cache_prompt": False,
        })
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens_predicted"] == 8
    assert body["timings"]["predicted_n"] == 8
    assert load_s < 30, f"a 27 MB model took {load_s:.1f}s to load"
