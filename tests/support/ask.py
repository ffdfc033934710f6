"""One chat request at a node's API, run inside the node's network namespace by the NAT tests:
prints one JSON line with the HTTP status, the seconds it took, the answer's token count, the
decode rate the client saw (streamed tokens after the first, per second) and llama-server's own.
`python -m tests.support.ask URL MAX_TOKENS TIMEOUT`"""
from __future__ import annotations

import json
import sys
import time

import httpx


def ask(url: str, max_tokens: int, timeout: float) -> dict:
    body = {"model": "any", "messages": [{"role": "user", "content": "Count from one to twenty."}],
            "temperature": 0, "seed": 1, "max_tokens": max_tokens, "stream": True}
    started = time.monotonic()
    arrivals: list[float] = []
    timings: dict = {}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                return {"status": r.status_code, "seconds": time.monotonic() - started, "error": r.text[:300]}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                timings = chunk.get("timings") or timings
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    arrivals.append(time.monotonic())
    except httpx.HTTPError as exc:
        return {"status": 0, "seconds": time.monotonic() - started, "error": f"{type(exc).__name__}: {exc}"}
    decode = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 2 else None
    return {"status": 200, "seconds": time.monotonic() - started, "tokens": len(arrivals), "client_tok_s": decode,
            "server_tok_s": timings.get("predicted_per_second")}


if __name__ == "__main__":
    print(json.dumps(ask(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
