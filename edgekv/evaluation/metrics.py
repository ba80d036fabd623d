"""Fidelity of a policy's next-token distributions against dense attention's, on the same tokens."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of positions where both pick the same most likely token. logits [positions, vocab]."""
    return float((logits.argmax(axis=-1) == reference.argmax(axis=-1)).mean())


def mean_kl(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean KL(reference || policy) over positions, in nats."""
    ref, mine = log_softmax(reference), log_softmax(logits)
    return float((np.exp(ref) * (ref - mine)).sum(axis=-1).mean())


def perplexity(logits: np.ndarray, next_tokens: np.ndarray) -> float:
    """exp of the mean negative log-likelihood of next_tokens[i] under logits[i]."""
    logp = log_softmax(logits)[np.arange(len(next_tokens)), next_tokens]
    return float(np.exp(-logp.mean()))
