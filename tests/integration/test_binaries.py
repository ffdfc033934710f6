"""The llama.cpp binaries tell their own backend: `--bin-dir` binaries are not assumed to be CPU ones."""
from __future__ import annotations

import shutil

import pytest

from common.binaries import BinariesError, find_binaries
from mesh_llama_cpp import build as llama_build

pytestmark = pytest.mark.slow


def test_a_bin_dir_reports_the_backend_it_was_built_for(tmp_path):
    try:
        own = find_binaries(None)
    except BinariesError as e:
        pytest.skip(str(e))
    assert own.backend == llama_build.detect_backend()  # what the build chose is what llama-server lists
    copied = tmp_path / "bin"
    copied.mkdir()
    for binary in (own.llama_server, own.rpc_server):
        shutil.copy2(binary, copied / binary.name)
    elsewhere = find_binaries(copied)
    assert elsewhere.backend == own.backend and elsewhere.loads_local_weights
