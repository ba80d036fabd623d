"""The host runtime over real artifacts: exactness against dense and transformers, spilling, static
shapes at any context, retrieval, and bad input."""

import json
import re
import shutil
import signal
import subprocess
import time
import warnings

import numpy as np
import pytest
from threadpoolctl import ThreadpoolController

from conftest import EDGEKV, run_edgekv
from edgekv.core.constants import POLICIES
from edgekv.core.errors import EdgekvError
from edgekv.core.manifest import load_verified
from edgekv.evaluation.passkey import passkey_prompt
from edgekv.runtime.engine import Engine
from edgekv.runtime.page_format import PageFormat
from edgekv.runtime.sampling import Sampler, SamplingConfig
from edgekv.runtime.selection import select_pages
from edgekv.runtime.tokens import ArtifactTokenizer
from test_export import NEW_TOKENS, reference

GREEDY = SamplingConfig()


def generate(artifact, policy, prompt, new_tokens=NEW_TOKENS, **engine_options):
    engine = Engine.open(artifact, policy, **engine_options)
    try:
        tokens = list(engine.generate(prompt, new_tokens, Sampler(GREEDY), eos_ids=set()))
        return tokens, engine.cache.usage().pages, engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def story_prompt(default_model):
    messages = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
    return default_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_every_policy_equals_transformers_while_the_context_fits(default_artifact, default_model,
                                                                           story_prompt):
    want, _ = reference(default_model, story_prompt)
    for policy in POLICIES:
        tokens, _, _ = generate(default_artifact, policy, story_prompt)
        assert tokens == want, policy


def test_spilled_run_gives_the_same_tokens(default_artifact, story_prompt, tmp_path):
    in_memory, counts, _ = generate(default_artifact, "quest", story_prompt)
    assert counts["disk"] == 0
    manifest = load_verified(default_artifact)
    page_bytes = 2 * manifest.model["kv_heads"] * manifest.profile.page_size * manifest.model["head_dim"] * 4
    spilled, counts, engine = generate(default_artifact, "quest", story_prompt, spill_dir=tmp_path,
                                       host_kv_bytes=100 * page_bytes)
    assert counts["disk"] > 0 and engine.cache.usage().pages_spilled > 0
    assert spilled == in_memory
    assert list(tmp_path.iterdir()) == []  # the session directory and its spill file are gone


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_rerank_beyond_its_budget_reads_spilled_pages_exactly(tiny_artifacts, tmp_path, kv_dtype):
    """rerank reads the keys of its shortlist on the host: with most pages spilled to disk it computes the
    very logits it computes in memory, and they are not quest's (the re-ranking changed the selection)."""
    prompt = np.random.default_rng(4).integers(3, 300, 400).tolist()
    manifest = load_verified(tiny_artifacts["llama"])
    page_bytes = PageFormat(kv_dtype, manifest.model["kv_heads"], manifest.profile.page_size,
                            manifest.model["head_dim"]).page_bytes

    def run(policy, **options):
        engine = Engine.open(tiny_artifacts["llama"], policy, spill_dir=tmp_path, budget=64, kv_dtype=kv_dtype,
                             **options)
        try:
            steps = [engine.prefill(prompt)] + [engine.decode(token) for token in (5, 6, 7)]
            usage = engine.cache.usage()
            return np.stack(steps), usage.pages_spilled, usage.pages_restored
        finally:
            engine.close()

    in_memory, spilled_none, _ = run("rerank")
    spilled, pages_spilled, pages_restored = run("rerank", host_kv_bytes=100 * page_bytes)
    assert spilled_none == 0 and pages_spilled > 0 and pages_restored > 0
    np.testing.assert_array_equal(spilled, in_memory)
    assert not np.array_equal(run("quest")[0], in_memory)


