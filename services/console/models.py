"""Models the console can offer: GGUF files in the models folder, and GGUF files of a Hugging Face repo.

The Hub is reached through huggingface_hub only, so HF_ENDPOINT (tests point it at a local stand-in)
and HF_TOKEN (gated repos) work as they do for every other Hub tool.
"""
from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse
from dataclasses import asdict, dataclass
from pathlib import Path

from common.default_model import models_dir
from common.gguf_info import ModelError, inspect_gguf

DOWNLOADS_SUBDIR = ".downloads"  # partial files live here, never beside finished models
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(Exception):
    """A Hub problem in one line for the page: what went wrong, what to do."""


@dataclass
class LocalModel:
    path: str
    file: str
    size_bytes: int
    name: str = ""
    arch: str = ""
    n_layers: int = 0
    error: str = ""  # why this file cannot be used


def describe_local(path: Path, cache_dir: Path | None) -> LocalModel:
    size = path.stat().st_size if path.exists() else 0
    try:
        info = inspect_gguf(path, cache_dir)
    except ModelError as exc:
        return LocalModel(path=str(path), file=path.name, size_bytes=size, error=str(exc))
    return LocalModel(path=info.path, file=path.name, size_bytes=info.size_bytes, name=info.name, arch=info.arch,
                      n_layers=info.n_layers)


def list_local_models(folder: Path, cache_dir: Path | None = None) -> list[dict]:
    """Every *.gguf directly in `folder` (partial downloads live in a hidden subfolder and are not listed)."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file() and not p.name.startswith("."))
    return [asdict(describe_local(p, cache_dir)) for p in files]


def models_folder() -> Path:
    return models_dir()


def hub_endpoint() -> str:
    from huggingface_hub import constants
    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _hub_api():
    """An HfApi for the endpoint, once a TCP connect shows it is there: huggingface_hub retries an
    unreachable Hub with back-off for ~30 s, and a page should say so at once instead."""
    from huggingface_hub import HfApi
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        raise HubError(f"cannot reach the Hub at {hub_endpoint()} ({exc.strerror or type(exc).__name__}); "
                       f"check your connection or HF_ENDPOINT") from None
    return HfApi(endpoint=hub_endpoint(), token=hub_token())


def explain_hub_error(exc: Exception, what: str) -> HubError:
    """One line for a Hub failure, by kind: unreachable, missing, gated, or other."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    if isinstance(exc, GatedRepoError):
        return HubError(f"{what}: the repo is gated; accept its terms on the Hub and set HF_TOKEN before starting the console")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{what}: no such repo (or it is private: set HF_TOKEN); check the name, e.g. owner/name")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return HubError(f"{what}: the Hub answered HTTP {status}; try again later")
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return HubError(f"{what}: cannot reach the Hub at {hub_endpoint()} ({text}); check your connection or HF_ENDPOINT")


def search_repos(query: str, limit: int = 20) -> list[dict]:
    query = query.strip()
    if not query:
        raise HubError("type a few words to search for, or a repo name like owner/name")
    api = _hub_api()
    try:
        found = list(api.list_models(search=query, filter="gguf", limit=limit))
    except Exception as exc:
        raise explain_hub_error(exc, "search failed") from None
    return [{"repo": m.id, "downloads": getattr(m, "downloads", None) or 0, "likes": getattr(m, "likes", None) or 0}
            for m in found]


def check_repo_id(repo: str) -> str:
    repo = repo.strip().removeprefix(hub_endpoint().rstrip("/") + "/").removeprefix("https://huggingface.co/").strip("/")
    if not REPO_ID.match(repo):
        raise HubError(f"{repo!r} is not a repo name; use owner/name, e.g. unsloth/gemma-3-270m-it-GGUF")
    return repo


def repo_gguf_files(repo: str) -> dict:
    """The repo's commit and its GGUF files with size and (for LFS files) sha256."""
    repo = check_repo_id(repo)
    api = _hub_api()
    try:
        info = api.model_info(repo, files_metadata=True)
    except Exception as exc:
        raise explain_hub_error(exc, f"cannot list {repo}") from None
    files = []
    for sibling in info.siblings or []:
        if not sibling.rfilename.lower().endswith(".gguf"):
            continue
        lfs = sibling.lfs
        files.append({"file": sibling.rfilename, "size_bytes": sibling.size if sibling.size is not None else
                      (lfs.size if lfs else None), "sha256": lfs.sha256 if lfs else None})
    return {"repo": repo, "revision": info.sha, "files": files}
