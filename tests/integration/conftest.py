"""On a failed test, the tail of every log of every node it started goes into the report: CI keeps
nothing else, and a mesh failure is rarely explained by the assertion alone."""
from __future__ import annotations

import time

import pytest

from tests.integration import harness

LOG_LINES = 25


@pytest.fixture(autouse=True)
def _test_started(request):
    request.node.started_at = time.time()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    started = getattr(item, "started_at", 0.0)
    for node in (n for n in harness.STARTED if n.stopped_at is None or n.stopped_at >= started):
        for log in sorted((node.home / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-LOG_LINES:]
            report.sections.append((f"{node.home.name}/{log.name}", "\n".join(lines)))


def pytest_terminal_summary(terminalreporter):
    if not harness.RECOVERIES:
        return
    terminalreporter.section("faults: recovery and requests lost")
    terminalreporter.write_line(f"{'fault':<48} {'outage s':>9} {'full s':>7} {'requests':>9} {'lost':>5}")
    for row in harness.RECOVERIES:
        full = "-" if row["back_to_full_s"] is None else f"{row['back_to_full_s']:.1f}"
        terminalreporter.write_line(f"{row['fault']:<48} {row['outage_s']:>9.1f} {full:>7} {row['requests']:>9} "
                                    f"{row['lost']:>5}")
