# Sourced by bench/gpu/run.sh and mesh.sh on the GPU machine, from the repo root, with carry [".gpu"]
# (made by `python -m bench.gpu.prepare`): the machine has no package registry, so the Python packages
# (the project's own wheel included: its console scripts are what supervisord starts) and the pinned
# llama.cpp source come from .gpu/. llama.cpp is built by whoever needs it first (meshctl up does).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/wheels/*.whl .gpu/project/*.whl
# The repo first: its code is what runs (the wheel is there for its scripts and the mesh_llama_cpp package).
export PYTHONPATH="$PWD:/tmp/site" PATH="/tmp/site/bin:/usr/local/cuda/bin:$PATH"
export MESH_LLAMA_SOURCE="$PWD/.gpu/llama-src.tar.gz" MESH_CUDA_ARCH="${MESH_CUDA_ARCH:-90}" MESH_LLAMA_BACKEND=cuda
export MESH_LLAMA_CACHE="${MESH_LLAMA_CACHE:-/tmp/llama-cache}"
if ! command -v git >/dev/null; then
    # llama.cpp/build.py applies our patches with `git apply -p1 ... FILE`; GNU patch does the same job
    mkdir -p /tmp/shim && printf '#!/bin/sh\n[ "$1" = apply ] || exit 1\nfor f; do :; done\nexec patch -p1 --forward -i "$f"\n' >/tmp/shim/git
    chmod +x /tmp/shim/git && export PATH="/tmp/shim:$PATH"
fi
# Every service imports here, before minutes of building: a package missing from .gpu/wheels would
# otherwise show only as a service in a restart loop (fastapi's opentelemetry once did).
python3 -c "import meshctl.cli, services.meshd.main, services.electd.main, services.runnerd.main, services.gatewayd.main"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
