"""Task generators (the answer is in the prompt, at its depth and length), the metrics on hand-computed
cases, budgets below the artifact's, and a small end-to-end `edgekv eval` on a tiny model."""

import json
import math
from contextlib import contextmanager

import numpy as np
import pytest

from conftest import run_edgekv
from edgekv.core.errors import EdgekvError
from edgekv.evaluation.evaluate import EvalPlan, record_rows, run_retrieval
from edgekv.evaluation.metrics import log_softmax, mean_kl, perplexity, top1_agreement
from edgekv.evaluation.perplexity import window_nll
from edgekv.evaluation.tasks import TASKS, task_prompt
from edgekv.runtime.engine import Engine


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_the_answer_is_in_the_prompt_at_its_depth(tokenizer, task, length):
    encode = lambda text: tokenizer(text).input_ids  # noqa: E731
    for depth in (0.0, 0.5, 1.0):
        prompt = task_prompt(task, encode, length, depth, seed=3)
        assert 0.9 * length <= len(prompt.tokens) <= length
        text = tokenizer.decode(prompt.tokens)
        first = text.find(prompt.answer)
        assert first >= 0
        # The answer's first mention sits at the stated depth of the text (within the question's share).
        body = text.rfind(prompt.answer) if task == "retrieve-kv" else first
        assert abs(body / len(text) - depth) < 0.12, (task, depth, body / len(text))
    assert task_prompt(task, encode, length, 0.5, seed=3) == task_prompt(task, encode, length, 0.5, seed=3)
    assert task_prompt(task, encode, length, 0.5, seed=4).answer != task_prompt(task, encode, length, 0.5, seed=3).answer


def test_retrieve_kv_asks_for_the_key_of_its_answer(tokenizer):
    prompt = task_prompt("retrieve-kv", lambda t: tokenizer(t).input_ids, 2048, 0.3, seed=1)
    text = tokenizer.decode(prompt.tokens)
    key = text.rsplit('Key: "', 1)[1].split('"')[0]
    assert f'"{key}": "{prompt.answer}"' in text


def test_metrics_on_hand_computed_cases():
    reference = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    same = reference + 3.0  # a constant shift changes no probability
    assert top1_agreement(same, reference) == 1.0 and mean_kl(same, reference) == pytest.approx(0.0, abs=1e-12)
    other = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    assert top1_agreement(other, reference) == 0.5
    # KL(p || q) on the first row: 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) = 0.25 ln 2; the second row adds 0.
    assert mean_kl(other, reference) == pytest.approx(0.25 * math.log(2) / 2)
    # Perplexity: tokens with probabilities 0.5 and 0.7 -> exp(-(ln 0.5 + ln 0.7) / 2).
    assert perplexity(reference, np.array([0, 2])) == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.7)) / 2))


def test_a_smaller_budget_masks_the_rest_and_is_exact_while_the_context_fits(tiny_artifacts):
    prompt = list(range(3, 300))
    runs = {}
    for budget in (None, 48):
        engine = Engine.open(tiny_artifacts["llama"], "quest", budget=budget)
        try:
            runs[budget] = [engine.prefill(prompt[:40])] + [engine.decode(t) for t in prompt[40:44]]
            runs[budget].append(engine.prefill(prompt[44:]))
        finally:
            engine.close()
    # 44 tokens fit a 48-token budget: the same logits; at 297 tokens the 48-token budget selects.
    np.testing.assert_allclose(np.stack(runs[None][:5]), np.stack(runs[48][:5]), atol=1e-5)
    assert np.abs(runs[None][-1] - runs[48][-1]).max() > 1e-3
    with pytest.raises(EdgekvError, match="budget 8 is outside this artifact's range 40..512"):
        Engine.open(tiny_artifacts["llama"], "quest", budget=8)


def test_retrieval_reports_each_prompts_prefill_as_it_goes(tiny_artifacts):
    """A long prompt's prefill takes minutes: run_retrieval hands each prompt's length to the progress
    context it is given (the CLI's progress bar) and the engine's chunks to the callback it yields."""
    seen: list[tuple[int, list[int]]] = []

    @contextmanager
    def progress(tokens: int):
        seen.append((tokens, []))
        yield seen[-1][1].append

    plan = EvalPlan([300], [0.0, 1.0], [512], ["quest"])
    rows = list(run_retrieval(tiny_artifacts["llama"], "passkey", plan, prefill_progress=progress))
    assert [tokens for tokens, _ in seen] == [row["context"] for row in rows]
    for tokens, done in seen:
        assert done == sorted(done) and done[-1] == tokens and len(done) > 1  # 64-token chunks


