#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with carry [".gpu"]: llama-bench over one rpc-server,
# plain TCP against our patch's mutual TLS (bench/gpu/tls_probe.py). A second call on the still-warm
# machine reuses the build in /tmp/tls-probe (PROBE_ARGS="--variant bench/gpu/variants/X.patch").
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-bench/results}"
source bench/gpu/env.sh
model=/tmp/random-7b.gguf
[ -f "$model" ] || python3 -m tests.support.random_gguf "$model" --preset 7b
python3 -m bench.gpu.tls_probe --model "$model" --out "$OUT" ${PROBE_ARGS:-} 2>&1 | tee -a "$OUT/tls-probe.log"
