"""Generation statistics, and the human reading speed they are compared against."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Human silent reading of non-fiction: 238 words/min (Brysbaert 2019) at 0.75 words per token
# = 5.3 tokens/s. The one definition of reading speed in edgekv: CLI, benchmarks and docs use it.
READING_WORDS_PER_MIN = 238
WORDS_PER_TOKEN = 0.75
READING_SPEED_TOKENS_PER_S = round(READING_WORDS_PER_MIN / 60 / WORDS_PER_TOKEN, 1)


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float  # prompt in -> first token out
    prefill_tok_s: float
    decode_tok_s: float  # tokens after the first, over the time after the first
    words_per_s: float
    reading_speed_ratio: float  # decode_tok_s / READING_SPEED_TOKENS_PER_S
    pages: dict[str, int]  # per tier: device, host, disk
    transfer_bytes: int  # bytes moved into the gather buffers from below the device tier
    graph_s: float
    select_s: float
    gather_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HostTimers:
    """Seconds spent in graph calls, in page selection, and in the rest of the host's work (appending new
    K/V, gathering the budgets, building masks), added up since the last reset."""

    graph_s: float = 0.0
    select_s: float = 0.0
    gather_s: float = 0.0

    def reset(self) -> None:
        self.graph_s = self.select_s = self.gather_s = 0.0
