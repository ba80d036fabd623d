"""Compiled kernels of the host's per-layer, per-token work, each beside a short numpy reference of what it
computes (`*_reference`), which tests/test_kernels.py holds it equal to.

They run on a few hundred pages per layer and token, cold after a graph call has streamed the weights
through the caches, where numpy's per-call cost (temporaries, fancy indexing, several passes) outweighs
the work; benchmarks/RESULTS.md has the measurements.
"""
