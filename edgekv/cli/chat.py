"""`edgekv chat`: the terminal conversation loop over a Conversation.

Interactive on a terminal (streamed replies, a status line after each); scripted otherwise: each input
line is one user turn, replies go to standard output (status lines to standard error), or with --json
one object per turn. A block between two lines of three double quotes is one message (for pasting
documents). Lines starting with '/' are commands in both modes.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from edgekv.cli.common import prefill_bar
from edgekv.core.errors import EdgekvError
from edgekv.runtime.conversation import Conversation, Turn
from edgekv.runtime.session_file import apply_session, load_session, save_session
from edgekv.runtime.stats import READING_SPEED_TOKENS_PER_S
from edgekv.runtime.tokens import ReplyText

HELP = f"""commands:
  /help           this text
  /reset          start a new conversation (the system prompt stays)
  /stats          full statistics of the last reply and of the session
  /system TEXT    set the system prompt (the cache is rebuilt on the next turn)
  /save PATH      save the conversation and its KV cache
  /load PATH      continue a saved conversation
  /exit           leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C during a reply stops it; the partial reply stays in the history. Paste a long text between two
lines of three double quotes (\"\"\"). Reading speed: {READING_SPEED_TOKENS_PER_S} tokens/s."""
BLOCK = '"""'


def status_line(turn: Turn, conversation: Conversation) -> str:
    s, pages = turn.stats, turn.stats.pages
    flags = (" [interrupted]" if turn.interrupted else "") + (" [cache rebuilt]" if turn.rebuilt else "")
    return (f"[{s.generated_tokens} tokens, {s.decode_tok_s:.1f} tok/s, {s.words_per_s:.1f} words/s, "
            f"{s.reading_speed_ratio:.1f}x reading speed | prefill {s.prompt_tokens} tokens in {s.ttft_s:.2f} s | "
            f"context {conversation.context_tokens} tokens | pages device/host/disk "
            f"{pages['device']}/{pages['host']}/{pages['disk']}]{flags}")


def session_stats(conversation: Conversation) -> dict:
    usage = conversation.engine.cache.usage()
    return {"turns": conversation.turns, "generated_tokens": conversation.generated_tokens,
            "context_tokens": conversation.context_tokens, "pages": usage.pages,
            "transfer_bytes": usage.transfer_bytes, "pages_spilled": usage.pages_spilled,
            "pages_restored": usage.pages_restored, "policy": conversation.engine.policy}


class ReplyInterrupt:
    """While active, Ctrl-C sets a flag (polled between tokens) instead of raising mid graph call, so
    the KV cache never holds half a step."""

    def __init__(self) -> None:
        self.hit = False
        self._previous = None

    def __enter__(self) -> "ReplyInterrupt":
        self.hit = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)


def read_messages(read_line: Callable[[str], str], prompt: str) -> Iterator[str]:
    """User inputs: single lines, or a block between two BLOCK lines joined with newlines."""
    while True:
        line = read_line(prompt)
        if line.strip() != BLOCK:
            yield line
            continue
        block = []
        while (line := read_line("... ")).strip() != BLOCK:
            block.append(line)
        yield "\n".join(block)


@dataclass
class ChatLoop:
    conversation: Conversation
    max_new_tokens: int
    interactive: bool
    as_json: bool
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    last: Turn | None = None
    interrupt: ReplyInterrupt = field(default_factory=ReplyInterrupt)

    def info(self, text: str) -> None:
        """Messages that are not replies: on the terminal when interactive, else on standard error."""
        print(text, file=self.out if self.interactive else self.err, flush=True)

    def run(self, read_line: Callable[[str], str]) -> None:
        if self.interactive:
            self.info("edgekv chat: /help for commands, Ctrl-D to leave")
        try:
            for message in read_messages(read_line, "you> " if self.interactive else ""):
                if message.startswith("/"):
                    if not self.command(message):
                        return
                elif message.strip():
                    try:
                        self.turn(message)
                    except EdgekvError as e:  # the history only records turns that completed
                        self.info(f"error: {e}")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, end of input, or Ctrl-C at the prompt
            if self.interactive:
                self.info("")

    def turn(self, message: str) -> None:
        stream = None
        if not self.as_json:
            # The "assistant> " label comes with the first token, after any prefill progress bar is gone.
            label = ["assistant> "] if self.interactive else []

            def write(text: str) -> None:
                print(label.pop() if label else "", text, sep="", end="", file=self.out, flush=True)

            text = ReplyText(self.conversation.tokenizer)

            def stream(token: int) -> None:
                write(text.add(token))
        with self.interrupt:
            turn = self.conversation.reply(message, self.max_new_tokens, on_token=stream,
                                           interrupted=lambda: self.interrupt.hit,
                                           prefill_progress=prefill_bar if self.interactive else None)
        self.last = turn
        if self.as_json:
            print(json.dumps({"reply": turn.reply, "token_ids": turn.tokens, "interrupted": turn.interrupted,
                              "cache_rebuilt": turn.rebuilt, "context_tokens": self.conversation.context_tokens,
                              "stats": turn.stats.to_dict()}), file=self.out, flush=True)
        else:
            print(file=self.out, flush=True)
            self.info(status_line(turn, self.conversation))

    def command(self, line: str) -> bool:
        """Run one /command; False means leave. Errors are reported and change nothing."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        try:
            if name in ("/exit", "/quit"):
                return False
            if name == "/help":
                self.info(HELP)
            elif name == "/reset":
                self.conversation.reset()
                self.info("new conversation")
            elif name == "/stats":
                stats = {"last_reply": self.last.stats.to_dict() if self.last else None,
                         "session": session_stats(self.conversation)}
                if self.as_json:
                    print(json.dumps(stats), file=self.out, flush=True)
                else:
                    self.info(json.dumps(stats, indent=1))
            elif name == "/system":
                if not argument:
                    raise EdgekvError("usage: /system TEXT")
                self.conversation.set_system(argument)
                self.info("system prompt set")
            elif name == "/save":
                if not argument:
                    raise EdgekvError("usage: /save PATH")
                size = save_session(Path(argument).expanduser(), self.conversation)
                self.info(f"saved {self.conversation.context_tokens} tokens to {argument} ({size / 2**20:.1f} MiB)")
            elif name == "/load":
                if not argument:
                    raise EdgekvError("usage: /load PATH")
                saved = load_session(Path(argument).expanduser(), self.conversation.engine.manifest)
                apply_session(saved, self.conversation)
                self.last = None
                self.info(f"loaded {argument}: {self.conversation.turns} turns, "
                          f"{self.conversation.context_tokens} tokens")
            else:
                raise EdgekvError(f"unknown command {name}; /help lists them")
        except EdgekvError as e:
            self.info(f"error: {e}")
        return True
