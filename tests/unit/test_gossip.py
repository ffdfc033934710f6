from common.messages import Announcement
from services.meshd.gossip import forget_stale, merge_view


def ann(node: str, seq: int, mem: int = 1) -> Announcement:
    return Announcement(node_id=node, seq=seq, role="worker", version="t", memory_bytes=mem)


def test_newest_announcement_wins_and_own_entry_is_ignored():
    view, changed = merge_view({}, [ann("b", 1), ann("me", 9)], me="me")
    assert changed and set(view) == {"b"}
    view, changed = merge_view(view, [ann("b", 0, mem=5)], me="me")
    assert not changed and view["b"].memory_bytes == 1
    view, changed = merge_view(view, [ann("b", 2, mem=5)], me="me")
    assert changed and view["b"].memory_bytes == 5


def test_a_heartbeat_with_only_a_newer_seq_is_not_a_change():
    view, _ = merge_view({}, [ann("b", 1)], me="me")
    view, changed = merge_view(view, [ann("b", 2)], me="me")
    assert not changed and view["b"].seq == 2


def test_nodes_nobody_hears_from_are_forgotten():
    view = {"b": ann("b", 1), "c": ann("c", 1)}
    kept = forget_stale(view, {"b": 0.0, "c": 100.0}, connected=set(), now=130.0)
    assert set(kept) == {"c"}
    assert set(forget_stale(view, {"b": 0.0}, connected={"b"}, now=1000.0)) >= {"b"}
