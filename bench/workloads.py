"""Real-text requests for the product benchmark and the speculation test: an agent-style edit that
returns most of its input, and free text. Each kind has several distinct prompts, so that
speculation's n-gram memory of one request does not answer the next."""
from __future__ import annotations

EDIT_FILES = [
    ("load_config", "read_settings", '''import json
from pathlib import Path


def load_config(path):
    """Read the JSON config at path and fill in defaults."""
    data = json.loads(Path(path).read_text())
    data.setdefault("port", 8080)
    data.setdefault("host", "127.0.0.1")
    data.setdefault("workers", 4)
    return data


def main():
    config = load_config("config.json")
    print("serving on", config["host"], config["port"])
    for worker in range(config["workers"]):
        print("starting worker", worker)


if __name__ == "__main__":
    main()
'''),
    ("total_price", "order_total", '''from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int


def total_price(items, discount=0.0):
    """Sum of price times quantity, less a discount between 0 and 1."""
    subtotal = sum(item.price * item.quantity for item in items)
    return round(subtotal * (1 - discount), 2)


def receipt(items):
    lines = [f"{item.name}: {item.quantity} x {item.price:.2f}" for item in items]
    lines.append(f"total: {total_price(items):.2f}")
    return "\\n".join(lines)
'''),
    ("fetch_page", "download_page", '''import time
import urllib.request


def fetch_page(url, retries=3, delay=1.0):
    """Return the body of url, retrying on errors."""
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()
        except OSError as error:
            print("attempt", attempt, "failed:", error)
            time.sleep(delay)
    raise RuntimeError("could not fetch " + url)


def fetch_all(urls):
    return {url: fetch_page(url) for url in urls}
'''),
]

FREE_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a child why the sky is blue and why sunsets are red.",
    "Describe a walk through a busy market in a small coastal town in the morning.",
]


def edit_messages(index: int) -> list[dict]:
    old, new, source = EDIT_FILES[index % len(EDIT_FILES)]
    return [{"role": "user", "content": f"Rename the function `{old}` to `{new}` everywhere in this file. "
                                        f"Reply with the whole file and nothing else.\n\n```python\n{source}```"}]


def free_messages(index: int) -> list[dict]:
    return [{"role": "user", "content": FREE_PROMPTS[index % len(FREE_PROMPTS)]}]


WORKLOADS = {"edit": edit_messages, "free": free_messages}
