"""Console downloads against the local Hub stand-in, through huggingface_hub: verify, resume, cancel,
refuse what is not a model, honour HF_TOKEN, explain an unreachable Hub; and how fast it goes."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.default_model import default_model_path
from tests.support.hub_standin import HubFile, HubRepo, HubStandIn
from tests.support.procs import free_port, wait_until

GATED_TOKEN = "hf_standin_gated_token"


@pytest.fixture
def hub(tmp_path, monkeypatch, small_model):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"<html>this is an error page, not a model</html>" * 100)
    repos = [HubRepo("test/tiny-GGUF", {"tiny.gguf": HubFile("tiny.gguf", small_model, throttle_bps=4e6),
                                        "broken.gguf": HubFile("broken.gguf", junk),
                                        "huge.gguf": HubFile("huge.gguf", None, claimed_size=50 << 40)}),
             HubRepo("test/gated-GGUF", {"g.gguf": HubFile("g.gguf", small_model)}, gated_token=GATED_TOKEN)]
    if default_model_path().exists():
        repos.append(HubRepo("test/gemma-GGUF", {"gemma.gguf": HubFile("gemma.gguf", default_model_path())}))
    standin = HubStandIn(repos).start()
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from tests.support.random_gguf import write_preset
    return write_preset(tmp_path_factory.mktemp("model") / "tiny.gguf", "tiny", seed=3)


def manager(folder: Path):
    from services.console.downloads import DownloadManager
    folder.mkdir(parents=True, exist_ok=True)
    return DownloadManager(folder)


def start(m, repo: str, file: str):
    from services.console import models as hub
    listing = hub.repo_gguf_files(repo)
    entry = next(f for f in listing["files"] if f["file"] == file)
    return m.start(repo, file, entry["size_bytes"], entry["sha256"], listing["revision"])


def finished(m, job_id: str, timeout: float = 60) -> dict:
    return wait_until(lambda: next((d for d in m.snapshot() if d["id"] == job_id and
                                    d["state"] in ("done", "failed", "cancelled", "paused")), None),
                      timeout=timeout, interval=0.05, what=f"{job_id} to finish")


def looks_like_models(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".gguf")


def test_download_verifies_and_lands_as_a_model(hub, tmp_path, small_model):
    m = manager(tmp_path / "models")
    job = start(m, "test/tiny-GGUF", "tiny.gguf")
    seen_progress = wait_until(lambda: next(d for d in m.snapshot() if d["id"] == job.id)["done_bytes"] > 0 and
                               looks_like_models(tmp_path / "models") == [], timeout=30, what="progress, no model yet")
    assert seen_progress
    done = finished(m, job.id)
    assert done["state"] == "done", done
    assert Path(done["path"]).read_bytes() == small_model.read_bytes()
    assert looks_like_models(tmp_path / "models") == ["tiny.gguf"]
    assert not list((tmp_path / "models" / ".downloads").iterdir())


def test_pause_then_resume_continues_from_the_partial_file(hub, tmp_path, small_model):
    m = manager(tmp_path / "models")
    job = start(m, "test/tiny-GGUF", "tiny.gguf")
    wait_until(lambda: m.snapshot()[0]["done_bytes"] > 2_000_000, timeout=30, what="2 MB downloaded")
    m.stop(job.id, "pause")
    paused = finished(m, job.id)
    assert paused["state"] == "paused"
    partial = tmp_path / "models" / ".downloads" / "tiny.gguf.partial"
    kept = partial.stat().st_size
    assert 0 < kept < small_model.stat().st_size and looks_like_models(tmp_path / "models") == []
    hub.requests.clear()
    job = start(m, "test/tiny-GGUF", "tiny.gguf")
    done = finished(m, job.id)
    assert done["state"] == "done" and done["resumed_from"] == kept, done
    assert Path(done["path"]).read_bytes() == small_model.read_bytes()  # and its sha256 matched the Hub's


def test_cancel_leaves_nothing(hub, tmp_path):
    m = manager(tmp_path / "models")
    job = start(m, "test/tiny-GGUF", "tiny.gguf")
    wait_until(lambda: m.snapshot()[0]["done_bytes"] > 1_000_000, timeout=30, what="1 MB downloaded")
    m.stop(job.id, "cancel")
    assert finished(m, job.id)["state"] == "cancelled"
    assert looks_like_models(tmp_path / "models") == []
    assert not list((tmp_path / "models" / ".downloads").iterdir())


def test_not_a_gguf_and_no_disk_space_are_refused(hub, tmp_path):
    m = manager(tmp_path / "models")
    broken = finished(m, start(m, "test/tiny-GGUF", "broken.gguf").id)
    assert broken["state"] == "failed" and "not a GGUF model" in broken["error"]
    huge = finished(m, start(m, "test/tiny-GGUF", "huge.gguf").id)
    assert huge["state"] == "failed" and "not enough disk space" in huge["error"]
    assert not any("huge.gguf" in r for r in hub.requests if "/resolve/" in r), "bytes moved before the disk check"
    assert looks_like_models(tmp_path / "models") == []
    assert not list((tmp_path / "models" / ".downloads").iterdir())


def test_gated_repo_needs_hf_token(hub, monkeypatch):
    from services.console import models as hubapi
    with pytest.raises(hubapi.HubError, match="gated"):
        hubapi.repo_gguf_files("test/gated-GGUF")
    monkeypatch.setenv("HF_TOKEN", GATED_TOKEN)
    assert [f["file"] for f in hubapi.repo_gguf_files("test/gated-GGUF")["files"]] == ["g.gguf"]


def test_unreachable_hub_is_one_clear_line(monkeypatch):
    from services.console import models as hubapi
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(hubapi.HubError, match="cannot reach the Hub") as err:
        hubapi.search_repos("gemma")
    assert "\n" not in str(err.value) and time.monotonic() - started < 30


def test_download_speed_from_the_local_standin(hub, tmp_path):
    if not default_model_path().exists():
        pytest.skip("the default model is not on this machine")
    m = manager(tmp_path / "models")
    started = time.monotonic()
    done = finished(m, start(m, "test/gemma-GGUF", "gemma.gguf").id, timeout=300)
    elapsed = time.monotonic() - started
    assert done["state"] == "done", done
    size = Path(done["path"]).stat().st_size
    print(f"downloaded {size / 1e6:.0f} MB from the local Hub stand-in in {elapsed:.1f} s "
          f"= {size / 1e6 / elapsed:.0f} MB/s (sha256 and GGUF checks included)")
