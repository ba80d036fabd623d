"""`edgekv generate` and `edgekv chat`: a model's replies through the runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekv.cli.common import (backend_option, console, open_engine, policy_option, positions_option,
                               prefill_bar, sampling_options)
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

    from edgekv.runtime.sampling import Sampler, SamplingConfig
    from edgekv.runtime.tokens import ArtifactTokenizer

    if (prompt is None) == (prompt_file is None):
        raise EdgekvError("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise EdgekvError(f"prompt file {prompt_file} does not exist")
        prompt = prompt_file.read_text()
    if not prompt.strip():
        raise EdgekvError("empty prompt: give some text with --prompt or --prompt-file")
    engine = open_engine(directory, policy, backend, spill_dir=spill_dir, positions=positions)
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        ids = tokenizer.encode(prompt) if raw else tokenizer.chat_prompt([{"role": "user", "content": prompt}])
        sampler = Sampler(SamplingConfig.from_generation_defaults(
            engine.manifest.data["generation"], temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed))
        stream = None if as_json else tokenizer.streamer(lambda text: print(text, end="", flush=True))
        with prefill_bar(len(ids)) as on_prefill:
            tokens, stats = engine.run(ids, max_new_tokens, sampler, tokenizer.eos_ids, tokenizer.decode,
                                       stop=tokenizer.stop_check(stops), on_token=stream, on_prefill=on_prefill)
        text = tokenizer.decode(tokens)
        if as_json:
            print(json.dumps({"text": text, "token_ids": tokens, "stats": stats.to_dict()}))
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
        engine.close()


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
    from edgekv.cli.chat import ChatLoop
    from edgekv.runtime.conversation import Conversation
    from edgekv.runtime.sampling import SamplingConfig
    from edgekv.runtime.tokens import ArtifactTokenizer

    engine = open_engine(directory, policy, backend, spill_dir=spill_dir, positions=positions)
    try:
        tokenizer = ArtifactTokenizer.load(engine.manifest)
        sampling = SamplingConfig.from_generation_defaults(
            engine.manifest.data["generation"], temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed)
        interactive = sys.stdin.isatty()
        if interactive:
            import readline  # noqa: F401 (imported for its effect: line editing and history for input())
        loop = ChatLoop(Conversation(engine, tokenizer, sampling, system), max_new_tokens, interactive, as_json)
        loop.run(input if interactive else _read_stdin_line)
    finally:
        engine.close()


def _read_stdin_line(_prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


