"""`edgekv eval --task perplexity`: the model's perplexity on a long running text, per window of tokens.

One pass through the text: in each window the last `scored` tokens are fed one decode step at a time,
each step's logits predicting the next token (the prefill graphs return only a chunk's last row), so
each score sees the cache, the selection and the position scheme that generation at that point meets.
Past the trained context a scheme should keep each window's perplexity near that of the windows inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgekv.evaluation.evaluate import EvalPlan, log, plan_runs
from edgekv.evaluation.metrics import log_softmax
from edgekv.evaluation.plots import new_axes, save_figure
from edgekv.runtime.engine import Engine


def window_nll(engine: Engine, tokens: list[int], window: int, scored: int) -> list[np.ndarray]:
    """Per window of `window` tokens, the negative log-likelihood of its last `scored` tokens, each predicted
    by a decode step after every token before it (the rest of the window is prefilled): one pass."""
    engine.reset()
    windows = []
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        first = max(start, end - scored, 1)  # the first scored token (token 0 has no prediction)
        logits = [engine.prefill(tokens[len(engine.tokens):first])]
        logits += [engine.decode(token) for token in tokens[first:end - 1]]
        targets = np.asarray(tokens[first:end])
        windows.append(-log_softmax(np.stack(logits))[np.arange(len(targets)), targets])
    return windows


def run_perplexity(artifact: Path, text: list[int], plan: EvalPlan, window: int, scored: int) -> Iterator[dict]:
    """One row per context, run and window of text[:context]: the perplexity of its last `scored` tokens."""
    for context in plan.contexts:
        tokens = text[:context]
        for run in dict.fromkeys(plan_runs(plan)):
            engine = run.open(artifact, plan.kv_dtype, plan.backend)
            try:
                nll = window_nll(engine, tokens, window, scored)
                fields = run.fields(engine)
            finally:
                engine.close()
            for index, part in enumerate(nll):
                end = min((index + 1) * window, context)
                row = {"task": "perplexity", **fields, "context": context, "window": index,
                       "first_token": end - len(part), "tokens": len(part), "perplexity": float(np.exp(part.mean()))}
                log(f"  perplexity {run.label()} context {context:>6} tokens {end - len(part):>6}-{end - 1:>6}: "
                    f"{row['perplexity']:.2f}")
                yield row


def plot_perplexity(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = new_axes()
    key = ("policy", "positions", "local_window", "context")
    for run in dict.fromkeys(tuple(r[k] for k in key) for r in rows):
        mine = [r for r in rows if tuple(r[k] for k in key) == run]
        policy, positions, window, context = run
        ax.plot([r["first_token"] + r["tokens"] for r in mine], [r["perplexity"] for r in mine], "o-",
                label=f"{policy} ({positions}, window {window}), {context} tokens")
    ax.set_xlabel("position in the text (end of each window)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")  # a scheme that breaks reaches thousands; the working ones differ by percent
    save_figure(fig, ax, path, title)
