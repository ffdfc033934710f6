"""bench_nat_paths fails its run when a pair is not on the path it stands for (a figure for
"punched" measured over the relay would be a false one), when requests fail, or when a marker
crossed the relay in plaintext."""
from bench.bench_nat_paths import PATHS, check


def report(**changes) -> dict:
    paths = {p: {"reported": {"host_to_worker": p, "worker_to_host": p}, "errors": [], "samples": [10.0]}
             for p in PATHS}
    for path, value in changes.items():
        paths[path] = paths[path] | value
    return {"paths": paths, "relay": {"plaintext_found": []}}


def test_every_pair_on_its_path_passes():
    assert check(report()) == []


def test_a_pair_on_another_path_fails_the_run_saying_which():
    problems = check(report(punched={"reported": {"host_to_worker": "relayed", "worker_to_host": "relayed"}}))
    assert problems == ["the punched pair reports relayed / relayed, not punched"]
    assert check(report(relayed={"reported": {"host_to_worker": "relayed", "worker_to_host": "punched"}}))


def test_failed_or_missing_answers_and_plaintext_at_the_relay_fail_the_run():
    assert check(report(direct={"errors": ["HTTP 503"]})) == ["direct: HTTP 503"]
    assert check(report(direct={"samples": []})) == ["direct: no answer measured"]
    leaked = report()
    leaked["relay"]["plaintext_found"] = ["relayed-secret"]
    assert check(leaked) == ["crossed the relay in plaintext: ['relayed-secret']"]
