"""Supervised tasks: a loop that raises or returns ends the service (so supervisord restarts it)."""
import asyncio

from common.tasks import Supervisor, fault_file


def test_a_failing_loop_ends_the_service_and_cancels_the_rest(tmp_path):
    async def main():
        cancelled = []

        async def forever():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        async def broken():
            await asyncio.sleep(0.05)
            raise KeyError("a bug in a handler")

        tasks = Supervisor("svc", tmp_path)
        tasks.spawn("forever", forever())
        tasks.spawn("broken", broken())
        failure = await asyncio.wait_for(tasks.run_until(asyncio.Event()), 5)
        return failure, cancelled
    failure, cancelled = asyncio.run(main())
    assert "broken failed: KeyError" in failure and cancelled == [True]


def test_a_loop_that_returns_ends_the_service_and_a_stop_is_no_failure(tmp_path):
    async def ends():
        return None

    async def run(stop_first: bool):
        tasks = Supervisor("svc", tmp_path)
        stopping = asyncio.Event()
        if stop_first:
            tasks.spawn("sleeper", asyncio.sleep(3600))
            stopping.set()
        else:
            tasks.spawn("ends", ends())
        return await asyncio.wait_for(tasks.run_until(stopping), 5)
    assert asyncio.run(run(False)) == "ends ended"
    assert asyncio.run(run(True)) is None


def test_a_test_can_make_a_named_loop_fail_once(tmp_path):
    (tmp_path / "run").mkdir()

    async def main():
        tasks = Supervisor("svc", tmp_path, test_faults=True)
        tasks.spawn("loop", asyncio.sleep(3600))
        fault_file(tmp_path, "svc", "loop").touch()
        return await asyncio.wait_for(tasks.run_until(asyncio.Event()), 5)
    assert "InjectedFault" in asyncio.run(main())
    assert not fault_file(tmp_path, "svc", "loop").exists()
