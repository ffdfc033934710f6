import re
from pathlib import Path

import pytest

from common.binaries import Binaries, Device, devices_from_listing
from common.gguf_info import ModelError, inspect_gguf
from common.messages import ModelInfo, Plan, PlanMember
from services.runnerd.commands import NotReady, layer_split, llama_server_args, tensor_split
from services.runnerd.memory import GB, detect_memory
from tests.support.random_gguf import write_preset


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_preset(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny", seed=1)


def test_inspect_reads_shape_and_fingerprints_content(tiny_gguf, tmp_path):
    info = inspect_gguf(tiny_gguf, tmp_path)
    assert info.arch == "llama" and info.n_layers > 0 and info.size_bytes == tiny_gguf.stat().st_size
    same = inspect_gguf(tiny_gguf, tmp_path)  # from the cache
    assert same == info
    other = write_preset(tmp_path / "other.gguf", "tiny", seed=2)  # same shape, other weights
    assert inspect_gguf(other).fingerprint != info.fingerprint


def test_bad_model_files_give_one_clear_reason(tiny_gguf, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        inspect_gguf(tmp_path / "missing.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF"):
        inspect_gguf(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelError, match="cut off"):
        inspect_gguf(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(tiny_gguf.read_bytes()[:64])
    with pytest.raises(ModelError):
        inspect_gguf(header_only)


BINS = Binaries(Path("/b/ggml-rpc-server"), Path("/b/llama-server"), True, has_fit=True)
MODEL = ModelInfo(path="/m.gguf", name="m", size_bytes=1, n_layers=18, arch="gemma3", fingerprint="f")


def plan(*members: tuple[str, float]) -> Plan:
    return Plan(state="split" if len(members) > 1 else "solo", host=members[0][0],
                members=[PlanMember(node_id=n, memory_bytes=1, ratio=r) for n, r in members])


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_solo_host_offloads_everything_locally_on_loopback():
    args = llama_server_args(BINS, 8080, MODEL, plan(("me", 1.0)), "me", {}, backend="cpu", ctx_size=4096, threads=None)
    assert flag(args, "--host") == "127.0.0.1" and flag(args, "--rpc") is None and flag(args, "--n-gpu-layers") == "999"
    assert flag(args, "--fit") == "off"  # it could change nothing we set, and costs a second vocabulary read
    assert flag(args, "-lv") == "4"  # the load report, device by device, that runnerd reads
    older = Binaries(BINS.rpc_server, BINS.llama_server, True, has_fit=False)
    assert "--fit" not in llama_server_args(older, 8080, MODEL, plan(("me", 1.0)), "me", {}, backend="cpu",
                                            ctx_size=4096, threads=None)  # a flag it lacks would stop it


def test_cpu_host_keeps_its_share_as_layers_and_splits_the_rest_over_tunnels():
    p = plan(("me", 0.5), ("w1", 0.25), ("w2", 0.25))
    args = llama_server_args(BINS, 8080, MODEL, p, "me", {"w1": "127.0.0.1:5001", "w2": "127.0.0.1:5002"}, backend="cpu", ctx_size=4096, threads=2)
    assert flag(args, "--rpc") == "127.0.0.1:5001,127.0.0.1:5002"
    # 10 of 18 with the output layer, which llama.cpp counts too: 9 layers stay here; of the 9 offloaded
    # 5 and 4 (the largest remainder), in slots of llama.cpp's split, the output layer's slot last
    assert flag(args, "--n-gpu-layers") == "10" and flag(args, "--tensor-split") == "4.5,5.5"
    # the output matrix (or the embedding tied to it) stays on the host, and only it: llama.cpp searches
    # these patterns, so an unanchored `output\.weight` would also pull every layer's attn_output here
    patterns = [p.split("=")[0] for p in flag(args, "--override-tensor").split(",")]
    names = ["output.weight", "token_embd.weight", "blk.3.attn_output.weight", "output_norm.weight"]
    assert [n for n in names if any(re.search(p, n) for p in patterns)] == ["output.weight", "token_embd.weight"]


def test_gpu_host_lists_the_rpc_devices_before_its_own():
    # this llama.cpp puts RPC devices at the front of the model's device list (src/llama.cpp), so
    # --tensor-split's first ratio is the first worker's; the integration test reads where the layers went
    p = plan(("me", 0.6), ("w1", 0.4))
    args = llama_server_args(BINS, 8080, MODEL, p, "me", {"w1": "127.0.0.1:5001"}, backend="cuda", ctx_size=4096, threads=None)
    assert flag(args, "--tensor-split") == "6.5,12.5" and flag(args, "--n-gpu-layers") == "999"  # 7 and 11 of 18


def test_several_gpus_on_host_and_worker_each_get_their_memory_share():
    p = Plan(state="split", host="me", members=[
        PlanMember(node_id="me", memory_bytes=300, ratio=0.6, devices=[200, 100]),
        PlanMember(node_id="w1", memory_bytes=100, ratio=0.2),  # one device: no list needed
        PlanMember(node_id="w2", memory_bytes=100, ratio=0.2, devices=[50, 50])])
    # RPC devices in --rpc order, each server's devices in its order; then the host's GPUs,
    # with 0 for one --device leaves out (llama-server still sees it)
    assert [round(r, 3) for r in tensor_split(p, "me", [200, 0, 100])] == [0.2, 0.1, 0.1, 0.4, 0.0, 0.2]
    args = llama_server_args(BINS, 8080, MODEL, p, "me", {"w1": "127.0.0.1:5001", "w2": "127.0.0.1:5002"}, backend="cuda", ctx_size=4096,
                             threads=None, local_weights=[200, 100])
    assert flag(args, "--rpc") == "127.0.0.1:5001,127.0.0.1:5002"
    assert flag(args, "--tensor-split") == "3.5,2,2,7,4.5"  # 4, 2, 2, 7 and 3 of the 18 layers
    # a CPU host keeps its share as layers; the workers' devices split the rest
    assert [round(r, 3) for r in tensor_split(p, "me", [])] == [0.5, 0.25, 0.25]


def test_layer_split_gives_each_device_exactly_its_layers_in_llama_cpps_rule():
    from tests.support.device_order import layer_devices
    for shares, layers in [([0.666, 0.334], 15), ([0.5, 0.5], 32), ([0.2, 0.1, 0.1, 0.4, 0.2], 32), ([0.0, 1.0], 10),
                           ([0.3, 0.0, 0.7], 7), ([1.0], 5)]:
        splits = [float(x) for x in layer_split(shares, layers).split(",")]
        placed = layer_devices(layers, layers + 1, splits)
        counts = [placed[:layers].count(i) for i in range(len(shares))]
        assert sum(counts) == layers and all(abs(c - s * layers) < 1 for c, s in zip(counts, shares)), (shares, counts)
        assert placed[layers] == len(shares) - 1  # the output layer's slot: the last device (the host's GPU)


def test_memory_offered_per_device_follows_llama_cpps_list_and_device():
    gpus = (Device("CUDA0", 80 * GB, 79 * GB), Device("CUDA1", 40 * GB, 40 * GB))
    every = detect_memory(None, None, gpus)
    assert every.devices == [80 * GB, 40 * GB] and every.local_weights == every.devices and "CUDA1 40.0 GB" in every.source
    one = detect_memory(None, "CUDA1", gpus)
    assert one.devices == [40 * GB] and one.local_weights == [0, 40 * GB] and one.total == 40 * GB
    capped = detect_memory(12 * GB, None, gpus)
    assert capped.devices == [8 * GB, 4 * GB] and "override" in capped.source
    cpu = detect_memory(None, None, (), ram_bytes=10 * GB)
    assert cpu.devices == [8 * GB] and cpu.local_weights == [] and "RAM" in cpu.source
    assert detect_memory(3 * GB, None, ()).devices == [3 * GB]


def test_device_listing_parses_into_names_and_sizes():
    listing = ("Available devices:\n  CUDA0: NVIDIA H200 (143771 MiB, 143180 MiB free)\n"
               "  CUDA1: NVIDIA H200 (143771 MiB, 100 MiB free)\n")
    assert devices_from_listing(listing) == (Device("CUDA0", 143771 << 20, 143180 << 20),
                                             Device("CUDA1", 143771 << 20, 100 << 20))
    assert devices_from_listing("Available devices:\n  (none)\n") == ()


def test_gemma_without_a_template_gets_ours():
    bare = MODEL.model_copy(update={"has_chat_template": False})
    args = llama_server_args(BINS, 8080, bare, plan(("me", 1.0)), "me", {}, backend="cpu", ctx_size=4096, threads=None)
    template = Path(flag(args, "--chat-template-file"))
    assert template.is_file() and "<start_of_turn>" in template.read_text()
    assert "--chat-template-file" not in llama_server_args(BINS, 8080, MODEL, plan(("me", 1.0)), "me", {},
                                                           backend="cpu", ctx_size=4096, threads=None)


def test_missing_tunnel_means_not_ready():
    with pytest.raises(NotReady, match="w1"):
        llama_server_args(BINS, 8080, MODEL, plan(("me", 0.5), ("w1", 0.5)), "me", {}, backend="cpu", ctx_size=4096,
                          threads=None)


def test_weight_loads_sum_the_patch_summaries_per_worker():
    from services.runnerd.llama_log import weight_loads
    log_text = ("0.01 W rpc-gguf: summary hits=60 misses=0 hit_bytes=1000 miss_bytes=0 endpoint=127.0.0.1:4001\n"
                "0.02 W rpc-gguf: summary hits=5 misses=2 hit_bytes=100 miss_bytes=50 endpoint=127.0.0.1:4001\n"
                "0.03 W rpc-gguf: summary hits=1 misses=0 hit_bytes=7 miss_bytes=0 endpoint=127.0.0.1:4999\n"
                "0.04 W rpc-gguf: summary hits=3 misses=0 hit_bytes=9 miss_bytes=0 endpoint=c0ffee@10.0.0.2:5000\n")
    loads = {w.node_id: w for w in weight_loads(log_text, {"worker-b": "127.0.0.1:4001",
                                                           "worker-c": "c0ffee@10.0.0.2:5000"})}
    assert loads["worker-c"].local_bytes == 9  # a direct TLS endpoint, pinned to its node id
    assert (loads["worker-b"].local_bytes, loads["worker-b"].sent_bytes, loads["worker-b"].misses) == (1100, 50, 2)
    assert loads["127.0.0.1:4999"].local_bytes == 7  # no forward known for it: named by its endpoint


def test_an_embedding_model_is_served_with_embeddings_and_a_chat_model_is_not(tmp_path):
    from tests.support.random_gguf import write_random_gguf
    shape = dict(n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=2)
    embedder = inspect_gguf(write_random_gguf(tmp_path / "e.gguf", **shape, pooling_type=1))
    chat = inspect_gguf(write_random_gguf(tmp_path / "c.gguf", **shape))
    assert embedder.embeddings and not chat.embeddings
    solo = plan(("me", 1.0))
    assert "--embeddings" in llama_server_args(BINS, 8080, embedder, solo, "me", {}, backend="cpu", ctx_size=4096,
                                               threads=None)
    assert "--embeddings" not in llama_server_args(BINS, 8080, chat, solo, "me", {}, backend="cpu", ctx_size=4096,
                                                   threads=None)


def test_a_worker_is_dialed_directly_over_tls_where_it_connects_else_through_its_tunnel():
    from services.runnerd.commands import rpc_endpoint
    assert rpc_endpoint("w1", tls=True, direct=("10.0.0.2", 5000), forward=4001) == "w1@10.0.0.2:5000"
    assert rpc_endpoint("w1", tls=True, direct=None, forward=4001) == "w1@127.0.0.1:4001"  # TLS inside the tunnel
    assert rpc_endpoint("w1", tls=False, direct=None, forward=4001) == "127.0.0.1:4001"  # a build without TLS
    assert rpc_endpoint("w1", tls=True, direct=None, forward=None) is None


def test_only_the_plans_host_over_a_live_link_is_in_a_workers_allow_file():
    from common.rpc_policy import rpc_allowed
    worker_plan = Plan(state="split", host="h", members=[PlanMember(node_id="h", memory_bytes=1, ratio=0.5),
                                                         PlanMember(node_id="w", memory_bytes=1, ratio=0.5)])
    assert rpc_allowed(worker_plan, "w", {"h", "c"}) == ["h"]
    assert rpc_allowed(worker_plan, "w", {"c"}) == []  # no live link to the host
    assert rpc_allowed(worker_plan, "h", {"w"}) == []  # a host's own rpc-server serves no one
    assert rpc_allowed(Plan(state="waiting"), "w", {"h"}) == []


def test_load_progress_shows_the_last_percentage_llama_server_logged():
    from services.runnerd.llama_log import load_progress_text
    assert load_progress_text("main: loading model\n", 2) == "loading the model (2 s)"
    log_text = ("srv    load_model: load progress:  0%\nsrv    load_model: load progress:  37%\n"
                "srv    load_model: load progress: tensors 85%\n")
    assert load_progress_text(log_text, 3) == "loading the model: 85% (3 s)"


def test_placement_names_each_device_by_whose_it_is():
    from services.runnerd.llama_log import device_placement
    log = ("load_tensors: offloaded 33/33 layers to GPU\n"
           "load_tensors:   CPU_Mapped model buffer size =    70.31 MiB\n"
           "load_tensors: RPC0[127.0.0.1:5001] model buffer size =  1000.00 MiB\n"
           "load_tensors: RPC1[127.0.0.1:5001] model buffer size =   500.50 MiB\n"
           "load_tensors:        CUDA0 model buffer size =  2000.00 MiB\n")
    placed = device_placement(log, {"w1": "127.0.0.1:5001"}, "me")
    assert [(p.device, p.node_id, p.model_bytes) for p in placed] == [
        ("CPU_Mapped", "me", int(70.31 * (1 << 20))), ("RPC0[127.0.0.1:5001]", "w1", 1000 << 20),
        ("RPC1[127.0.0.1:5001]", "w1", int(500.5 * (1 << 20))), ("CUDA0", "me", 2000 << 20)]


def test_a_device_named_twice_is_two_devices_as_rpc_server_serves_it():
    gpu = (Device("CUDA0", 80 * GB, 79 * GB),)
    twice = detect_memory(None, "CUDA0,CUDA0", gpu)
    assert twice.devices == [80 * GB, 80 * GB] and twice.local_weights == [80 * GB]
