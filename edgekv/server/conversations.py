"""The KV caches of recent conversations, so that a request extending one prefills only its new tokens.

The engine holds one cache, the live conversation's. The others are kept as exact copies of their keys
and values (Engine.kv_snapshot), least recently used first out: in memory up to `memory_bytes`, then in
files up to `disk_bytes`, then dropped, each always as a whole. A request is served from whichever cache
shares the longest prefix with the text its messages render to (the rule of `edgekv chat`, extended to
any prefix: a repeated request, or one whose last reply was cut at a stop string, reuses all but what
changed). At least the prompt's last token is always fed again, so that its logits come out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import numpy as np

from edgekv.runtime.engine import Engine
from edgekv.runtime.tokens import ArtifactTokenizer

KV = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Stored:
    tokens: list[int]
    kv: KV | None  # None: in `path`
    path: Path | None
    nbytes: int


@dataclass
class Placed:
    """What the engine holds for a request: `reused` prompt tokens kept, `new` tokens to feed."""

    reused: int
    new: list[int]


class ConversationStore:
    def __init__(self, engine: Engine, tokenizer: ArtifactTokenizer, directory: Path, memory_bytes: int,
                 disk_bytes: int):
        """memory_bytes bounds the stored caches in memory and the live one together."""
        self.engine, self.tokenizer = engine, tokenizer
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.memory_bytes, self.disk_bytes = memory_bytes, disk_bytes
        self.stored: OrderedDict[int, Stored] = OrderedDict()  # least recently used first
        self.ids = count()
        self.dropped = 0  # caches dropped whole past disk_bytes

    def shared_prefix(self, tokens: list[int], text: str) -> int:
        """The most leading tokens whose text is a prefix of `text` (binary search: a longer prefix's text
        is a prefix only if every shorter one's is)."""
        low, high = 0, len(tokens)
        while low < high:
            mid = (low + high + 1) // 2
            if text.startswith(self.tokenizer.decode_exact(tokens[:mid])):
                low = mid
            else:
                high = mid - 1
        return low

    def place(self, text: str) -> Placed:
        """Make the engine hold the cache that shares the longest prefix with `text`, cut to that prefix;
        the live conversation is stored first unless it is taken whole. Returns what is reused and what
        is left to feed."""
        engine = self.engine
        best_id, tokens = None, engine.tokens
        reused = self.shared_prefix(tokens, text)
        for key, entry in self.stored.items():
            shared = self.shared_prefix(entry.tokens, text)
            if shared > reused:
                best_id, tokens, reused = key, entry.tokens, shared
        if reused and len(self.tokenizer.decode_exact(tokens[:reused])) == len(text):
            reused -= 1  # the whole prompt is cached: feed its last token again, for its logits
        if best_id is not None:
            entry = self.stored[best_id]
            kv = self._read(entry)
            if reused == len(entry.tokens):  # taken whole: it is the live conversation now
                self._forget(best_id)
            else:  # a prefix of it: it stays stored too
                self.stored.move_to_end(best_id)
            if engine.tokens:
                self._keep(engine.tokens, engine.kv_snapshot())
            engine.restore(tokens[:reused], [(k[:, :reused], v[:, :reused]) for k, v in kv])
        elif reused < len(tokens):  # the live conversation shares less than all of itself with the request
            kv = engine.kv_snapshot()
            self._keep(tokens, kv)
            if reused:
                engine.restore(tokens[:reused], [(k[:, :reused], v[:, :reused]) for k, v in kv])
            else:
                engine.reset()
        self._bound()
        new = self.tokenizer.encode_continuation(text[len(self.tokenizer.decode_exact(tokens[:reused])):])
        return Placed(reused, new)

    def _keep(self, tokens: list[int], kv: KV) -> None:
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        self.stored[next(self.ids)] = Stored(list(tokens), kv, None, nbytes)

    def _read(self, entry: Stored) -> KV:
        if entry.kv is not None:
            return entry.kv
        arrays = np.load(entry.path)
        return [(arrays[layer, 0], arrays[layer, 1]) for layer in range(arrays.shape[0])]

    def _forget(self, key: int) -> None:
        entry = self.stored.pop(key)
        if entry.path is not None:
            entry.path.unlink()

    def _bound(self) -> None:
        """Spill the least recently used caches to files once they and the live one pass memory_bytes; drop
        them past disk_bytes."""
        in_memory = [e for e in self.stored.values() if e.kv is not None]
        live = self.engine.cache.usage().kv_bytes
        over = sum(e.nbytes for e in in_memory) + live.get("host", 0) + live.get("device", 0) - self.memory_bytes
        for entry in in_memory:
            if over <= 0:
                break
            entry.path = self.directory / f"{next(self.ids)}.npy"
            np.save(entry.path, np.stack([np.stack(pair) for pair in entry.kv]))
            entry.kv, over = None, over - entry.nbytes
        on_disk = [(key, e) for key, e in self.stored.items() if e.kv is None]
        over = sum(e.nbytes for _, e in on_disk) - self.disk_bytes
        for key, entry in on_disk:
            if over <= 0:
                break
            self._forget(key)
            over -= entry.nbytes
            self.dropped += 1

    @property
    def memory_used(self) -> int:
        return sum(e.nbytes for e in list(self.stored.values()) if e.kv is not None)  # list(): read from another thread

    @property
    def disk_used(self) -> int:
        return sum(e.nbytes for e in list(self.stored.values()) if e.kv is None)
