"""/v1/embeddings on a node serving an embedding model: runnerd starts llama-server with --embeddings."""
from __future__ import annotations

import httpx
import pytest

from tests.integration.harness import Node
from tests.support.random_gguf import write_random_gguf

pytestmark = pytest.mark.slow
N_EMBD = 256


def test_an_embedding_model_answers_embeddings(tmp_path):
    model = write_random_gguf(tmp_path / "embedder.gguf", n_layer=2, n_embd=N_EMBD, n_ff=512, n_head=4, n_head_kv=4,
                              pooling_type=1)  # mean pooling: an embedding model to llama.cpp
    node = Node(tmp_path / "home", extra=["--model", str(model), "--ctx-size", "512"]).start()
    try:
        node.wait_serving(timeout=300)
        r = httpx.post(f"{node.api}/v1/embeddings", json={"input": ["hello", "mesh"], "model": "any"}, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 2 and all(len(d["embedding"]) == N_EMBD for d in data)
        assert data[0]["embedding"] != data[1]["embedding"]
    finally:
        node.stop()
