"""The runtime's seams: a second graph backend (one that cannot bind numpy memory and copies, as a vendor
simulator does) gives the very logits of the onnxruntime one, and both KV caches, paged and static, pass
the same interface checks."""

import numpy as np
import onnxruntime as ort
import pytest

from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import GraphEntry, Manifest
from edgekv.runtime.backend import Buffers, OnnxruntimeBackend
from edgekv.runtime.engine import Engine
from edgekv.runtime.kv_cache import StaticCache
from edgekv.runtime.paged_cache import PagedCache

PROMPT = list(np.random.default_rng(11).integers(3, 300, 150))


class CopyingBackend:
    """Runs each graph with plain InferenceSession.run: inputs copied in from the engine's buffers, outputs
    copied back into them. Counts its runs, and records that the engine closed it."""

    def __init__(self, manifest: Manifest, threads: int):
        self.inner = OnnxruntimeBackend.open(manifest, threads)
        self.runs = 0
        self.closed = False

    def bind(self, graph: GraphEntry, inputs: Buffers, outputs: Buffers):
        session = self.inner.session(graph)
        names = list(outputs)

        def run() -> None:
            results = session.run(names, {name: array.copy() for name, array in inputs.items()})
            for name, result in zip(names, results):
                np.copyto(outputs[name], result)
            self.runs += 1

        return run

    def close(self) -> None:
        self.closed = True  # the inner sessions stay, for the test to inspect


def step_logits(artifact, policy, **options):
    engine = Engine.open(artifact, policy, **options)
    try:
        logits = [engine.prefill(PROMPT)] + [engine.decode(token) for token in (5, 6, 7)]
        return np.stack(logits), engine
    finally:
        engine.close()


@pytest.mark.parametrize("policy", ["quest", "dense"])
def test_a_copying_backend_computes_what_iobinding_does(tiny_artifacts, policy):
    want, _ = step_logits(tiny_artifacts["llama"], policy)
    got, engine = step_logits(tiny_artifacts["llama"], policy, backend=CopyingBackend)
    np.testing.assert_array_equal(got, want)
    layers = engine.manifest.model["layers"]
    assert engine.backend.runs == (3 + 4) * (layers + 1)  # 150 tokens: 3 prefill chunks, then 4 decode steps
    assert engine.backend.closed
    assert isinstance(engine.backend.inner.sessions[engine.manifest.variant("budget-decode")[0].name],
                      ort.InferenceSession)


@pytest.mark.parametrize("policy", ["quest", "dense"])
def test_both_caches_honour_the_interface(tiny_artifacts, policy):
    """append, prepare, snapshot, restore and reset, through the engine and directly: the cache holds what
    was appended, a restored cache continues exactly, a reset one starts over exactly."""
    artifact = tiny_artifacts["llama"]
    engine = Engine.open(artifact, policy)
    try:
        assert isinstance(engine.cache, StaticCache if policy == "dense" else PagedCache)
        first = engine.prefill(PROMPT)
        kv = engine.cache.snapshot()
        model = engine.manifest.model
        assert len(kv) == model["layers"]
        assert all(k.shape == v.shape == (model["kv_heads"], len(PROMPT), model["head_dim"]) for k, v in kv)
        after = engine.decode(9)
        engine.restore(PROMPT, kv)
        np.testing.assert_array_equal(engine.decode(9), after)
        engine.reset()
        np.testing.assert_array_equal(engine.prefill(PROMPT), first)
        usage = engine.cache.usage()
        assert set(usage.pages) == set(usage.kv_bytes) == {"device", "host", "disk"}
        assert sum(usage.kv_bytes.values()) > 0
    finally:
        engine.close()


def test_the_static_cache_refuses_a_context_past_its_size(tiny_artifacts):
    engine = Engine.open(tiny_artifacts["llama"], "dense")
    try:
        with pytest.raises(EdgekvError, match="static context is 512 tokens"):
            engine.prefill([5] * 600)
    finally:
        engine.close()


def test_a_bound_call_outlives_its_backend(tiny_artifacts):
    """The sessions read weights the backend holds: a call bound on a backend nothing else keeps must still
    compute what one on a kept backend does."""
    import gc

    from edgekv.core.manifest import load_verified

    manifest = load_verified(tiny_artifacts["llama"])
    graph = manifest.graphs[manifest.variant("budget-decode")[1].name]
    rng = np.random.default_rng(0)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in graph.inputs}
    want = {spec.name: np.zeros(spec.shape, np.float32) for spec in graph.outputs}
    got = {name: np.zeros_like(array) for name, array in want.items()}
    kept = OnnxruntimeBackend.open(manifest)
    kept.bind(graph, feeds, want)()
    run = OnnxruntimeBackend.open(manifest).bind(graph, feeds, got)
    gc.collect()
    _ = [np.ones(1 << 20) for _ in range(20)]  # reuse the memory a freed weight array would have held
    run()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
