"""Benchmarks of the fast path: queue overhead, throughput, idle cost (see bench/README.md)."""
