"""edgekv chat: turns that reuse the KV cache, saved sessions, the scripted mode and the terminal."""

import json
import os
import subprocess
from contextlib import contextmanager

import numpy as np
import pexpect
import pytest

from conftest import EDGEKV
from edgekv.core.errors import EdgekvError
from edgekv.evaluation.passkey import FILLER
from edgekv.runtime import session_file
from edgekv.runtime.conversation import Conversation
from edgekv.runtime.engine import Engine
from edgekv.runtime.sampling import SamplingConfig
from edgekv.runtime.session_file import apply_session, load_session, save_session
from edgekv.runtime.tokens import ArtifactTokenizer


@pytest.fixture(scope="module")
def engine(default_artifact):
    engine = Engine.open(default_artifact, "quest")
    yield engine
    engine.close()


def conversation(engine) -> Conversation:
    engine.reset()
    return Conversation(engine, ArtifactTokenizer.load(engine.manifest), SamplingConfig())


def test_each_turn_prefills_only_its_own_tokens(engine):
    chat = conversation(engine)
    first = chat.reply("What is the capital of France?", 16)
    assert "Paris" in first.reply and not first.rebuilt
    # The last reply token is sampled but not yet fed: the cache holds everything before it.
    assert chat.context_tokens == first.stats.prompt_tokens + len(first.tokens) - 1
    before = chat.context_tokens
    expected_new, _ = chat.new_tokens("And of Italy?")
    progress_seen = []

    @contextmanager
    def progress(prompt_tokens):  # as the terminal's prefill bar: told the size, then each count fed
        progress_seen.append(prompt_tokens)
        yield progress_seen.append

    second = chat.reply("And of Italy?", 16, prefill_progress=progress)
    assert "Rome" in second.reply and not second.rebuilt
    assert second.stats.prompt_tokens == len(expected_new) < 20
    assert progress_seen[0] == progress_seen[-1] == len(expected_new)
    assert chat.context_tokens == before + second.stats.prompt_tokens + len(second.tokens) - 1
    # The cache is exactly the conversation so far, as the chat template renders it.
    rendered = chat.tokenizer.chat_text(chat.template_messages("next"))
    assert rendered.startswith(chat.tokenizer.decode_exact(engine.tokens))


def test_a_new_system_prompt_rebuilds_the_cache_once(engine):
    chat = conversation(engine)
    chat.reply("Hello!", 8)
    chat.set_system("You are a pirate.")
    turn = chat.reply("Who are you?", 8)
    assert turn.rebuilt and turn.stats.prompt_tokens == chat.context_tokens - len(turn.tokens) + 1
    assert chat.tokenizer.decode_exact(engine.tokens).startswith("<|im_start|>system\nYou are a pirate.")


def test_a_saved_session_continues_exactly(engine, tmp_path):
    chat = conversation(engine)
    chat.reply("Name three fruits.", 24)
    path = tmp_path / "fruits.edgekv"
    save_session(path, chat)
    assert [p.name for p in tmp_path.iterdir()] == ["fruits.edgekv"]  # no staging file left behind
    want = chat.reply("Which of them is red?", 24)

    fresh = conversation(engine)
    apply_session(load_session(path, engine.manifest), fresh)
    assert fresh.messages[:2] == chat.messages[:2]
    got = fresh.reply("Which of them is red?", 24)
    assert got.tokens == want.tokens and not got.rebuilt
    assert got.stats.prompt_tokens == want.stats.prompt_tokens


def test_bad_session_files_are_refused_and_the_conversation_is_kept(engine, tiny_artifacts, tmp_path):
    chat = conversation(engine)
    chat.reply("Hello!", 8)
    good = tmp_path / "good.edgekv"
    save_session(good, chat)
    truncated = tmp_path / "truncated.edgekv"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    noise = tmp_path / "noise.edgekv"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    flipped = tmp_path / "flipped.edgekv"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the KV arrays: the zip member's CRC-32 catches it
    flipped.write_bytes(bytes(data))
    tiny = Engine.open(tiny_artifacts["llama"], "quest")
    try:
        other = tmp_path / "other.edgekv"
        save_session(other, Conversation(tiny, ArtifactTokenizer.load(tiny.manifest), SamplingConfig()))
    finally:
        tiny.close()

    tokens, messages = list(engine.tokens), [dict(m) for m in chat.messages]
    for path, message in ((truncated, "does not load"), (noise, "does not load"), (flipped, "does not load"),
                          (other, "saved with another artifact"), (tmp_path / "missing", "no session file")):
        with pytest.raises(EdgekvError, match=message):
            load_session(path, engine.manifest)
    assert engine.tokens == tokens and chat.messages == messages


