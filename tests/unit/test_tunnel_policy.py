from common.messages import Plan, PlanMember
from common.rpc_policy import rpc_refusal

HOST, WORKER, CLIENT = "h" * 32, "w" * 32, "c" * 32


def split(host=HOST, members=(HOST, WORKER)) -> Plan:
    return Plan(state="split", host=host, members=[PlanMember(node_id=m, memory_bytes=1, ratio=0.5) for m in members])


def test_only_the_plans_host_over_a_live_link_reaches_the_rpc_server():
    assert rpc_refusal("rpc", split(), WORKER, HOST, connected=True) is None
    assert "not the host" in rpc_refusal("rpc", split(), WORKER, CLIENT, connected=True)
    assert "no live mesh link" in rpc_refusal("rpc", split(), WORKER, HOST, connected=False)
    # the host may split over us although we plan it solo (--split or --tensor-split set on the host only)
    assert rpc_refusal("rpc", Plan(state="solo", host=HOST), WORKER, HOST, connected=True) is None
    assert "no host" in rpc_refusal("rpc", Plan(state="starting"), WORKER, HOST, connected=True)
    assert "no host" in rpc_refusal("rpc", Plan(state="solo", host=WORKER), WORKER, HOST, connected=True)


def test_unknown_kinds_are_refused():
    assert "no tunnel kind" in rpc_refusal("shell", split(), WORKER, HOST, connected=True)
