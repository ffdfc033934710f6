"""Helpers shared by the tests and the benchmarks: processes and ports, llama.cpp binaries,
random-weight GGUF models, and a delay-injecting TCP relay."""
