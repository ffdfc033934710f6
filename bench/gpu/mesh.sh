#!/usr/bin/env bash
# On the GPU machine (device tool, kind nvidia-h200-x2), from the repo root, with carry [".gpu"] (made by
# `python -m bench.gpu.prepare`): the product's own path. `meshctl up` builds llama.cpp with CUDA from the
# pinned source, then two nodes on this one machine (homes and ports of their own, CUDA_VISIBLE_DEVICES
# giving each its GPUs) split a model by the VRAM each detects; bench/gpu/mesh.py checks where
# llama-server put the layers and measures decode. Results: $OUT/mesh-gpu.json (or bench/results/).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/results}"
started=$(date +%s)
source bench/gpu/env.sh
model=/tmp/random-7b.gguf  # no real model fits the 64 MiB that travel (bench/gpu/prepare.py says why)
python3 -m tests.support.random_gguf "$model" --preset 7b
echo "pip + model: $(( $(date +%s) - started )) s"
left=$(( started + ${RUN_BUDGET_S:-580} - $(date +%s) ))
timeout --signal=TERM "$left" python3 -m bench.gpu.mesh --model "$model" --out-dir "$OUT" ${MESH_ARGS:-} 2>&1 | tee "$OUT/mesh-gpu.log"
echo "total: $(( $(date +%s) - started )) s"
