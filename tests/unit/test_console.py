"""The console's pure parts: who may call it, download bookkeeping, model listing, the live view."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.messages import (Announcement, DecodeRate, Exclusion, GatewayState, MeshState, ModelInfo, PeerPath,
                             PeerView, Plan, PlanMember, RunnerState, TunnelStats)
from services.console.app import tokens_per_second
from services.console.downloads import RateMeter, disk_space_problem, download_paths, safe_file_name, verify_download
from services.console.live import mesh_view
from services.console.models import HubError, check_repo_id, list_local_models
from services.console.security import AccessPolicy, SecurityError, allowed_hosts, bind_check



@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """A real (tiny) GGUF: llama architecture, two layers' worth of metadata, one tensor."""
    import numpy as np
    from gguf import GGUFWriter
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_name("small test model")
    writer.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- security ------------------------------------------------------------------------------------

@pytest.fixture
def policy() -> AccessPolicy:
    return AccessPolicy(hosts=allowed_hosts("127.0.0.1", 3131))


@pytest.mark.parametrize("host", ["127.0.0.1:3131", "localhost:3131", "LOCALHOST:3131", "[::1]:3131"])
def test_own_host_names_pass(policy, host):
    policy.check_host(host)


@pytest.mark.parametrize("host", ["evil.example:3131", "127.0.0.1:3132", "127.0.0.1", "", None, "localhost.evil.example:3131"])
def test_foreign_host_is_refused_dns_rebinding(policy, host):
    with pytest.raises(SecurityError) as err:
        policy.check_host(host)
    assert err.value.status == 421


def test_non_loopback_bind_allows_only_its_address():
    hosts = allowed_hosts("192.0.2.7", 3131)
    assert hosts == {"192.0.2.7:3131"}
    AccessPolicy(hosts).check_host("192.0.2.7:3131")
    with pytest.raises(SecurityError):
        AccessPolicy(hosts).check_host("localhost:3131")


@pytest.mark.parametrize("origin,site", [("http://evil.example", None), ("http://127.0.0.1:8080", None), ("null", None),
                                         ("http://localhost:3131", "cross-site"), (None, "same-site")])
def test_cross_origin_posts_are_refused(policy, origin, site):
    with pytest.raises(SecurityError) as err:
        policy.check_origin("POST", origin, site)
    assert err.value.status == 403


@pytest.mark.parametrize("origin", ["http://127.0.0.1:3131", "http://localhost:3131", None])
def test_same_origin_posts_pass(policy, origin):
    policy.check_origin("POST", origin, "same-origin" if origin else None)


def test_reads_pass_but_the_token_read_is_checked(policy):
    policy.check_origin("GET", "http://evil.example", "cross-site")
    with pytest.raises(SecurityError):
        policy.check_origin("GET", "http://evil.example", "cross-site", sensitive=True)


def test_api_key():
    keyed = AccessPolicy(allowed_hosts("127.0.0.1", 1), api_key="s3cret")
    keyed.check_key("Bearer s3cret")
    for wrong in (None, "", "Bearer nope", "s3cre"):
        with pytest.raises(SecurityError) as err:
            keyed.check_key(wrong)
        assert err.value.status == 401
    AccessPolicy(allowed_hosts("127.0.0.1", 1)).check_key(None)


def test_off_loopback_needs_a_key():
    assert bind_check("127.0.0.1", None) is None
    assert bind_check("0.0.0.0", "k") is None
    assert "--api-key" in bind_check("0.0.0.0", None)


# --- downloads -----------------------------------------------------------------------------------

def test_download_paths_keep_partials_out_of_the_models_folder(tmp_path):
    partial, final = download_paths(tmp_path, "sub/dir/Model-Q4_K_M.gguf")
    assert final == tmp_path / "Model-Q4_K_M.gguf"
    assert partial.parent == tmp_path / ".downloads" and not partial.name.endswith(".gguf")


@pytest.mark.parametrize("name", ["README.md", "model.bin", ".gguf", "../x.txt", "dir/"])
def test_only_gguf_files_download(name):
    with pytest.raises(HubError, match="not a GGUF"):
        safe_file_name(name)