def test_graph_inputs_keep_their_shapes_from_1k_to_16k(tiny_artifacts):
    engine = Engine.open(tiny_artifacts["llama"], "quest")
    try:
        def bound_shapes():
            step = engine.decode_step
            return ({k: v.shape for k, v in step.buffers.items()},
                    [tuple(a.shape for a in arrays) for arrays in step.layer_kv])

        rng = np.random.default_rng(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.prefill(rng.integers(3, 300, 1024).tolist())
            engine.decode(5)
            at_1k = bound_shapes()
            engine.prefill(rng.integers(3, 300, 15 * 1024).tolist())
            logits = engine.decode(5)
        assert len(engine.tokens) == 16 * 1024 + 2
        assert bound_shapes() == at_1k
        step = engine.decode_step
        assert [k.shape for k, _, _ in step.layer_kv] == [(2, g.budget, 16) for g in step.graphs[1:]]
        assert np.isfinite(logits).all()
        # Past the trained context (512 for the tiny model): one warning, not one per step.
        assert sum("trained context" in str(w.message) for w in caught) == 1
    finally:
        engine.close()


def test_quest_retrieves_a_pass_key_beyond_its_budget(default_artifact):
    # 2K tokens against a decode budget of 512 (prefill 1024): selection is really at work.
    engine = Engine.open(default_artifact, "quest")
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        prompt = passkey_prompt(tokenizer.encode, 2048, 0.5, 68521).tokens
        assert 2000 < len(prompt) <= 2048
        tokens = list(engine.generate(prompt, 8, Sampler(GREEDY), eos_ids=set()))
        assert "68521" in tokenizer.decode(tokens)
    finally:
        engine.close()


def test_generate_json_reports_the_stats(default_artifact):
    result = run_edgekv("generate", str(default_artifact), "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Paris" in out["text"] and len(out["token_ids"]) <= 12
    stats = out["stats"]
    for key in ("prompt_tokens", "generated_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s", "words_per_s",
                "reading_speed_ratio", "pages", "transfer_bytes", "graph_s", "select_s", "gather_s"):
        assert key in stats
    assert stats["reading_speed_ratio"] == pytest.approx(stats["decode_tok_s"] / 5.3)
    assert set(stats["pages"]) == {"device", "host", "disk"}


@pytest.mark.parametrize("args,message", [
    (["--prompt", "   "], "empty prompt"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt file /nonexistent/prompt.txt does not exist"),
    (["--prompt", "hi", "--spill-dir", "/proc/edgekv"], "cannot write the spill directory /proc/edgekv"),
])
def test_generate_bad_input(default_artifact, args, message):
    result = run_edgekv("generate", str(default_artifact), *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr


def test_artifact_of_another_format_version_is_refused(tiny_artifacts, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_artifacts["llama"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 0
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgekvError, match="artifact format 0.*re-export it"):
        Engine.open(copy, "quest")


def test_unknown_policy_is_refused(tiny_artifacts):
    with pytest.raises(EdgekvError, match="unknown policy 'sparse'"):
        Engine.open(tiny_artifacts["llama"], "sparse")


def test_a_failed_open_leaves_no_session_directory(tiny_artifacts, tmp_path):
    def failing_backend(manifest, threads):
        raise EdgekvError("no such accelerator")

    with pytest.raises(EdgekvError, match="no such accelerator"):
        Engine.open(tiny_artifacts["llama"], "quest", spill_dir=tmp_path, backend=failing_backend)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_stopped_generation_exits_cleanly(default_artifact, tmp_path, stop, code):
    process = subprocess.Popen([EDGEKV, "generate", str(default_artifact), "--prompt", "Tell me a very long story.",
                                "--max-new-tokens", "2000", "--temperature", "0.8", "--seed", "1",
                                "--spill-dir", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # A suite started in the background (`cmd &` without job control) runs with
                               # SIGINT ignored, and children inherit that: give the CLI a user's terminal's.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = process.stdout.read(1)  # streaming has started
    assert first
    assert any(tmp_path.iterdir())  # the session directory exists while generating
    time.sleep(1)
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    assert "Traceback" not in err
    assert ("interrupted" in err) == (stop == signal.SIGINT)
    assert list(tmp_path.iterdir()) == []


def test_reselect_replaces_the_selection_of_every_step(tiny_artifacts):
    """A quest engine whose selections are replaced by streaming's (the hook benchmarks/selection_oracle.py
    uses) computes exactly the logits of the streaming policy, in prefill and decode, on a context far
    beyond the budget, where quest's own differ."""
    prompt = np.random.default_rng(3).integers(3, 300, 900).tolist()

    def logits(policy, reselect=None):
        engine = Engine.open(tiny_artifacts["llama"], policy)
        engine.cache.reselect = reselect
        try:
            steps = [engine.prefill(prompt)]
            steps += [engine.decode(token) for token in (5, 6, 7)]
            return np.stack(steps), len(engine.cache.layers)
        finally:
            engine.close()

    calls = []

    def as_streaming(layer, q, store, selection):
        calls.append(layer)
        return select_pages("streaming", q, store.metadata.full, store.n_pages, selection.first_new,
                            selection.middle.shape[1] + 1 + store.n_pages - selection.first_new)

    streaming, layers = logits("streaming")
    hooked, _ = logits("quest", as_streaming)
    np.testing.assert_array_equal(hooked, streaming)
    assert not np.array_equal(logits("quest")[0], streaming)  # the hook is what made them equal
    assert set(calls) == set(range(layers))


def test_the_status_line_after_a_streamed_reply_starts_its_own_line(default_artifact):
    """With stdout and stderr on one stream (a terminal, or `2>&1 | tee`), the reply ends its line before
    the status line."""
    result = subprocess.run([EDGEKV, "generate", str(default_artifact), "--prompt", "What is the capital of France?",
                             "--max-new-tokens", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].strip()  # a reply that does not end in a newline of its own
    assert any(re.match(r"\d+ tokens, [\d.]+ tok/s decode", line) for line in lines), lines


def test_prefill_reports_its_progress_chunk_by_chunk(tiny_artifacts):
    """on_chunk sees the prompt's tokens fed so far after every chunk (the first holds the remainder),
    then the whole prompt; the logits are those of a prefill without it."""
    prompt = np.random.default_rng(4).integers(3, 300, 300).tolist()
    engine = Engine.open(tiny_artifacts["llama"], "quest")
    try:
        chunk = engine.prefill_step.seq_len
        seen = []
        with_progress = engine.prefill(prompt, on_chunk=seen.append)
        engine.reset()
        np.testing.assert_array_equal(engine.prefill(prompt), with_progress)
    finally:
        engine.close()
    body = len(prompt) - 1
    assert body % chunk and body > chunk  # a remainder chunk and full ones
    assert seen == [*range(body % chunk, body + 1, chunk), len(prompt)]


def test_the_host_blas_runs_on_one_thread_while_the_graphs_run(tiny_artifacts):
    """OpenBLAS's idle threads spin after a product and would take the cores from the graph call after a
    prefill chunk's page scores: every graph runs with the BLAS held to one thread, restored after."""
    controller = ThreadpoolController()
    before = [pool.num_threads for pool in controller.select(user_api="blas").lib_controllers]
    engine = Engine.open(tiny_artifacts["llama"], "quest")
    seen = []
    engine.on_graph = lambda graph, inputs: seen.extend(
        pool.num_threads for pool in ThreadpoolController().select(user_api="blas").lib_controllers)
    try:
        engine.prefill(np.random.default_rng(5).integers(3, 300, 200).tolist())
        engine.decode(7)
    finally:
        engine.close()
    assert before and seen and set(seen) == {1}
    assert [pool.num_threads for pool in ThreadpoolController().select(user_api="blas").lib_controllers] == before
