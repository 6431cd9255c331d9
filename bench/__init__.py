"""Sluice's benchmarks: `python -m bench [gateway|backpressure|quotas ...]` (bench/README.md)."""
