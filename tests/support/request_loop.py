"""A steady trickle of chat requests against one node's API, each outcome one JSON line.

Run as a process (`python -m tests.support.request_loop URL OUT`), so it can run inside a network
namespace as well as beside the test; it stops on SIGTERM after its request in flight ends. Fault
tests read the lines back: a request that failed is a request lost, and the longest stretch
without an answer is how long the mesh was out.
"""
from __future__ import annotations

import argparse
import json
import signal
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    start: float  # wall clock, so the test and a namespaced loop share one time line
    end: float
    ok: bool
    detail: str


def run(url: str, out_path: str, interval: float, max_tokens: int) -> None:
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True
    signal.signal(signal.SIGTERM, stop)
    body = {"model": "any", "messages": [{"role": "user", "content": "Say one word."}], "temperature": 0,
            "max_tokens": max_tokens}
    with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as client, open(out_path, "a") as out:
        while not stopping:
            start = time.time()
            try:
                r = client.post(url, json=body)
                ok = r.status_code == 200 and bool(r.json().get("choices"))
                detail = "" if ok else f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            out.write(json.dumps(Outcome(start, time.time(), ok, detail).__dict__) + "\n")
            out.flush()
            time.sleep(interval)


def read_outcomes(path) -> list[Outcome]:
    try:
        return [Outcome(**json.loads(line)) for line in open(path) if line.strip()]
    except FileNotFoundError:
        return []


def longest_outage(outcomes: list[Outcome], since: float) -> float:
    """Longest time without a successful answer, from `since` to the last success."""
    ends = [since] + sorted(o.end for o in outcomes if o.ok and o.end > since)
    return max((b - a for a, b in zip(ends, ends[1:])), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("out")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=4)
    args = ap.parse_args()
    run(args.url, args.out, args.interval, args.max_tokens)


if __name__ == "__main__":
    main()