def test_disk_space_check():
    assert disk_space_problem(1 << 30, 10 << 30, Path("/m")) is None
    message = disk_space_problem(10 << 30, 1 << 30, Path("/m"))
    assert "not enough disk space" in message and "10.74 GB" in message


def test_rate_and_time_left():
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0], window_s=5)
    assert meter.rate() == 0 and meter.eta_s(0, 100) is None
    for second in range(11):
        now[0] = float(second)
        meter.add(second * 1_000_000)
    assert meter.rate() == pytest.approx(1_000_000)
    assert meter.eta_s(10_000_000, 30_000_000) == pytest.approx(20)
    assert meter.eta_s(10, None) is None


def test_verify_download(tmp_path, small_gguf):
    good = tmp_path / "good.partial"
    shutil.copy(small_gguf, good)
    import hashlib
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    assert verify_download(good, good.stat().st_size, sha) is None
    assert "bytes but the Hub says" in verify_download(good, 5, None)
    assert "sha256 does not match" in verify_download(good, None, "0" * 64)
    junk = tmp_path / "junk.partial"
    junk.write_bytes(b"<html>not found</html>")
    assert "not a GGUF" in verify_download(junk, None, None)


def test_repo_names():
    assert check_repo_id(" owner/name-GGUF ") == "owner/name-GGUF"
    assert check_repo_id("https://huggingface.co/owner/name") == "owner/name"
    for bad in ("owner", "a/b/c", "", "own er/x"):
        with pytest.raises(HubError, match="not a repo name"):
            check_repo_id(bad)


# --- local models --------------------------------------------------------------------------------

