"""Speculative decoding on the host: whether to use it, and llama-server's flags for it.

A split pays round trips to its workers for every forward pass of the model. Speculation
verifies several drafted tokens in one pass, so on a split it turns one pass per token into one
pass per accepted run of tokens: the round trips are shared. It costs extra compute (the drafted
tokens that are rejected), which is a loss where there is no round trip to hide: a solo node, or
a split whose workers are a fraction of a millisecond away. `choose_speculation` is the policy
(`--speculative auto`), a pure function of the plan and the measured round trips; the figures it
rests on are in the README ("Speculative decoding") and come from `python -m bench.bench_product`.

`ngram` drafts from the text already in the context (llama.cpp's `ngram-mod`: no second model):
it wins where the answer repeats its input, as an agent's edit of a file does. `draft` runs a
small model with the same vocabulary on the host's own device (`--draft-model`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["off", "ngram", "draft"]
Setting = Literal["auto", "off", "ngram", "draft"]

# `auto` speculates on a split whose slowest worker is at least this far away (round trip, ms).
# Measured (README, "Speculative decoding"): on loopback (~0.1 ms) free text lost up to ~10 % with
# speculation and edits gained little; from 5 ms on, free text broke even or won and edits won 1.5-3x.
SPECULATE_FROM_RTT_MS = 2.0


@dataclass(frozen=True)
class SpeculationChoice:
    mode: Mode
    reason: str


def choose_speculation(setting: Setting, *, draft_model: str | None, remote_rtts_ms: list[float | None]) -> SpeculationChoice:
    """The speculation mode for a llama-server whose remote split members are `remote_rtts_ms` away
    (one entry per worker; None = not measured yet; empty = solo)."""
    if setting == "off":
        return SpeculationChoice("off", "off (--speculative off)")
    if setting == "ngram":
        return SpeculationChoice("ngram", "ngram (--speculative ngram)")
    if setting == "draft":
        if not draft_model:
            return SpeculationChoice("off", "off: --speculative draft needs --draft-model PATH")
        return SpeculationChoice("draft", "draft model (--speculative draft)")
    on: Mode = "draft" if draft_model else "ngram"
    if not remote_rtts_ms:
        return SpeculationChoice("off", "auto: off on a solo node (no round trips to hide; measured a loss)")
    measured = [r for r in remote_rtts_ms if r is not None]
    if len(measured) < len(remote_rtts_ms):
        # A worker the mesh has not timed yet is reached over a network as far as we know.
        return SpeculationChoice(on, f"auto: {on} (round trip to a worker not measured yet)")
    slowest = max(measured)
    if slowest < SPECULATE_FROM_RTT_MS:
        return SpeculationChoice("off", f"auto: off (workers {slowest:.1f} ms away, under {SPECULATE_FROM_RTT_MS:g} ms: "
                                        "no round trip worth hiding)")
    return SpeculationChoice(on, f"auto: {on} (slowest worker {slowest:.1f} ms away)")


# On a CPU, verifying a draft costs in proportion to its length, so a wrong long draft is a loss:
# ngram-mod's own 48-64 token drafts on SmolLM2's edit (29 % accepted) ran 0.87x stock at 20 ms,
# 4-16 token drafts from a 12-token match 1.71x (54 % accepted). A GPU verifies 64 tokens in about
# the time of one, so there llama.cpp's defaults stay.
CPU_NGRAM = ["--spec-ngram-mod-n-min", "4", "--spec-ngram-mod-n-max", "16", "--spec-ngram-mod-n-match", "12"]


def speculation_args(mode: Mode, *, draft_model: str | None, backend: str, device: str | None) -> list[str]:
    """llama-server flags for `mode` (this llama.cpp: `--spec-type`, `--model-draft`)."""
    if mode == "ngram":
        return ["--spec-type", "ngram-mod", *(CPU_NGRAM if backend == "cpu" else [])]
    if mode == "draft":
        # The draft runs on the host's own device: by default llama.cpp would spread it over every
        # device, the RPC ones too, and pay the round trips it is meant to save.
        own = "none" if backend == "cpu" else (device or _first_device(backend))
        args = ["--spec-type", "draft-simple", "--model-draft", str(draft_model), "--spec-draft-device", own]
        if backend != "cpu":
            args += ["--spec-draft-ngl", "all"]
        return args
    return []


def _first_device(backend: str) -> str:
    return {"cuda": "CUDA0", "metal": "MTL0"}.get(backend, "none")


METRIC = re.compile(r"^llamacpp:(spec_decode_num_draft_tokens_total|spec_decode_num_accepted_tokens_total)\s+(\S+)",
                    re.MULTILINE)


def draft_counts(metrics_text: str) -> tuple[int, int] | None:
    """(drafted, accepted) tokens from llama-server's Prometheus /metrics; None if it reports neither."""
    found = {name: float(value) for name, value in METRIC.findall(metrics_text)}
    if not found:
        return None
    return (int(found.get("spec_decode_num_draft_tokens_total", 0)),
            int(found.get("spec_decode_num_accepted_tokens_total", 0)))
