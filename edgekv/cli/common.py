"""What the commands share: the consoles, option groups, and the parsing of DIR and comma-separated lists."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click
from rich.console import Console

from edgekv.core.constants import BACKENDS, DEFAULT_POLICY, POLICIES, POSITION_SCHEMES
from edgekv.core.errors import EdgekvError
from edgekv.runtime.positions import FOLD_TOKENS, GROUP_TOKENS

POLICY_HELP = ("rerank: Quest's shortlist re-ranked by attention (finds what dense finds where quest can miss "
               "it); quest: Quest page selection (the fastest); streaming: the sink and the "
               "most recent pages; dense: the full-context baseline graphs.")

console = Console(stderr=True)


def policy_option(command):
    """--policy, one of POLICIES, for the commands that run one engine."""
    return click.option("--policy", type=click.Choice(list(POLICIES)), default=DEFAULT_POLICY, show_default=True,
                        help=POLICY_HELP)(command)
out = Console(soft_wrap=True)


PROGRESS_PROMPT_TOKENS = 2048  # prompts from this long get a prefill progress bar (tens of seconds and more)


@contextmanager
def prefill_bar(prompt_tokens: int) -> Iterator[Callable[[int], None] | None]:
    """An on_prefill callback that draws a progress bar on stderr while a long prompt is prefilled (gone
    once the prompt is in, before the reply streams); None for a short prompt."""
    if prompt_tokens < PROGRESS_PROMPT_TOKENS:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("prefill"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("prefill", total=prompt_tokens)

        def advance(done: int) -> None:
            progress.update(task, completed=done)
            if done == prompt_tokens:
                progress.stop()

        yield advance


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def sampling_options(command):
    """Sampling options shared by generate and chat; unset ones fall back to the model's defaults."""
    for option in reversed([
        click.option("--temperature", type=float, default=None, help="0 = greedy (default unless the model says)."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
    ]):
        command = option(command)
    return command


def backend_option(command):
    """--backend, shared by the commands that run a model."""
    return click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
                        help="cpu: onnxruntime's CPU provider; qnn-htp, openvino, rknn: the graphs `edgekv compile` "
                             "made for that target [default: the profile's runtime.backend if compiled, "
                             "else cpu].")(command)


def parse_policies(text: str) -> list[str]:
    """--policies: known policy names, comma-separated."""
    policies = text.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise EdgekvError(f"unknown policy '{unknown[0]}' in --policies; choose from: {', '.join(POLICIES)}")
    return policies


POSITIONS_HELP = ("Where the paged cache's keys sit for the queries: absolute (each at its own position), clamped "
                  "(keys older than the near window at one position inside the trained context), folded (at "
                  f"{FOLD_TOKENS} positions, keeping the order of neighbouring keys) or grouped ({GROUP_TOKENS} "
                  "far keys to a position, in order) [default: the profile's].")


def positions_option(command):
    """--positions, one scheme, for the commands that run one engine."""
    return click.option("--positions", type=click.Choice(list(POSITION_SCHEMES)), default=None,
                        help=POSITIONS_HELP)(command)


def parse_positions(text: str | None, default: str) -> tuple[str, ...]:
    """--positions of eval: known position schemes, comma-separated (none given: the profile's)."""
    schemes = tuple(text.split(",")) if text else (default,)
    unknown = [s for s in schemes if s not in POSITION_SCHEMES]
    if unknown:
        raise EdgekvError(f"unknown position scheme '{unknown[0]}' in --positions; choose from: "
                          f"{', '.join(POSITION_SCHEMES)}")
    return schemes


def int_list(text: str, option: str, smallest: int = 2) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise EdgekvError(f"{option} takes comma-separated integers, e.g. 1024,4096") from None
    if any(v < smallest for v in values):
        raise EdgekvError(f"{option} values must be at least {smallest} tokens")
    return values