def test_a_failed_save_leaves_the_old_file_in_place(engine, tmp_path, monkeypatch):
    chat = conversation(engine)
    chat.reply("Hello!", 8)
    path = tmp_path / "s.edgekv"
    save_session(path, chat)
    before = path.read_bytes()

    def crash(file, **arrays):
        file.write(b"half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session_file.np, "savez", crash)
    with pytest.raises(EdgekvError, match="cannot save the session.*No space left"):
        save_session(path, chat)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.edgekv"]


def test_scripted_long_conversation_remembers_turn_one(default_artifact):
    """Three turns whose history passes 3K tokens (a long document in turn 1): the last answer needs a
    fact from turn 1, six times the 512-token decode budget away, and each turn prefills only its own text."""
    document = FILLER * 110 + "The pass key is 68521. Remember it. 68521 is the pass key. " + FILLER * 15
    lines = ["Read this document and remember the pass key.", "", document, "Is the document long or short?",
             "What is the pass key in the document?"]
    script = f'"""\n{lines[0]}\n{lines[1]}\n{lines[2]}\n"""\n{lines[3]}\n{lines[4]}\n'
    result = subprocess.run([EDGEKV, "chat", str(default_artifact), "--json", "--max-new-tokens", "30"],
                            input=script, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 3
    assert turns[0]["stats"]["prompt_tokens"] > 3000
    assert turns[-1]["context_tokens"] > 3000
    for previous, turn in zip(turns, turns[1:]):
        assert turn["stats"]["prompt_tokens"] < 40  # only the turn's own message and the chat markup
        assert turn["context_tokens"] == (previous["context_tokens"] + turn["stats"]["prompt_tokens"]
                                          + turn["stats"]["generated_tokens"] - 1)
        assert not turn["cache_rebuilt"]
    assert "68521" in turns[-1]["reply"]


STATUS = r"\[\d+ tokens, [\d.]+ tok/s, [\d.]+ words/s, [\d.]+x reading speed \| prefill \d+ tokens .*\| context (\d+) tokens"


def test_interactive_chat_in_a_terminal(default_artifact, tmp_path):
    session = tmp_path / "chat.edgekv"
    child = pexpect.spawn(EDGEKV, ["chat", str(default_artifact), "--max-new-tokens", "400",
                                   "--spill-dir", str(tmp_path / "spill")],
                          encoding="utf-8", timeout=180, dimensions=(50, 200), env={**os.environ, "TERM": "dumb"})
    try:
        child.expect("you> ")
        child.sendline("What is the capital of France?")
        child.expect("assistant> ")
        child.expect("Paris")
        child.expect(STATUS)
        child.expect("you> ")
        child.sendline(f"/save {session}")
        child.expect("saved (\\d+) tokens")
        saved_tokens = int(child.match.group(1))
        child.sendline("/load /nonexistent/session.edgekv")
        child.expect("error: no session file")
        child.sendline(f"/load {session}")
        child.expect(f"loaded .*1 turns, {saved_tokens} tokens")
        child.expect("you> ")
        child.sendline("Write a very long story about a dragon, with many chapters.")
        child.expect("assistant> ")
        child.expect(r"\w+ \w+ \w+")  # the reply is streaming
        child.sendintr()
        child.expect(STATUS + r".*\[interrupted\]")
        child.expect("you> ")
        child.sendline("/stats")
        child.expect('"turns": 2')
        child.sendline("Thank you!")
        child.expect(STATUS)
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert list((tmp_path / "spill").iterdir()) == []  # the session's spill directory is gone
