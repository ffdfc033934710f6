#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with carry [".gpu"] (made by `python -m bench.gpu.prepare`):
# build llama.cpp with CUDA from the pinned source in .gpu/, then run the product-layout benchmark there.
# The machine has no package registry: the wheels and the source come from .gpu/. Results go to $OUT (or bench/results).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/results}"
started=$(date +%s)
source bench/gpu/env.sh
python3 llama.cpp/build.py 2>&1 | tail -n 5
echo "pip + build: $(( $(date +%s) - started )) s"
model=/tmp/random-7b.gguf  # no real model fits the 64 MiB that travel (bench/gpu/prepare.py says why)
python3 -m tests.support.random_gguf "$model" --preset 7b
# What is left of the call's budget (the device tool allows 600 s a command); on its end the bench gets
# SIGTERM and still writes what it measured.
left=$(( started + ${RUN_BUDGET_S:-570} - $(date +%s) ))
# --bin-dir: this tree is not pip-installed, so common.binaries cannot import build.py as mesh_llama_cpp
timeout --signal=TERM "$left" python3 -m bench.bench_product --models "$model" --bin-dir "$(python3 llama.cpp/build.py --print)" --out-dir "$OUT" --name product-gpu-h200 ${BENCH_ARGS:---prompts 1 --max-tokens 64 --ignore-eos} 2>&1 | tee "$OUT/product-gpu-h200.log"
