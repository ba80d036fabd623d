"""Benchmarks, retrieval tasks and fidelity metrics (see issue 5)."""
