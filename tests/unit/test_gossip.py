"""Signed gossip: merge rules, forged / altered / replayed announcements, hearsay expiry, rotations,
liveness arithmetic — and hypothesis fuzzing with well-formed lies (nothing crashes, nothing is believed)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.identity import NodeIdentity
from common.messages import Announcement
from common.tokens import new_secret
from services.meshd.gossip import (DIAL_BACKOFF_S, FORGET_AFTER_S, GossipMemory, announcement_fault, forget_stale,
                                   give_up_redialing, grown_silence, heartbeat_interval, merge_view, redial_delay,
                                   redials_in_flight, rotation_verdict, sign_announcement, sign_rotation)

MESH = "0123456789abcdef"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {name: NodeIdentity.load_or_create(root / name) for name in ("me", "b", "c", "evil")}


def ann(identity: NodeIdentity, seq: int, mem: int = 1, mesh: str = MESH, **kw) -> Announcement:
    return sign_announcement(Announcement(node_id=identity.node_id, seq=seq, role="worker", version="t",
                                          memory_bytes=mem, **kw), mesh, identity)


def merge(view, incoming, keys, memory=None, now=0.0, sender=None):
    memory = memory if memory is not None else GossipMemory()
    view, changed = merge_view(view, incoming, keys["me"].node_id, MESH, memory, now, sender=sender)
    return view, changed, memory


def test_newest_signed_announcement_wins_and_own_entry_is_ignored(keys):
    b = keys["b"]
    view, changed, memory = merge({}, [ann(b, 1), ann(keys["me"], 9)], keys)
    assert changed and set(view) == {b.node_id}
    view, changed, _ = merge(view, [ann(b, 2, mem=5)], keys, memory)
    assert changed and view[b.node_id].memory_bytes == 5
    view, changed, _ = merge(view, [ann(b, 1)], keys, memory)  # a slower relay's older copy: lag, not a replay
    assert not changed and view[b.node_id].memory_bytes == 5 and not memory.dropped


def test_a_heartbeat_with_only_a_newer_seq_is_not_a_change(keys):
    view, _, memory = merge({}, [ann(keys["b"], 1)], keys)
    view, changed, _ = merge(view, [ann(keys["b"], 2)], keys, memory)
    assert not changed and view[keys["b"].node_id].seq == 2


def test_forged_altered_and_replayed_announcements_are_dropped_and_counted(keys):
    b, evil = keys["b"], keys["evil"]
    view, _, memory = merge({}, [ann(b, 100)], keys)
    # forged: evil signs an announcement that claims to be b (its own key, or none at all)
    forged = sign_announcement(Announcement(node_id=b.node_id, seq=200, role="worker", version="t",
                                            memory_bytes=1 << 40), MESH, evil)
    unsigned = Announcement(node_id=b.node_id, seq=201, role="worker", version="t")
    # altered: b's genuine announcement with one field changed by a relay
    altered = ann(b, 202).model_copy(update={"memory_bytes": 1 << 40})
    # another mesh's genuine announcement does not count here either
    other_mesh = ann(b, 203, mesh="fedcba9876543210")
    view, changed, _ = merge(view, [forged, unsigned, altered, other_mesh], keys, memory)
    assert not changed and view[b.node_id].seq == 100
    assert memory.dropped == {"forged": 2, "altered": 2}
    # replayed: genuine but old, not one we held lately
    for seq in range(101, 111):
        view, _, _ = merge(view, [ann(b, seq)], keys, memory)
    view, changed, _ = merge(view, [ann(b, 100, mem=7)], keys, memory)
    assert not changed and view[b.node_id].seq == 110 and memory.dropped["replayed"] == 1
    # a hearsay entry about a node we never met must be signed by it too
    view, changed, _ = merge(view, [forged.model_copy(update={"node_id": keys["c"].node_id})], keys, memory)
    assert keys["c"].node_id not in view and memory.dropped["forged"] == 3


def test_hearsay_for_nodes_never_reached_expires_and_is_not_taken_back(keys):
    b, c = keys["b"], keys["c"]
    view, _, memory = merge({}, [ann(c, 5)], keys, now=1000.0, sender=b.node_id)  # c only heard of, through b
    assert c.node_id in view
    view = forget_stale(view, last_heard={}, connected=set(), now=1000.0 + FORGET_AFTER_S / 2, memory=memory)
    assert c.node_id in view
    view = forget_stale(view, last_heard={}, connected=set(), now=1001.0 + FORGET_AFTER_S, memory=memory)
    assert c.node_id not in view
    # b keeps gossiping the same entry: it stays gone; a newer one (c changed) or c itself brings it back
    view, changed, _ = merge(view, [ann(c, 5)], keys, memory, now=2000.0, sender=b.node_id)
    assert c.node_id not in view and not changed
    view, changed, _ = merge(view, [ann(c, 5)], keys, memory, now=2000.0, sender=c.node_id)
    assert c.node_id in view and changed


def test_nodes_we_lost_are_forgotten_and_connected_ones_kept(keys):
    b, c = keys["b"], keys["c"]
    view = {b.node_id: ann(b, 1), c.node_id: ann(c, 1)}
    kept = forget_stale(view, {b.node_id: 0.0, c.node_id: 100.0}, connected=set(), now=130.0)
    assert set(kept) == {c.node_id}
    assert set(forget_stale(view, {b.node_id: 0.0}, connected={b.node_id}, now=1000.0)) >= {b.node_id}


def test_rotations_need_a_members_signature_and_a_well_formed_secret(keys):
    me, b, evil = keys["me"], keys["b"], keys["evil"]
    current = new_secret()
    members = {me.node_id, b.node_id}
    good = sign_rotation(MESH, 3, new_secret(), b)
    assert rotation_verdict(good, MESH, 2, current, members) == (good, None)
    assert rotation_verdict(good, MESH, 3, good["secret"], members) == (None, None)  # what we have
    assert rotation_verdict(good, MESH, 4, current, members) == (None, None)  # older than ours
    assert rotation_verdict(sign_rotation(MESH, 3, new_secret(), evil), MESH, 2, current, members)[1] == \
        "not signed by a member"
    assert rotation_verdict(sign_rotation(MESH, 3, "zz" * 32, b), MESH, 2, current, members)[1] == "malformed secret"
    assert rotation_verdict(good | {"secret": new_secret()}, MESH, 2, current, members)[1] == "bad signature"
    assert rotation_verdict(good | {"by": me.node_id}, MESH, 2, current, members)[1] == "signed with another node's key"
    assert rotation_verdict(good | {"sig": None}, MESH, 2, current, members)[1] == "unsigned"
    assert rotation_verdict(good, "ffffffffffffffff", 2, current, members)[1] == "another mesh"
    # two members rotating at once settle on the same secret everywhere
    low, high = sorted([new_secret(), new_secret()])
    assert rotation_verdict(sign_rotation(MESH, 3, high, b), MESH, 3, low, members)[0]["secret"] == high
    assert rotation_verdict(sign_rotation(MESH, 3, low, b), MESH, 3, high, members) == (None, None)


def test_a_starved_process_does_not_count_its_own_stall_as_the_peers_silence():
    interval = heartbeat_interval(3.0)
    assert interval == 0.5 and heartbeat_interval(60) == 1.0
    silent = 0.0
    for _ in range(5):
        silent = grown_silence(silent, interval, interval)
    assert silent == pytest.approx(2.5)
    assert grown_silence(0.0, 30.0, interval) == pytest.approx(1.0)  # a 30 s stall of our own loop


def test_a_member_heard_lately_is_redialled_every_two_seconds_and_a_long_dead_one_backs_off():
    # After a heal the mesh must not sit out a 20 s back-off; a member silent for long keeps it.
    assert [redial_delay(f, 5.0) for f in range(8)] == [1, 2, 2, 2, 2, 2, 2, 2]
    assert [redial_delay(f, 600.0) for f in range(6)] == list(DIAL_BACKOFF_S) + [20]
    assert redial_delay(10, None) == 20  # known from before a restart, never heard since
    # A dial sent into a dead path waits out its timeout; for a recent member others start meanwhile.
    assert redials_in_flight(5.0) == 3 and redials_in_flight(600.0) == 1 and redials_in_flight(None) == 1
    # Fast redials pile up failures: a long partition must not forget the other side.
    assert not give_up_redialing(40, 59.0) and not give_up_redialing(40, 299.0)
    assert give_up_redialing(15, 301.0) and give_up_redialing(15, None) and not give_up_redialing(14, None)


# --- fuzzing with well-formed lies -----------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_altered_announcements_are_never_believed(keys, data):
    b = keys["b"]
    genuine = ann(b, 50, model_name="m", mesh_addrs=[("198.51.100.1", 7000)])
    field = data.draw(st.sampled_from(["node_id", "seq", "role", "memory_bytes", "model_name", "model_fingerprint",
                                       "mesh_addrs", "data_tcp", "host_ready", "plan_key", "public_key", "sig"]))
    value = data.draw({
        "node_id": st.sampled_from([keys["c"].node_id, keys["evil"].node_id]),
        "seq": st.integers(min_value=51, max_value=1 << 62), "role": st.just("client"),
        "memory_bytes": st.integers(min_value=2, max_value=1 << 62), "model_name": st.text(min_size=2, max_size=20),
        "model_fingerprint": st.text(min_size=1, max_size=80),
        "mesh_addrs": st.lists(st.tuples(st.text(min_size=1, max_size=15), st.integers(1, 65535)), min_size=2, max_size=3),
        "data_tcp": st.lists(st.tuples(st.text(min_size=1, max_size=15), st.integers(1, 65535)), min_size=1, max_size=3),
        "host_ready": st.just(True), "plan_key": st.text(min_size=1, max_size=20),
        "public_key": st.sampled_from([keys["evil"].public_key_der.hex(), "", "AAAA"]) | st.text(max_size=100),
        "sig": st.text(max_size=100) | st.binary(max_size=72).map(lambda b_: __import__("base64").b64encode(b_).decode()),
    }[field])
    lie = genuine.model_copy(update={field: value})
    view, _, memory = merge({b.node_id: ann(b, 10)}, [lie], keys, sender=b.node_id)
    assert announcement_fault(lie, MESH) is not None
    assert view[b.node_id].seq == 10 and sum(memory.dropped.values()) == 1
    assert set(view) == {b.node_id}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=st.dictionaries(st.sampled_from(["mesh", "gen", "secret", "by", "public_key", "sig", "x"]),
                             json_scalars | st.dictionaries(st.text(max_size=3), json_scalars, max_size=2), max_size=7))
def test_fuzz_garbage_rotations_are_refused_without_crashing(keys, frame):
    members = {keys["me"].node_id, keys["b"].node_id}
    adopted, _ = rotation_verdict(frame, MESH, 2, new_secret(), members)
    assert adopted is None


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(seqs=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=30))
def test_fuzz_seq_only_grows_whatever_order_gossip_arrives_in(keys, seqs):
    b = keys["b"]
    view, memory = {}, GossipMemory()
    for seq in seqs:
        view, _, _ = merge(view, [ann(b, seq, mem=seq + 1)], keys, memory)
    assert view[b.node_id].seq == max(seqs) and view[b.node_id].memory_bytes == max(seqs) + 1
    assert not memory.dropped.get("forged") and not memory.dropped.get("altered")
