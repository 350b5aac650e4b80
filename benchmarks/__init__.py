"""Benchmark suite for xdlm's loss, sampler step and training throughput on this machine.

Run `python -m benchmarks.run [--quick]`; results go to benchmarks/results/*.json and the tables
in docs/performance.md. Every run measures its baselines side by side in the same process.
"""
