"""The device pool's accounting: which pages an NPU would already hold, and the bytes it must be sent.

The pool is the LRU of recently gathered pages, with the profile's device capacity; on an NPU it is the
memory the graph reads, and a page gathered from outside it is a transfer, whose bytes are counted. On
this CPU-only host it is bookkeeping over host memory: what it measures is how many bytes an NPU would
move per token. Its stamps live in the page table (device_stamp); eviction is batched, down to
DEVICE_EVICT_TO of capacity in one compiled pass over them, so keeping the LRU costs little per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekv.runtime.kernels.pages import NOT_ON_DEVICE, evict_oldest
from edgekv.runtime.page_table import PageTable

DEVICE_EVICT_TO = 0.95


@dataclass
class DevicePool:
    capacity: int  # pages
    page_bytes: int  # bytes of one stored page: what a transfer from the host or disk tier moves
    pages: int = 0
    transfer_bytes: int = 0

    def arrived(self, table: PageTable, count: int) -> None:
        """`count` pages were just stamped onto the device: count their bytes, keep within capacity."""
        if not count:
            return
        self.transfer_bytes += count * self.page_bytes
        self.pages += count
        if self.pages > self.capacity:
            excess = self.pages - int(self.capacity * DEVICE_EVICT_TO)
            evict_oldest(table.device_stamp, max(table.n_pages), excess)
            self.pages -= excess

    def forget(self, table: PageTable, layer: int, page: int) -> None:
        """A page left the host (spilled to disk): it is no longer on the device either."""
        if table.device_stamp[layer, page] != NOT_ON_DEVICE:
            table.device_stamp[layer, page] = NOT_ON_DEVICE
            self.pages -= 1
