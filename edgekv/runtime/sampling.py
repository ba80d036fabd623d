"""Next-token choice: greedy by default; temperature, top-k, top-p and repetition penalty on request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off (CTRL-style: divide positive logits, multiply negative)
    seed: int | None = None

    @classmethod
    def from_generation_defaults(cls, defaults: dict, **overrides) -> "SamplingConfig":
        """The model's own generation defaults (when it samples by default), then the user's options."""
        values: dict = {}
        if defaults.get("do_sample"):
            for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
                if defaults.get(key) is not None:
                    values[key] = defaults[key]
        elif defaults.get("repetition_penalty") not in (None, 1.0):
            values["repetition_penalty"] = defaults["repetition_penalty"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        c = self.config
        logits = logits.astype(np.float64)
        if c.repetition_penalty != 1.0 and history:
            seen = np.unique(np.asarray(history))
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / c.repetition_penalty,
                                    logits[seen] * c.repetition_penalty)
        if c.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / c.temperature
        if 0 < c.top_k < len(logits):
            kth = np.partition(logits, -c.top_k)[-c.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            cut = order[np.searchsorted(cumulative, c.top_p) + 1:]  # keep the smallest set reaching top_p
            probs[cut] = 0.0
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
