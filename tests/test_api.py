"""The Python API (edgekv.api) and the server's store of conversations' caches, on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from edgekv.api import Model
from edgekv.runtime.tokens import ReplyText
from edgekv.server.conversations import ConversationStore


@pytest.fixture(scope="module")
def model(tiny_artifacts, tmp_path_factory):
    with Model.open(tiny_artifacts["llama"], "quest", spill_dir=tmp_path_factory.mktemp("spill")) as model:
        yield model


def test_reply_text_holds_back_what_may_start_a_stop_string_and_cuts_at_it(model):
    tokens = model.tokenizer.encode_continuation("the quick brown fox jumps over the lazy dog")
    full = ReplyText(model.tokenizer)
    assert "".join(full.add(t) for t in tokens) + full.rest() == model.tokenizer.decode(tokens)
    assert not full.stopped
    stopped = ReplyText(model.tokenizer, ("fox", "lazy"))
    shown = ""
    for token in tokens:
        shown += stopped.add(token)
        assert not shown.endswith("f") and not shown.endswith("fo")  # never half a stop string
        if stopped.stopped:
            break
    assert stopped.stopped and shown == stopped.text == "the quick brown "


def test_generate_streams_the_text_it_returns_and_says_why_it_ended(model):
    pieces: list[str] = []
    reply = model.generate([{"role": "user", "content": "hello there"}], max_new_tokens=5,
                           sampling=model.sampling(temperature=0), on_text=pieces.append)
    assert "".join(pieces) == reply.text and len(reply.tokens) <= 5
    assert reply.finish_reason == ("stop" if reply.tokens[-1] in model.tokenizer.eos_ids else "length")
    cut = model.generate("the quick", max_new_tokens=50, sampling=model.sampling(temperature=1.0, seed=0),
                         cancelled=lambda: True)
    assert len(cut.tokens) == 1 and cut.finish_reason in ("cancelled", "stop")


def logits_after(model: Model, store: ConversationStore, text: str) -> tuple[int, np.ndarray]:
    placed = store.place(text)
    return placed.reused, model.engine.prefill(placed.new)


def test_stored_conversations_spill_to_files_come_back_exact_and_are_dropped_whole(model, tmp_path):
    chat = model.tokenizer.chat_text
    first = chat([{"role": "user", "content": "the quick brown fox"}])
    second = chat([{"role": "user", "content": "a lazy dog sleeps"}])
    store = ConversationStore(model.engine, model.tokenizer, tmp_path / "store", memory_bytes=0, disk_bytes=2**30)
    model.engine.reset()
    assert logits_after(model, store, first)[0] == 0
    follow_up = first + " and more words"
    reused_live, live = logits_after(model, store, follow_up)  # the live cache extended, nothing copied
    assert reused_live == len(model.tokenizer.encode_continuation(first))
    logits_after(model, store, second)  # another conversation (sharing the template's start): the first is stored
    assert store.disk_used > 0 and store.memory_used == 0 and len(list((tmp_path / "store").iterdir())) == 1
    reused, restored = logits_after(model, store, follow_up)  # back from its file
    assert reused == len(model.engine.tokens) - 1  # all of it but the last token, fed again for its logits
    np.testing.assert_array_equal(restored, live)
    store.disk_bytes = 0  # nothing may stay in files: every stored conversation is dropped, each whole
    assert logits_after(model, store, first)[0] > 0
    assert store.dropped == 3 and not store.stored and list((tmp_path / "store").iterdir()) == []
