"""Benchmarks of the data plane (`python -m bench.bench_rpc`)."""
