from common.messages import Plan
from services.electd.election import (Candidate, elect_host, make_plan, member_gone, rpc_counts_ready,
                                      split_by_memory)

GB = 1 << 30
FP = "f" * 32


def node(nid: str, mem_gb: float, fp: str = FP, role: str = "worker", rpc_ready: bool = True) -> Candidate:
    return Candidate(nid * 32 if len(nid) == 1 else nid, int(mem_gb * GB), fp, role, rpc_ready)


def test_highest_memory_wins_and_ties_go_to_highest_id():
    assert elect_host([node("a", 8), node("b", 16), node("c", 4)]).node_id == "b" * 32
    assert elect_host([node("a", 8), node("c", 8), node("b", 8)]).node_id == "c" * 32


def test_every_node_computes_the_same_plan():
    nodes = [node("a", 10), node("b", 6), node("c", 4)]
    plans = [make_plan(me, [n for n in nodes if n is not me], 15 * GB) for me in nodes]
    assert {p.key for p in plans} == {plans[0].key}
    assert plans[0].state == "split" and plans[0].host == "a" * 32


def test_split_is_proportional_to_memory_and_sums_to_one():
    assert split_by_memory([103, 51]) == [0.669, 0.331]
    ratios = split_by_memory([7, 7, 7])
    assert abs(sum(ratios) - 1) < 1e-9


def test_solo_when_the_model_fits_the_winner():
    plan = make_plan(node("a", 4), [node("b", 8)], 1 * GB)
    assert plan.state == "solo" and plan.host == "b" * 32 and [m.node_id for m in plan.members] == ["b" * 32]


def test_waiting_for_more_peers_shows_needed_and_available():
    plan = make_plan(node("a", 20), [node("b", 20)], 50 * GB, margin=1.1)
    assert plan.state == "waiting"
    assert plan.needed_bytes == int(50 * GB * 1.1) and plan.available_bytes == 40 * GB
    assert "need 55.0 GB" in plan.reason and "have 40.0 GB" in plan.reason


def test_forced_split_uses_every_eligible_node_and_falls_back_to_solo_alone():
    split = make_plan(node("a", 8), [node("b", 4)], 1 * GB, force_split=True)
    assert split.state == "split" and [m.node_id[0] for m in split.members] == ["a", "b"]
    assert [m.ratio for m in split.members] == [0.667, 0.333]
    alone = make_plan(node("a", 8), [], 1 * GB, force_split=True)
    assert alone.state == "solo"


def test_clients_other_models_and_unready_rpc_never_count():
    peers = [node("b", 64, role="client", fp=None), node("c", 64, fp="0" * 32), node("d", 64, rpc_ready=False)]
    plan = make_plan(node("a", 8), peers, 1 * GB, force_split=True)
    assert plan.state == "solo" and plan.host == "a" * 32
    reasons = {e.node_id[0]: e.reason for e in plan.excluded}
    assert reasons == {"b": "lite client", "c": "holds a different model", "d": "rpc-server not ready"}


def test_a_client_joining_does_not_change_the_plan_key():
    before = make_plan(node("a", 8), [node("b", 4)], 1 * GB, force_split=True)
    after = make_plan(node("a", 8), [node("b", 4), node("c", 0, role="client", fp=None)], 1 * GB, force_split=True)
    assert before.key == after.key


def test_manual_tensor_split_overrides_ratios_when_lengths_match():
    plan = make_plan(node("a", 8), [node("b", 4)], 1 * GB, force_split=True, tensor_split=[0.85, 0.15])
    assert [m.ratio for m in plan.members] == [0.85, 0.15]
    mismatched = make_plan(node("a", 8), [node("b", 4)], 1 * GB, force_split=True, tensor_split=[1, 1, 1])
    assert [m.ratio for m in mismatched.members] == [0.667, 0.333] and "ignored" in mismatched.reason


def test_no_model_and_client_plans():
    assert make_plan(None, [], 0).state == "no-model"
    assert make_plan(node("a", 0, role="client"), [], 0).state == "client"
    assert isinstance(make_plan(None, [], 0), Plan)


def far(nid: str, mem_gb: float, rtt_ms: float | None) -> Candidate:
    return Candidate(nid * 32, int(mem_gb * GB), FP, rtt_ms=rtt_ms)


