"""Where page records live: slots in RAM up to the host budget, and a spill file on disk beyond it.

A record is one page of one layer in page_format.PageFormat's layout (float32, or INT8 with its scales);
RAM and the spill file hold the same records, so spilling a page and reading it back changes no byte.
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import numpy as np

from edgekv.core.errors import EdgekvError
from edgekv.runtime.page_format import PageFormat

KV_SPILL_FILE = "kv-spill.bin"  # in a session's directory (make_session_dir)
RELEASE_RECORDS = 256  # records a spill file stores or loads between two releases of its mapped pages


class HostArena:
    """Page records in RAM: slots handed out once (the array is allocated at full capacity, and np.zeros
    maps untouched memory lazily, so RAM is used only as pages arrive and slots never move). A page leaves
    RAM only by spilling, which hands its slot straight to the page that needed one (tiers.py)."""

    def __init__(self, page_format: PageFormat, capacity: int):
        self.capacity = capacity
        self.records = np.zeros(capacity, dtype=page_format.record)
        self.k, self.v = self.records["k"], self.records["v"]  # field views, made once: decode writes through them
        # The records as rows of their element type, keys first: a kernel reads them with a unit stride,
        # where a field view's stride is the record's (numba does not vectorize such loops).
        element = np.int8 if page_format.quantized else np.float32
        assert page_format.record.fields["k"][1] == 0
        self.rows = self.records.view(element).reshape(capacity, -1)
        self.used = 0  # slots handed out so far

    def take(self) -> int | None:
        """A slot never used, so still zeros (a fresh page's unwritten rows are gathered, then masked, until
        filled: they must hold finite values, which the additive mask can hide), or None when RAM is full."""
        if self.used == self.capacity:
            return None
        slot, self.used = self.used, self.used + 1
        return slot


class SpillFile:
    """Page records in a memory-mapped file, grown by doubling; freed slots are reused. The file's pages a
    store or load touches stay mapped into the process, and count in its RSS, until released: every
    RELEASE_RECORDS records the mapping drops them (the data stays in the file and the OS's page cache,
    which it may reclaim), so the process holds the host budget in RAM and not the disk tier too."""

    def __init__(self, path: Path, record: np.dtype):
        self.path = path
        self.record = record
        self.capacity = 0
        self.next_slot = 0
        self.free: list[int] = []
        self.mapping: mmap.mmap | None = None
        self.array: np.ndarray | None = None
        self.touched = 0  # records stored or loaded since the last release
        path.touch()

    def _grow(self) -> None:
        self.capacity = max(64, self.capacity * 2)
        with open(self.path, "r+b") as f:
            f.truncate(self.capacity * self.record.itemsize)
            # the old mapping closes once no view of it is left (a MAP_SHARED mapping: nothing to flush)
            self.mapping = mmap.mmap(f.fileno(), self.capacity * self.record.itemsize)
        self.array = np.frombuffer(self.mapping, dtype=self.record)

    def _touch(self) -> None:
        self.touched += 1
        if self.touched == RELEASE_RECORDS:
            self.mapping.madvise(mmap.MADV_DONTNEED)
            self.touched = 0

    def store(self, record: np.ndarray) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            if self.next_slot == self.capacity:
                self._grow()
            slot, self.next_slot = self.next_slot, self.next_slot + 1
        self.array[slot] = record
        self._touch()
        return slot

    def load(self, slot: int) -> np.ndarray:
        """Read a page record back and free its slot (a copy: the slot may be reused at once)."""
        record = self.array[[slot]][0]  # fancy indexing copies (an integer index would give a view)
        self.free.append(slot)
        self._touch()
        return record

    def close(self) -> None:
        self.array = self.mapping = None
        self.path.unlink(missing_ok=True)


def make_session_dir(spill_dir: Path | str | None) -> Path:
    """A fresh directory for the session's spill file, under spill_dir (default: the system temp dir)."""
    parent = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir())
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="edgekv-session-", dir=parent))
    except OSError as e:
        raise EdgekvError(f"cannot write the spill directory {parent} ({e.strerror}); pass a writable "
                          "--spill-dir") from None