def test_local_listing_shows_size_and_architecture_and_skips_partials(tmp_path, small_gguf):
    shutil.copy(small_gguf, tmp_path / "small.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"nope")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".downloads").mkdir()
    (tmp_path / ".downloads" / "big.gguf.partial").write_bytes(b"GGUF")
    listed = {m["file"]: m for m in list_local_models(tmp_path, tmp_path / "cache")}
    assert set(listed) == {"broken.gguf", "small.gguf"}
    assert listed["small.gguf"]["arch"] == "llama" and listed["small.gguf"]["size_bytes"] == small_gguf.stat().st_size
    assert listed["small.gguf"]["n_layers"] == 2 and listed["small.gguf"]["error"] == ""
    assert "not a GGUF" in listed["broken.gguf"]["error"]
    assert list_local_models(tmp_path / "missing") == []


# --- live view -----------------------------------------------------------------------------------

def announcement(node_id: str, role="worker", fp="fp1", memory=4 << 30) -> Announcement:
    return Announcement(node_id=node_id, seq=1, role=role, version="t", memory_bytes=memory, model_name="m",
                        model_fingerprint=fp if role == "worker" else None)


def test_mesh_view_of_a_split_with_an_excluded_node_and_a_client():
    me, worker, other, client = "a" * 16, "b" * 16, "c" * 16, "d" * 16
    mesh = MeshState(node_id=me, mesh_id="m1", token="SECRET", me=announcement(me, memory=8 << 30),
                     peers=[PeerView(announcement=announcement(worker), connected=True, rtt_ms=1.5, status="connected"),
                            PeerView(announcement=announcement(other, fp="fp2"), connected=True, status="connected"),
                            PeerView(announcement=announcement(client, role="client"), connected=False, status="connecting")],
                     errors=["join: refused"])
    plan = Plan(state="split", host=me, members=[PlanMember(node_id=me, memory_bytes=8 << 30, ratio=0.667),
                                                 PlanMember(node_id=worker, memory_bytes=4 << 30, ratio=0.333)],
                excluded=[Exclusion(node_id=other, reason="holds a different model"),
                          Exclusion(node_id=client, reason="lite client")], reason="split over 2 nodes by memory")
    runner = RunnerState(node_id=me, memory_bytes=8 << 30, memory_source="--max-vram",
                         model=ModelInfo(path="/m.gguf", name="m", size_bytes=1, n_layers=2, arch="llama", fingerprint="fp1"),
                         progress="loading the model: 42%", decode=DecodeRate(tok_s=12.5, tokens=40, at=1.0))
    gateway = GatewayState(tunnels=[TunnelStats(node_id=worker, lane="tcp", bytes_in=10, bytes_out=20)])
    view = mesh_view(mesh, plan, runner, gateway, {"meshd": 0.1, "electd": 0.1, "runnerd": 0.2, "gatewayd": 9.0})
    nodes = {n["node_id"]: n for n in view["nodes"]}
    assert nodes[me]["role"] == "host" and nodes[me]["me"] and nodes[me]["memory_source"] == "--max-vram"
    assert nodes[worker]["role"] == "worker" and nodes[worker]["model_match"] is True
    assert nodes[worker]["lane"] == "tcp" and nodes[worker]["bytes_out"] == 20 and nodes[worker]["rtt_ms"] == 1.5
    assert "33%" in nodes[worker]["placement"]
    # a relayed peer: its path and relay, and the mesh connection's bytes added to the tunnels'
    relayed = mesh.model_copy(update={"peers": [PeerView(
        announcement=announcement(worker), connected=True, status="connected",
        path=PeerPath(path="relayed", via="203.0.113.5:3478", bytes_sent=100, bytes_received=7))]})
    with_rpc = runner.model_copy(update={"rpc_paths": {worker: "direct TLS 10.0.0.2:5000"}})
    row = mesh_view(relayed, plan, with_rpc, gateway, {})["nodes"][1]
    assert (row["path"], row["relay"], row["rpc_path"]) == ("relayed", "203.0.113.5:3478", "direct TLS 10.0.0.2:5000")
    assert (row["bytes_in"], row["bytes_out"]) == (17, 120)
    assert nodes[other]["model_match"] is False and "different model" in nodes[other]["placement"]
    assert nodes[client]["role"] == "lite client" and nodes[client]["model_match"] is None
    assert [m["ratio"] for m in view["plan"]["split"]] == [0.667, 0.333]
    assert "meshd: join: refused" in view["errors"]
    assert any(e.startswith("gatewayd: not heard from") for e in view["errors"])
    assert view["services"] == {"meshd": True, "electd": True, "runnerd": True, "gatewayd": False}
    assert view["runner"]["progress"] == "loading the model: 42%"  # the live view's load progress
    assert view["runner"]["decode"] == {"tok_s": 12.5, "tokens": 40, "at": 1.0}  # tok/s of every sender's requests
    assert "SECRET" not in str(view)


def test_mesh_view_while_waiting_and_before_anything_is_heard():
    plan = Plan(state="waiting", needed_bytes=11 << 30, available_bytes=4 << 30)
    view = mesh_view(None, plan, None, None, {s: None for s in ("meshd", "electd", "runnerd", "gatewayd")})
    assert view["plan"]["state"] == "waiting" and view["plan"]["needed_bytes"] == 11 << 30
    assert view["nodes"] == [] and view["errors"] == []


def test_tokens_per_second():
    assert tokens_per_second([]) is None and tokens_per_second([1.0, 2.0]) is None
    assert tokens_per_second([0.0, 0.5, 1.0, 1.5, 2.0]) == pytest.approx(2.0)


# --- node restarts ---------------------------------------------------------------------------------

def test_a_restart_keeps_the_running_nodes_settings_but_not_its_startup_join(tmp_path, monkeypatch):
    from services.console.node import settings_for
    monkeypatch.setenv("MESH_PORT", "1111")  # the console's own environment must not leak into the node's
    running = {"MESH_HOME": str(tmp_path), "MESH_PORT": "4242", "MESH_MAX_VRAM": "8589934592B", "MESH_SPLIT": "1",
               "MESH_JOIN": "eyJ-old-token", "MESH_MODEL": "/models/old.gguf"}
    settings = settings_for(tmp_path, running, model="/models/new.gguf", client=None)
    assert settings.port == 4242 and settings.max_vram == 8 << 30 and settings.split
    assert settings.model == Path("/models/new.gguf") and settings.join == [] and not settings.client
    assert settings_for(tmp_path, running, model=None, client=True).client
    import os
    assert os.environ["MESH_PORT"] == "1111" and "MESH_JOIN" not in os.environ
    fresh = settings_for(tmp_path, None, model=None, client=None)  # no node yet: env and config file
    assert fresh.port == 1111 and fresh.home == tmp_path
