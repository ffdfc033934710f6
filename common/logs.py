"""Logging for services: one file per service under MESH_HOME/logs plus stderr (supervisord shows it)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from common import addresses

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(home: Path, service: str, level: str = "INFO") -> logging.Logger:
    addresses.ensure_dirs(home)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    for handler in (logging.FileHandler(addresses.log_path(home, service)), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "quic", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(service)
