"""The text `meshctl status`: what a user reads without --json."""
from __future__ import annotations

from common.messages import MeshState
from meshctl.cli import render_status


def text(mesh: MeshState) -> str:
    return render_status({"meshd": mesh.model_dump(), "electd": {}, "runnerd": {}, "gatewayd": {}})


def test_dropped_gossip_is_shown_when_there_is_some():
    assert "gossip dropped" not in text(MeshState(node_id="n"))
    assert "gossip dropped" not in text(MeshState(node_id="n", gossip_dropped={"forged": 0}))
    shown = text(MeshState(node_id="n", gossip_dropped={"forged": 2, "replayed": 0, "bad_rotation": 1}))
    assert "gossip dropped (not believed): 1 bad rotation, 2 forged" in shown
    assert "replayed" not in shown


def test_the_plan_is_said_once_in_the_text_status_and_the_console():
    from common.messages import Plan, PlanMember
    from common.plan_text import plan_line
    from services.console.live import mesh_view
    assert plan_line("split", "split over 2 nodes by memory") == "split over 2 nodes by memory"
    assert plan_line("waiting", "waiting for more peers — need 2.0 GB") == "waiting for more peers — need 2.0 GB"
    assert plan_line("client", "lite client: serves the API through the host") == \
        "lite client: serves the API through the host"
    assert plan_line("no-model", "this node has no model") == "this node has no model"
    assert plan_line("solo", "elected aaaaaaaa (8.0 GB for a 1.0 GB model)") == \
        "solo — elected aaaaaaaa (8.0 GB for a 1.0 GB model)"
    assert plan_line("starting", "") == "starting"
    plan = Plan(state="split", host="a", reason="split over 2 nodes by memory", key="k",
                members=[PlanMember(node_id="a", memory_bytes=2, ratio=0.667), PlanMember(node_id="b", memory_bytes=1,
                                                                                        ratio=0.333)])
    shown = render_status({"meshd": {"node_id": "a"}, "electd": plan.model_dump(), "runnerd": {}, "gatewayd": {}})
    assert "plan: split over 2 nodes by memory\n" in shown and shown.count("split over 2 nodes") == 1
    view = mesh_view(MeshState(node_id="a"), plan, None, None, {})
    assert view["plan"]["line"] == "split over 2 nodes by memory"  # the console's plan line (app.js) shows this
