"""A local stand-in for the Hugging Face Hub: the API routes and file URLs huggingface_hub uses.

Point HF_ENDPOINT at it. It answers model search (/api/models), repo info with file sizes and
LFS sha256 (/api/models/{repo}), and file downloads (/{repo}/resolve/{rev}/{file}) with HTTP
ranges, so resumes are real. Files can be throttled (to watch progress, pause and resume),
a repo can be gated behind a token, and a file can claim a size it does not have (a disk-space
check must refuse it before any byte moves).

    python -m tests.support.hub_standin PORT REPO=FILE.gguf ... [--throttle BYTES_PER_S]
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    name: str
    path: Path | None = None  # served bytes; None for a file that only claims `claimed_size`
    claimed_size: int | None = None
    throttle_bps: float | None = None
    lfs: bool = True
    sha256: str = ""

    def size(self) -> int:
        return self.claimed_size if self.claimed_size is not None else self.path.stat().st_size


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile] = field(default_factory=dict)
    gated_token: str | None = None  # when set, only `Authorization: Bearer <this>` gets in


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


class HubStandIn:
    def __init__(self, repos: list[HubRepo], host: str = "127.0.0.1", port: int = 0):
        for repo in repos:
            for f in repo.files.values():
                if f.path is not None and f.lfs and not f.sha256:
                    f.sha256 = sha256_of(f.path)
        self.repos = {r.repo_id: r for r in repos}
        self.requests: list[str] = []
        self.down = False  # when set, every connection is dropped unanswered (an unreachable Hub)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                standin.handle(self, head=True)

            def do_GET(self):
                standin.handle(self, head=False)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "HubStandIn":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- routes ----------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        if self.down:
            h.close_connection = True
            h.connection.shutdown(2)
            return
        url = urlparse(h.path)
        path = unquote(url.path)
        self.requests.append(f"{h.command} {h.path}")
        if path == "/api/models":
            return self.search(h, parse_qs(url.query))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/[^/]+)?", path)
        if match:
            return self.repo_info(h, match.group(1))
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            return self.resolve(h, match.group(1), match.group(3), head=head)
        self.send_json(h, 404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})

    def allowed(self, h: BaseHTTPRequestHandler, repo: HubRepo) -> bool:
        if repo.gated_token and h.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            self.send_json(h, 401, {"error": f"Access to model {repo.repo_id} is restricted."},
                           {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated repo"})
            return False
        return True

    def search(self, h, query: dict) -> None:
        words = (query.get("search") or [""])[0].lower()
        found = [{"id": r.repo_id, "modelId": r.repo_id, "downloads": 42, "likes": 1, "tags": ["gguf"],
                  "private": False} for r in self.repos.values() if words in r.repo_id.lower()]
        self.send_json(h, 200, found)

    def repo_info(self, h, repo_id: str) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.send_json(h, 404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if not self.allowed(h, repo):
            return
        siblings = []
        for f in repo.files.values():
            entry = {"rfilename": f.name, "size": f.size(), "blobId": hashlib.sha1(f.name.encode()).hexdigest()}
            if f.lfs:
                entry["lfs"] = {"size": f.size(), "sha256": f.sha256 or "0" * 64, "pointerSize": 134}
            siblings.append(entry)
        self.send_json(h, 200, {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False,
                                "gated": "manual" if repo.gated_token else False, "tags": ["gguf"],
                                "siblings": siblings, "downloads": 42, "likes": 1})

    def resolve(self, h, repo_id: str, name: str, *, head: bool) -> None:
        repo = self.repos.get(repo_id)
        f = repo.files.get(name) if repo else None
        if repo is not None and not self.allowed(h, repo):
            return
        if f is None or f.path is None:
            return self.send_json(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        size = f.path.stat().st_size
        start, status = 0, 200
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if ranged:
            start, status = int(ranged.group(1)), 206
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        h.send_response(status)
        h.send_header("Content-Length", str(size - start))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{f.sha256 or "x"}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("X-Linked-Size", str(size))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        if head:
            return
        chunk = 256 << 10
        began = time.monotonic()
        sent = 0
        try:
            with open(f.path, "rb") as src:
                src.seek(start)
                while block := src.read(chunk):
                    h.wfile.write(block)
                    sent += len(block)
                    if f.throttle_bps:
                        ahead = sent / f.throttle_bps - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped (pause or cancel)

    @staticmethod
    def send_json(h, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)


def main() -> None:
    args = sys.argv[1:]
    throttle = None
    if "--throttle" in args:
        at = args.index("--throttle")
        throttle = float(args[at + 1])
        del args[at:at + 2]
    port = int(args[0])
    repos: dict[str, HubRepo] = {}
    for spec in args[1:]:
        repo_id, _, file = spec.partition("=")
        path = Path(file)
        repos.setdefault(repo_id, HubRepo(repo_id)).files[path.name] = HubFile(path.name, path, throttle_bps=throttle)
    standin = HubStandIn(list(repos.values()), port=port)
    print(f"Hub stand-in at {standin.url}", flush=True)
    standin.server.serve_forever()


if __name__ == "__main__":
    main()
