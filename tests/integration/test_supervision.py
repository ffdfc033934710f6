"""No half-dead services: a failure injected into any loop of any service makes that service exit
non-zero, supervisord restarts it, and the node serves again on its own (common/tasks.py)."""
from __future__ import annotations

import pytest

from common.tasks import fault_file
from tests.integration.harness import Node
from tests.support.procs import wait_until

pytestmark = pytest.mark.slow

LOOPS = {
    "meshd": ["publish", "receive", "control", "gossip", "heartbeat", "connect"],
    "electd": ["publish", "receive", "control", "settle"],
    "runnerd": ["publish", "receive", "control", "rpc-server", "llama-server", "direct-paths"],
    "gatewayd": ["publish", "receive", "control", "reconcile", "members-api", "api"],
}


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("supervision") / "a", extra=["--bind-host", "127.0.0.1"],
             env={"MESH_TEST_FAULTS": "1"})
    try:
        n.start()
        n.wait_serving()
        yield n
    finally:
        n.stop()


def pid_of(node: Node, service: str) -> int | None:
    try:
        return node.service_pid(service)
    except (OSError, ValueError):  # between the old process and the new one
        return None


@pytest.mark.parametrize("service, loop", [(s, t) for s, loops in LOOPS.items() for t in loops],
                         ids=[f"{s}-{t}" for s, loops in LOOPS.items() for t in loops])
def test_a_failed_loop_restarts_its_service(node, service, loop):
    before = wait_until(lambda: pid_of(node, service), timeout=60, what=f"{service} running")
    fault_file(node.home, service, loop).touch()
    wait_until(lambda: pid_of(node, service) not in (None, before), timeout=30, interval=0.2,
               what=f"supervisord restarting {service} after its {loop} loop failed")
    assert not fault_file(node.home, service, loop).exists()
    log = (node.home / "logs" / f"{service}.log").read_text(errors="replace")
    assert f"{loop} failed; exiting so supervisord restarts it" in log
    node.wait_serving(timeout=180)
    assert node.chat("Say hi.", max_tokens=2) is not None
