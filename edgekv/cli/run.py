"""`edgekv generate` and `edgekv chat`: a model's replies through the runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekv.cli.common import backend_option, console, policy_option, positions_option, prefill_bar, sampling_options
from edgekv.core.errors import EdgekvError


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--prompt", default=None, help="The prompt text.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is, without the chat template.")
@policy_option
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--stop", "stops", multiple=True, help="Stop when the reply contains this text (repeatable).")
@click.option("--spill-dir", type=click.Path(path_type=Path), default=None,
              help="Where the session directory for spilled KV pages goes [default: system temp].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token_ids, stats.")
@positions_option
@backend_option
@sampling_options
def generate(directory, prompt, prompt_file, raw, policy, max_new_tokens, stops, spill_dir, as_json, positions,
             backend, temperature, top_k, top_p, repetition_penalty, seed) -> None:
    """Generate a reply through the static graphs with the paged KV cache."""
    import json

    from edgekv.api import Model

    if (prompt is None) == (prompt_file is None):
        raise EdgekvError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise EdgekvError(f"prompt file {prompt_file} does not exist")
        prompt = prompt_file.read_text()
    if not prompt.strip():
        raise EdgekvError("empty prompt: give some text with --prompt or --prompt-file")
    model = Model.open(directory, policy, backend, positions, spill_dir)
    try:
        ids = model.prompt_tokens(prompt if raw else [{"role": "user", "content": prompt}])
        sampling = model.sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        show = None if as_json else (lambda text: print(text, end="", flush=True))
        with prefill_bar(len(ids)) as on_prefill:
            reply = model.generate(ids, max_new_tokens, sampling, stops, on_text=show, on_prefill=on_prefill)
        stats = reply.stats
        if as_json:
            print(json.dumps({"text": reply.text, "token_ids": reply.tokens, "finish_reason": reply.finish_reason,
                              "stats": stats.to_dict()}))
        else:
            print(flush=True)  # the status line goes to stderr: end the reply first
            console.print(f"[dim]{stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s decode "
                          f"({stats.reading_speed_ratio:.1f}x reading speed), {stats.words_per_s:.1f} words/s, "
                          f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tok_s:.0f} tok/s, "
                          f"pages device/host/disk {stats.pages['device']}/{stats.pages['host']}/"
                          f"{stats.pages['disk']}[/dim]")
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted[/yellow]")
        sys.exit(130)
    finally:
        model.close()


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--system", default=None, help="System prompt [default: the chat template's own].")
@policy_option
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Longest reply.")
@click.option("--spill-dir", type=click.Path(path_type=Path), default=None,
              help="Where the session directory for spilled KV pages goes [default: system temp].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per turn: reply and stats.")
@positions_option
@backend_option
@sampling_options
def chat(directory, system, policy, max_new_tokens, spill_dir, as_json, positions, backend, temperature, top_k,
         top_p, repetition_penalty, seed) -> None:
    """Talk to an exported model; the conversation keeps its KV cache from turn to turn, without limit.

    On a terminal: an interactive chat (/help lists the commands). Otherwise each input line is one
    user turn and replies go to standard output.
    """
    from edgekv.api import Model
    from edgekv.cli.chat import ChatLoop

    model = Model.open(directory, policy, backend, positions, spill_dir)
    try:
        sampling = model.sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        interactive = sys.stdin.isatty()
        if interactive:
            import readline  # noqa: F401 (imported for its effect: line editing and history for input())
        loop = ChatLoop(model.chat(system, sampling), max_new_tokens, interactive, as_json)
        loop.run(input if interactive else _read_stdin_line)
    finally:
        model.close()


def _read_stdin_line(_prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


