"""Downloads of GGUF files from the Hub into the models folder, with progress, resume and cancel.

A download writes to `<models>/.downloads/<file>.partial` and becomes `<models>/<file>` only after
its size, its sha256 (when the Hub gives one) and its GGUF header check out: a failed or cancelled
download never leaves a file that looks like a model. An interrupted one keeps its partial file,
and starting it again resumes from there with an HTTP range request (huggingface_hub's http_get).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from common.gguf_info import ModelError, check_readable_gguf, inspect_gguf
from services.console.models import DOWNLOADS_SUBDIR, HubError, check_repo_id, explain_hub_error, hub_endpoint, hub_token

log = logging.getLogger("console")
RATE_WINDOW_S = 5.0
CHUNK_BYTES = 1 << 20  # progress moves, and pause takes effect, every MiB (huggingface_hub's default is 10 MB)
DISK_HEADROOM = 64 << 20  # leave some room for everything else on the disk


class DiskSpaceError(HubError):
    """Not enough room: worth trying again once space is freed."""


class DownloadStopped(Exception):
    """Raised from the progress callback to stop http_get between chunks."""


# --- pure bookkeeping --------------------------------------------------------------------------

def safe_file_name(filename: str) -> str:
    """A Hub path (may have folders) as one file name in the models folder."""
    name = filename.replace("\\", "/").split("/")[-1]
    if not name or name.startswith(".") or not name.lower().endswith(".gguf"):
        raise HubError(f"{filename!r} is not a GGUF file; pick a file ending in .gguf")
    return name


def download_paths(folder: Path, filename: str) -> tuple[Path, Path]:
    name = safe_file_name(filename)
    return folder / DOWNLOADS_SUBDIR / f"{name}.partial", folder / name


def human_size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def disk_space_problem(needed_bytes: int, free_bytes: int, folder: Path) -> str | None:
    if needed_bytes + DISK_HEADROOM > free_bytes:
        return (f"not enough disk space in {folder}: the download needs {human_size(needed_bytes)} more, "
                f"{human_size(free_bytes)} is free; free some space or choose a smaller file")
    return None


class RateMeter:
    """Bytes per second over the last few seconds; time left from that rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = RATE_WINDOW_S):
        self.clock, self.window_s = clock, window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, done_bytes: int) -> None:
        now = self.clock()
        self.samples.append((now, done_bytes))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self, done: int, total: int | None) -> float | None:
        rate = self.rate()
        if not total or rate <= 0:
            return None
        return max(total - done, 0) / rate


