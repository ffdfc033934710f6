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