def test_host_leaves_a_far_member_out_when_the_others_hold_the_model():
    plan = make_plan(node("a", 10), [far("b", 6, 5.0), far("c", 4, 120.0)], 12 * GB, force_split=True)
    assert plan.state == "split" and [m.node_id[0] for m in plan.members] == ["a", "b"]
    (left_out,) = plan.excluded
    assert left_out.node_id == "c" * 32 and "120 ms" in left_out.reason and "80 ms" in left_out.reason


def test_a_far_member_stays_when_its_memory_is_needed_closest_first():
    plan = make_plan(node("a", 10), [far("b", 6, 200.0), far("c", 6, 100.0), far("d", 6, 300.0)], 14 * GB)
    assert plan.state == "split" and sorted(m.node_id[0] for m in plan.members) == ["a", "c"]
    assert {e.node_id[0] for e in plan.excluded} == {"b", "d"}


def test_only_far_members_and_a_host_that_fits_means_solo():
    plan = make_plan(node("a", 10), [far("b", 6, 150.0)], 5 * GB, force_split=True)
    assert plan.state == "solo" and "too far" in plan.reason and plan.excluded[0].node_id == "b" * 32


def test_round_trip_bound_is_the_hosts_alone_and_can_be_turned_off():
    # b is host (more memory); a does not know b's round trips to others, so it does not judge them
    plan = make_plan(node("a", 4), [far("b", 10, 1.0), far("c", 4, 150.0)], 12 * GB, force_split=True)
    assert plan.host == "b" * 32 and len(plan.members) == 3
    plan = make_plan(node("a", 10), [far("c", 4, 150.0)], 12 * GB, force_split=True, max_rtt_ms=None)
    assert len(plan.members) == 2 and not plan.excluded


def test_a_serving_member_is_kept_until_well_past_the_bound():
    members = frozenset({"a" * 32, "b" * 32})
    kept = make_plan(node("a", 10), [far("b", 6, 90.0)], 5 * GB, force_split=True, current=members)
    assert len(kept.members) == 2  # 90 ms wobbling above 80 does not restart the split
    new = make_plan(node("a", 10), [far("b", 6, 90.0)], 5 * GB, force_split=True)
    assert new.state == "solo"
    gone = make_plan(node("a", 10), [far("b", 6, 110.0)], 5 * GB, force_split=True, current=members)
    assert gone.state == "solo"


def test_members_carry_their_devices_and_a_gpu_more_changes_the_plan():
    from dataclasses import replace
    host, worker = node("a", 10), replace(node("b", 8), devices=(4 * GB, 4 * GB))
    plan = make_plan(host, [worker], 12 * GB)
    assert plan.state == "split" and [m.devices for m in plan.members] == [[], [4 * GB, 4 * GB]]
    # the same memory on one device instead of two: --tensor-split changes, so llama-server must restart
    assert make_plan(host, [replace(worker, devices=(8 * GB,))], 12 * GB).key != plan.key


def test_a_plan_that_lost_a_member_does_not_wait_to_settle():
    a, b = node("a", 8), node("b", 4)
    split = make_plan(a, [b], 6 * GB, force_split=True)
    assert split.host == a.node_id
    assert member_gone(split, b.node_id, connected=set())  # the worker lost its host: re-plan at once
    assert member_gone(split, a.node_id, connected=set())  # the host lost its worker (and the tunnel to it)
    assert not member_gone(split, b.node_id, connected={a.node_id})
    assert not member_gone(split, a.node_id, connected={b.node_id, "c" * 32})  # a join settles as usual
    assert not member_gone(make_plan(a, [], 6 * GB), a.node_id, connected=set())
    assert not member_gone(Plan(state="waiting", host=a.node_id), b.node_id, connected=set())


def test_a_serving_worker_whose_rpc_server_restarts_keeps_its_place_for_a_few_seconds():
    assert rpc_counts_ready(False, serving=True, ready_ago=1.0)  # restarting: the split stays
    assert not rpc_counts_ready(False, serving=True, ready_ago=6.0)  # still down: plan without it
    assert not rpc_counts_ready(False, serving=False, ready_ago=1.0)  # not serving: no place to keep
    assert rpc_counts_ready(True, serving=False, ready_ago=100.0)
