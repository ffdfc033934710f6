"""A `--join` token whose inviter cannot be reached yet (the laptop starts before the home desktop):
meshd runs alone and keeps dialing the token's addresses with a bounded back-off until the inviter
answers. Pure policy here; the loop lives in meshd (Meshd.join_until_joined)."""
from __future__ import annotations

JOIN_RETRY_S = (5.0, 10.0, 20.0, 30.0)  # then every 30 s for as long as the node runs alone


def join_retry_delay(failures: int) -> float:
    """Seconds before the next join attempt after `failures` failed ones (1 or more)."""
    return JOIN_RETRY_S[min(max(failures, 1), len(JOIN_RETRY_S)) - 1]


def keep_retrying_join(unreachable: bool, token_mesh: str, mesh_at_start: str, my_mesh: str,
                       connected_in_token_mesh: bool) -> bool:
    """Whether a failed join is tried again: only when the inviter could not be reached (a refusal or
    a bad token will not change by waiting), while we are still in the mesh we were in when the join
    started (a `meshctl leave` or another join means the user moved on) and not yet connected to a
    member of the token's mesh (joined another way, e.g. through a member that dialed us)."""
    if not unreachable:
        return False
    if my_mesh not in (mesh_at_start, token_mesh):
        return False
    return not (my_mesh == token_mesh and connected_in_token_mesh)