def verify_download(path: Path, expected_size: int | None, expected_sha256: str | None) -> str | None:
    """Why the finished file must not become a model, or None."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"the download has {size} bytes but the Hub says {expected_size}; download it again"
    if expected_sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                digest.update(block)
        if digest.hexdigest() != expected_sha256.lower():
            return "the download's sha256 does not match the Hub's; it was corrupted on the way, download it again"
    try:
        check_readable_gguf(path)
        inspect_gguf(path)
    except ModelError:
        return "the downloaded file is not a GGUF model (no valid GGUF header); pick another file"
    return None


@dataclass
class Download:
    id: str
    repo: str
    file: str
    total_bytes: int | None = None
    sha256: str | None = None
    done_bytes: int = 0
    resumed_from: int = 0
    state: str = "queued"  # queued, checking, downloading, verifying, done, failed, paused, cancelled
    error: str = ""
    path: str = ""  # the finished model
    rate_bps: float = 0.0
    eta_s: float | None = None
    next: str = ""  # what the page offers after a stop: "resume" (partial kept), "retry" (from scratch) or nothing
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def public(self) -> dict:
        return asdict(self)


# --- the manager (threads: huggingface_hub's http_get blocks) ------------------------------------

class DownloadManager:
    def __init__(self, folder: Path, on_change: Callable[[], None] = lambda: None):
        self.folder = folder
        self.on_change = on_change
        self.jobs: dict[str, Download] = {}
        self._stop: dict[str, str] = {}  # id -> "cancel" or "pause"
        self._lock = threading.Lock()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [d.public() for d in self.jobs.values()]

    def start(self, repo: str, filename: str, size: int | None, sha256: str | None, revision: str | None) -> Download:
        repo = check_repo_id(repo)
        partial, final = download_paths(self.folder, filename)
        job_id = f"{repo}/{filename}"
        with self._lock:
            running = self.jobs.get(job_id)
            if running and running.state in ("queued", "checking", "downloading", "verifying"):
                raise HubError(f"{filename} is already downloading")
            if final.exists():
                raise HubError(f"{final} already exists; use it from the local models list")
            job = Download(id=job_id, repo=repo, file=filename, total_bytes=size, sha256=sha256)
            self.jobs[job_id] = job
            self._stop.pop(job_id, None)
        threading.Thread(target=self._run, args=(job, partial, final, revision), daemon=True,
                         name=f"download {filename}").start()
        return job

    def stop(self, job_id: str, how: str) -> None:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise HubError("no such download")
            if job.state in ("done", "failed", "cancelled", "paused"):
                if how == "cancel":  # dismiss it, and drop a paused or failed download's partial file
                    partial, _ = download_paths(self.folder, job.file)
                    partial.unlink(missing_ok=True)
                    del self.jobs[job_id]
                return
            self._stop[job_id] = how

    def _update(self, job: Download, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)
        self.on_change()

    def _run(self, job: Download, partial: Path, final: Path, revision: str | None) -> None:
        try:
            self._download(job, partial, final, revision)
        except DownloadStopped:
            how = self._stop.get(job.id, "cancel")
            if how == "cancel":
                partial.unlink(missing_ok=True)
            kept = partial.stat().st_size if partial.exists() else 0  # the chunk in hand when stopped is not written
            self._update(job, state="cancelled" if how == "cancel" else "paused", rate_bps=0.0, eta_s=None,
                         done_bytes=kept, next="" if how == "cancel" else "resume")
        except DiskSpaceError as exc:
            self._update(job, state="failed", error=str(exc), rate_bps=0.0, eta_s=None, next="retry")
        except HubError as exc:  # the file itself is wrong: trying again gives the same answer
            self._update(job, state="failed", error=str(exc), rate_bps=0.0, eta_s=None)
        except Exception as exc:  # the partial file stays, to resume from
            log.warning("download of %s failed: %s", job.file, exc)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                message = f"the disk filled up while downloading {job.file}; free some space, then resume"
            elif isinstance(exc, OSError) and exc.errno is not None:
                message = f"cannot write {partial}: {exc.strerror or exc}; fix that, then resume"
            else:  # network trouble mid-way
                message = f"{explain_hub_error(exc, f'download of {job.file} stopped')}; start it again to resume"
            kept = partial.exists() and partial.stat().st_size > 0
            self._update(job, state="failed", error=message, rate_bps=0.0, eta_s=None, next="resume" if kept else "retry")
        finally:
            self._update(job, finished=time.time())

    def _download(self, job: Download, partial: Path, final: Path, revision: str | None) -> None:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        self._update(job, state="checking")
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if job.total_bytes is not None and have > job.total_bytes:
            partial.unlink()
            have = 0
        free = shutil.disk_usage(self.folder).free
        problem = disk_space_problem((job.total_bytes or 0) - have, free, self.folder)
        if problem:
            raise DiskSpaceError(problem)
        url = hf_hub_url(job.repo, job.file, revision=revision, endpoint=hub_endpoint())
        headers = build_hf_headers(token=hub_token())
        meter = RateMeter()
        manager = self

        class Progress:
            """The progress bar huggingface_hub drives: counts bytes and stops the transfer on request."""

            def __init__(self, total=None, initial=0, **_):
                self.n = initial

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def close(self):
                pass

            def update(self, n=1):
                self.n += n
                meter.add(self.n)
                manager._update(job, done_bytes=self.n, rate_bps=meter.rate(), eta_s=meter.eta_s(self.n, job.total_bytes))
                if job.id in manager._stop:
                    raise DownloadStopped()

        constants.DOWNLOAD_CHUNK_SIZE = CHUNK_BYTES  # read by http_get at each call
        self._update(job, state="downloading", done_bytes=have, resumed_from=have)
        meter.add(have)
        with open(partial, "ab") as out:
            http_get(url, out, resume_size=have, headers=headers, expected_size=job.total_bytes,
                     displayed_filename=job.file, tqdm_class=Progress)
        self._update(job, state="verifying", rate_bps=0.0, eta_s=None)
        problem = verify_download(partial, job.total_bytes, job.sha256)
        if problem:
            partial.unlink(missing_ok=True)
            raise HubError(problem)
        os.replace(partial, final)
        self._update(job, state="done", path=str(final), done_bytes=final.stat().st_size)
        log.info("downloaded %s from %s into %s", job.file, job.repo, final)
