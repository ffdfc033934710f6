import pytest
from pydantic import ValidationError

from common.settings import Settings
from services.runnerd.speculation import (SPECULATE_FROM_RTT_MS, choose_speculation, draft_counts,
                                          speculation_args)


def test_auto_is_off_on_a_solo_node():
    choice = choose_speculation("auto", draft_model=None, remote_rtts_ms=[])
    assert choice.mode == "off" and "solo" in choice.reason


def test_auto_is_off_when_every_worker_is_close_and_on_when_one_is_far():
    near = choose_speculation("auto", draft_model=None, remote_rtts_ms=[0.1, SPECULATE_FROM_RTT_MS / 2])
    assert near.mode == "off"
    far = choose_speculation("auto", draft_model=None, remote_rtts_ms=[0.1, 20.0])
    assert far.mode == "ngram" and "20.0 ms" in far.reason  # the slowest worker decides: every pass waits for it


def test_auto_uses_the_draft_model_where_one_is_given():
    assert choose_speculation("auto", draft_model="/d.gguf", remote_rtts_ms=[20.0]).mode == "draft"
    assert choose_speculation("auto", draft_model="/d.gguf", remote_rtts_ms=[]).mode == "off"


def test_auto_speculates_while_a_workers_round_trip_is_unknown():
    assert choose_speculation("auto", draft_model=None, remote_rtts_ms=[0.1, None]).mode == "ngram"


def test_explicit_settings_win_over_the_measurement():
    assert choose_speculation("off", draft_model="/d.gguf", remote_rtts_ms=[50.0]).mode == "off"
    assert choose_speculation("ngram", draft_model=None, remote_rtts_ms=[]).mode == "ngram"
    assert choose_speculation("draft", draft_model="/d.gguf", remote_rtts_ms=[]).mode == "draft"


def test_flags_of_each_mode():
    assert speculation_args("off", draft_model=None, backend="cpu", device=None) == []
    cpu_ngram = speculation_args("ngram", draft_model=None, backend="cpu", device=None)
    assert cpu_ngram[:2] == ["--spec-type", "ngram-mod"]
    assert cpu_ngram[cpu_ngram.index("--spec-ngram-mod-n-max") + 1] == "16"  # short drafts: a CPU pays per drafted token
    assert speculation_args("ngram", draft_model=None, backend="cuda", device=None) == ["--spec-type", "ngram-mod"]
    cpu = speculation_args("draft", draft_model="/d.gguf", backend="cpu", device=None)
    # the draft stays on the host: without a device list llama.cpp would spread it over the RPC devices too
    assert cpu == ["--spec-type", "draft-simple", "--model-draft", "/d.gguf", "--spec-draft-device", "none"]
    gpu = speculation_args("draft", draft_model="/d.gguf", backend="cuda", device=None)
    assert gpu[gpu.index("--spec-draft-device") + 1] == "CUDA0" and gpu[-2:] == ["--spec-draft-ngl", "all"]


def test_settings_take_the_mode_and_reject_draft_without_a_model(monkeypatch, tmp_path):
    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    assert Settings().speculative == "auto"
    monkeypatch.setenv("MESH_SPECULATIVE", "ngram")
    assert Settings().speculative == "ngram"
    monkeypatch.setenv("MESH_SPECULATIVE", "sometimes")
    with pytest.raises(ValidationError, match="auto"):
        Settings()
    monkeypatch.setenv("MESH_SPECULATIVE", "draft")
    with pytest.raises(ValidationError, match="--draft-model"):
        Settings()
    monkeypatch.setenv("MESH_DRAFT_MODEL", "~/d.gguf")
    assert Settings().draft_model.is_absolute()


def test_acceptance_counts_from_prometheus_text():
    text = ("# HELP llamacpp:spec_decode_num_draft_tokens_total Speculative: Total draft tokens generated\n"
            "# TYPE llamacpp:spec_decode_num_draft_tokens_total counter\n"
            "llamacpp:spec_decode_num_draft_tokens_total 120\n"
            "llamacpp:spec_decode_num_accepted_tokens_total 90\n")
    assert draft_counts(text) == (120, 90)
    assert draft_counts("llamacpp:prompt_tokens_total 5\n") is None


def test_status_shows_the_mode_why_and_the_acceptance():
    from meshctl.cli import render_status
    from common.messages import RunnerState, SpeculationState
    runner = RunnerState(speculation=SpeculationState(setting="auto", mode="ngram", reason="auto: ngram (slowest worker 20.0 ms away)",
                                                      drafted_tokens=120, accepted_tokens=90, acceptance_rate=0.75))
    text = render_status({"meshd": {"node_id": "n"}, "electd": {}, "runnerd": runner.model_dump(), "gatewayd": {}})
    assert "speculative decoding: ngram — auto: ngram (slowest worker 20.0 ms away); drafts accepted 75% (90/120 tokens)" in text
    off = RunnerState(speculation=SpeculationState(setting="auto", mode="off", reason="auto: off on a solo node"))
    text = render_status({"meshd": {"node_id": "n"}, "electd": {}, "runnerd": off.model_dump(), "gatewayd": {}})
    assert "speculative decoding: off — auto: off on a solo node" in text
