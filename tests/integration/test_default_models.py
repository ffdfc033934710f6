"""The registry models as runnerd serves them: each chat gets the model's own turn format.

SmolLM2 (the default) brings its chat template; Gemma 3 270M's registry GGUF has none, so runnerd
passes ours (services/runnerd/templates/gemma.jinja) — without it llama.cpp would fall back to chatml.
"""
from __future__ import annotations

import httpx
import pytest

from common.binaries import BinariesError, find_binaries
from common.default_model import ensure_model
from common.gguf_info import inspect_gguf, read_gguf_header
from common.messages import Plan, PlanMember
from services.runnerd.commands import llama_server_args
from tests.support.procs import kill_process_tree, popen_in_own_session, free_port
from tests.support.llama_procs import ServerProcess, wait_until_healthy

pytestmark = pytest.mark.slow
SOLO = Plan(state="solo", host="me", members=[PlanMember(node_id="me", memory_bytes=1, ratio=1.0)])


@pytest.fixture(scope="module")
def bins():
    try:
        return find_binaries(None)
    except BinariesError as e:
        pytest.skip(str(e))


def prompt_as_served(bins, key: str, tmp_path) -> str:
    model = inspect_gguf(ensure_model(key))
    port = free_port()
    args = llama_server_args(bins, port, model, SOLO, "me", {}, backend="cpu", ctx_size=512, threads=2)
    server = ServerProcess(key, popen_in_own_session(args, log_path=tmp_path / f"{key}.log"), "127.0.0.1", port,
                           tmp_path / f"{key}.log")
    try:
        wait_until_healthy(server, timeout=120)
        r = httpx.post(f"{server.url}/apply-template", timeout=30,
                       json={"messages": [{"role": "user", "content": "Hello!"}]})
        r.raise_for_status()
        return r.json()["prompt"]
    finally:
        kill_process_tree(server.proc)


def test_gemma_chats_in_its_turn_format(bins, tmp_path):
    prompt = prompt_as_served(bins, "gemma", tmp_path)
    assert "<start_of_turn>user\nHello!<end_of_turn>" in prompt and "<|im_start|>" not in prompt


def test_the_default_model_chats_in_its_own_template(bins, tmp_path):
    prompt = prompt_as_served(bins, "smollm2", tmp_path)
    assert "<|im_start|>user\nHello!<|im_end|>" in prompt


def test_the_default_models_shape():
    """What runnerd's split relies on: a llama model with layers to split, whose output matrix is the
    token embedding (tied), which the CPU-host override (token_embd) keeps on the host."""
    path = ensure_model("smollm2")
    info = inspect_gguf(path)
    assert (info.arch, info.n_layers, info.has_chat_template, info.embeddings) == ("llama", 30, True, False)
    with open(path, "rb") as f:
        tensors = read_gguf_header(f).tensors
    assert "token_embd.weight" in tensors and "output.weight" not in tensors