def test_eval_end_to_end_on_a_tiny_model(tiny_artifacts, tmp_path):
    artifact = str(tiny_artifacts["llama"])
    result = run_edgekv("eval", artifact, "--task", "retrieve-number", "--contexts", "256", "--depths", "0.5",
                        "--budgets", "48,512", "--policies", "quest,dense", "--positions", "absolute,clamped",
                        "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    rows = report["rows"]
    assert report["complete"]
    assert [(r["policy"], r["budget"], r["positions"]) for r in rows] == [
        ("quest", 48, "absolute"), ("quest", 48, "clamped"), ("quest", 512, "absolute"), ("quest", 512, "clamped"),
        ("dense", None, "absolute")]
    assert all(len(r["answer"]) == 10 and isinstance(r["correct"], bool) for r in rows)
    # 256 tokens are inside the tiny model's trained 512: the clamped scheme keeps every position
    assert rows[0]["reply"] == rows[1]["reply"] and rows[2]["reply"] == rows[3]["reply"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

    text = tmp_path / "text.txt"
    text.write_text("The robot painted the sky. " * 200)
    result = run_edgekv("eval", artifact, "--task", "agreement", "--contexts", "300", "--budgets", "48,512",
                        "--policies", "quest", "--text", str(text), "--scored-tokens", "8", "--json",
                        str(tmp_path / "a.json"), "--local-windows", "0,16")
    assert result.returncode == 0, result.stderr
    rows = {(r["budget"], r["local_window"]): r for r in json.loads((tmp_path / "a.json").read_text())["rows"]}
    assert sorted(rows, key=str) == sorted([(None, 0), (48, 0), (48, 16), (512, 0), (512, 16)], key=str)
    assert rows[None, 0]["policy"] == "dense" and rows[None, 0]["top1_agreement"] == 1.0
    # 300 tokens fit a 512-token budget: dense attention exactly, with or without a window
    assert rows[512, 0]["mean_kl"] < 1e-6 and rows[512, 16]["mean_kl"] < 1e-6
    assert rows[48, 0]["mean_kl"] > rows[512, 0]["mean_kl"]


@pytest.mark.parametrize("policy", ["dense", "quest"])
def test_window_scores_are_those_of_decoding_the_text_token_by_token(tiny_artifacts, policy):
    """Each window's scored tokens get the log-likelihood a decode step gives them after every token before
    (the rest prefilled); 200 tokens fit the budget, so quest is exact attention too."""
    tokens = [int(t) for t in np.random.default_rng(5).integers(3, 200, 200)]
    engine = Engine.open(tiny_artifacts["llama"], policy)
    try:
        windows = window_nll(engine, tokens, 64, 16)
        engine.reset()
        logits = np.stack([engine.decode(token) for token in tokens[:-1]])
    finally:
        engine.close()
    every = -log_softmax(logits)[np.arange(len(tokens) - 1), tokens[1:]]  # every[i]: token i + 1
    assert [len(w) for w in windows] == [16, 16, 16, 8]
    for index, scores in enumerate(windows):
        end = min((index + 1) * 64, len(tokens))
        np.testing.assert_allclose(scores, every[end - len(scores) - 1:end - 1], atol=2e-4)


def test_eval_perplexity_per_window(tiny_artifacts, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The robot number {i} painted the sky {i % 7} times." for i in range(300)))
    result = run_edgekv("eval", str(tiny_artifacts["llama"]), "--task", "perplexity", "--contexts", "300",
                        "--window", "100", "--scored-tokens", "20", "--policies", "quest,dense", "--budgets", "48,512",
                        "--text", str(text), "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    windows = {(r["policy"], r["budget"]): [] for r in rows}
    for r in rows:
        windows[r["policy"], r["budget"]].append((r["first_token"], r["tokens"], r["perplexity"]))
    assert [w[:2] for w in windows["dense", None]] == [(80, 20), (180, 20), (280, 20)]
    # 300 tokens fit a budget of 512: the same perplexities as dense; a budget of 48 attends over less
    np.testing.assert_allclose([w[2] for w in windows["quest", 512]], [w[2] for w in windows["dense", None]],
                               rtol=1e-4)
    assert windows["quest", 48][2][2] != pytest.approx(windows["dense", None][2][2], rel=1e-4)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,message", [
    (["--task", "agreement", "--contexts", "300", "--text", "/nonexistent.txt"], "text file /nonexistent.txt does not exist"),
    (["--task", "passkey", "--depths", "0.5,2"], "--depths must lie between 0 and 1"),
    (["--task", "passkey", "--contexts", "9000"], "the dense baseline stops at 512 tokens"),
    (["--task", "passkey", "--positions", "absolute,relative"],
     "unknown position scheme 'relative' in --positions; choose from: absolute, clamped, folded, grouped"),
    (["--task", "passkey", "--contexts", "256", "--policies", "quest", "--local-windows", "12"],
     "local window 12 must be a multiple of 8 (the page size), >= 0"),
    (["--task", "perplexity", "--contexts", "9000000", "--policies", "quest"],
     "Python's language reference has"),
])
def test_eval_bad_input(tiny_artifacts, args, message):
    result = run_edgekv("eval", str(tiny_artifacts["llama"]), *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_a_stopped_eval_keeps_the_rows_it_measured(tmp_path):
    def measured():
        yield {"policy": "quest", "budget": 128, "correct": True}
        yield {"policy": "quest", "budget": 512, "correct": False}
        raise KeyboardInterrupt  # Ctrl-C during the third run

    path = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        record_rows(measured(), path, {"task": "passkey"})
    report = json.loads(path.read_text())
    assert report["task"] == "passkey" and report["complete"] is False
    assert [r["budget"] for r in report["rows"]] == [128, 512]
    assert record_rows(iter(report["rows"]), path, {"task": "passkey"}) == report["rows"]
    assert json.loads(path.read_text())["complete"] is True
