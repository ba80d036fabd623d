"""Page bookkeeping and copies: the page table's LRU stamps, the device pool's eviction, a budget buffer's
slot assignment, and the copy of stored page records into the graphs' float32 KV inputs."""

from __future__ import annotations

import numpy as np
from numba import njit

# The page table's codes (tiers.py): where a page's record is, and a device stamp for "not on the device".
HOST, DISK = 0, 1
NOT_ON_DEVICE = -1
EMPTY = -1  # a budget buffer's free middle slot (budget.py)
WANTED, PRESENT = 1, 2  # assign_slots' per-page state bits


def stamp_used_reference(last_used: np.ndarray, tier: np.ndarray, pages: np.ndarray, clock: int) -> int:
    """Stamp pages (repeats allowed) as last used at `clock`; returns how many of the entries are on disk."""
    last_used[pages] = clock
    return int((tier[pages] == DISK).sum())


@njit(cache=True)
def stamp_used(last_used: np.ndarray, tier: np.ndarray, pages: np.ndarray, clock: int) -> int:
    """stamp_used_reference as one loop (numpy's fancy index, comparison and sum cost more than the work)."""
    on_disk = 0
    for page in pages:
        last_used[page] = clock
        on_disk += tier[page] == DISK
    return on_disk


def stamp_fetched_reference(last_used: np.ndarray, tier: np.ndarray, device_stamp: np.ndarray, pages: np.ndarray,
                            clock: int) -> tuple[int, int]:
    """stamp_used, and stamp the pages as on the device at `clock`; returns how many of the entries are on
    disk and how many distinct pages were not on the device before."""
    arrived = int((device_stamp[np.unique(pages)] == NOT_ON_DEVICE).sum())
    device_stamp[pages] = clock
    return stamp_used_reference(last_used, tier, pages, clock), arrived


@njit(cache=True)
def stamp_fetched(last_used: np.ndarray, tier: np.ndarray, device_stamp: np.ndarray, pages: np.ndarray,
                  clock: int) -> tuple[int, int]:
    """stamp_fetched_reference as one loop (a repeated page finds the stamp its first entry left)."""
    arrived = 0
    for page in pages:
        arrived += device_stamp[page] == NOT_ON_DEVICE
        device_stamp[page] = clock
    return stamp_used(last_used, tier, pages, clock), arrived


def evict_oldest_reference(device_stamp: np.ndarray, n_pages: int, excess: int) -> None:
    """Take the `excess` pages of oldest stamp off the device (device_stamp [layers, >= n_pages]); among pages
    of the same stamp, the first in layer-major order leave first."""
    stamps = device_stamp[:, :n_pages].copy()  # layer-major, flat
    flat = stamps.reshape(-1)
    on = np.flatnonzero(flat != NOT_ON_DEVICE)
    flat[on[np.argsort(flat[on], kind="stable")[:excess]]] = NOT_ON_DEVICE
    device_stamp[:, :n_pages] = stamps


@njit(cache=True)
def evict_oldest(device_stamp: np.ndarray, n_pages: int, excess: int) -> None:
    """evict_oldest_reference by one partition of the stamps instead of a sort, in one compiled pass."""
    layers = device_stamp.shape[0]
    stamps = np.empty(layers * n_pages, np.int64)
    count = 0
    for layer in range(layers):
        for page in range(n_pages):
            if device_stamp[layer, page] != NOT_ON_DEVICE:
                stamps[count] = device_stamp[layer, page]
                count += 1
    cutoff = np.partition(stamps[:count], excess - 1)[excess - 1]  # the newest stamp that leaves
    # Every page stamped before the cutoff leaves, and as many stamped at it (one fetch stamps many) as
    # make up the excess.
    at_cutoff = excess - np.sum(stamps[:count] < cutoff)
    for layer in range(layers):
        for page in range(n_pages):
            stamp = device_stamp[layer, page]
            if stamp != NOT_ON_DEVICE and (stamp < cutoff or (stamp == cutoff and at_cutoff > 0)):
                at_cutoff -= stamp == cutoff
                device_stamp[layer, page] = NOT_ON_DEVICE


def assign_slots_reference(table: np.ndarray, middle: np.ndarray, n_pages: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Update table [kv_heads, slot-pages] in place to hold middle [kv_heads, m] (pages < n_pages): slots
    whose page left the selection are freed, and each arriving page takes the lowest free slot, in
    middle's order. Returns the arrivals as (head, slot-page of the buffer, page) arrays: the pages to copy
    in (the buffer's slot-page is the table's plus one: slot-page 0 is the sink's)."""
    arrivals = []  # (head, slot-page, page)
    for head in range(table.shape[0]):
        wanted = list(middle[head])
        table[head, ~np.isin(table[head], wanted)] = EMPTY
        for page in wanted:
            if page not in table[head]:
                free = int(np.flatnonzero(table[head] == EMPTY)[0])
                table[head, free] = page
                arrivals.append((head, 1 + free, page))
    return tuple(np.array([a[i] for a in arrivals], np.int64) for i in range(3))


@njit(cache=True)
def assign_slots(table: np.ndarray, middle: np.ndarray, n_pages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """assign_slots_reference in two passes per head over a page-state array (numpy's masks, sorts and fancy
    indexing over the same few hundred entries cost far more)."""
    heads, slots = table.shape
    m = middle.shape[1]
    rows = np.empty(heads * m, np.int64)
    slot_pages = np.empty(heads * m, np.int64)
    pages = np.empty(heads * m, np.int64)
    arrived = 0
    state = np.zeros(n_pages, np.int8)  # per page, for the head at hand: WANTED, or WANTED | PRESENT
    for head in range(heads):
        for j in range(m):
            state[middle[head, j]] = WANTED
        for slot in range(slots):
            page = table[head, slot]
            if page != EMPTY and state[page] == WANTED:
                state[page] = WANTED | PRESENT
            else:
                table[head, slot] = EMPTY
        free = 0
        for j in range(m):
            page = middle[head, j]
            if state[page] == WANTED:  # arriving: into the lowest free slot
                while table[head, free] != EMPTY:
                    free += 1
                table[head, free] = page
                rows[arrived], slot_pages[arrived], pages[arrived] = head, 1 + free, page
                arrived += 1
            state[page] = 0
    return rows[:arrived], slot_pages[:arrived], pages[:arrived]


def plan_copies_reference(table: np.ndarray, middle: np.ndarray, first_new: int, n_pages: int, slot_pages: int,
                          copy_sink: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every page a budget buffer of `slot_pages` slot-pages copies in for a selection, as (page, head,
    slot-page) arrays: the middle pages that arrive (assign_slots_reference, which updates the table), the
    pages the step writes, first_new..n_pages-1, for every head into the last slot-pages in order, and with
    copy_sink the sink, page 0, into slot-page 0."""
    heads = table.shape[0]
    arriving_heads, arriving_slots, arriving = assign_slots_reference(table, middle, n_pages)
    new = np.arange(first_new, n_pages)
    new_slots = slot_pages - len(new) + np.arange(len(new))
    sink = np.zeros(heads if copy_sink else 0, np.int64)
    return (np.concatenate([arriving, new.repeat(heads), sink]),
            np.concatenate([arriving_heads, np.tile(np.arange(heads), len(new)), np.arange(len(sink))]),
            np.concatenate([arriving_slots, new_slots.repeat(heads), sink]))


@njit(cache=True)
def plan_copies(table: np.ndarray, middle: np.ndarray, first_new: int, n_pages: int, slot_pages: int,
                copy_sink: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """plan_copies_reference in one compiled call (a decode step's dozen small numpy calls cost more)."""
    heads = table.shape[0]
    arriving_heads, arriving_slots, arriving = assign_slots(table, middle, n_pages)
    n_new = n_pages - first_new
    total = len(arriving) + heads * n_new + (heads if copy_sink else 0)
    pages, page_heads, slots = np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int64)
    pages[:len(arriving)], page_heads[:len(arriving)], slots[:len(arriving)] = arriving, arriving_heads, arriving_slots
    i = len(arriving)
    for j in range(n_new):
        for head in range(heads):
            pages[i], page_heads[i], slots[i] = first_new + j, head, slot_pages - n_new + j
            i += 1
    if copy_sink:
        for head in range(heads):
            pages[i], page_heads[i], slots[i] = 0, head, 0
            i += 1
    return pages, page_heads, slots


def copy_pages_reference(keys: np.ndarray, values: np.ndarray, k_scale: np.ndarray | None, v_scale: np.ndarray | None,
                         slots: np.ndarray, heads: np.ndarray, k_out: np.ndarray, v_out: np.ndarray,
                         out_pages: np.ndarray, is_open: np.ndarray | None = None, open_k: np.ndarray | None = None,
                         open_v: np.ndarray | None = None) -> None:
    """Record slots[i]'s KV head heads[i] (keys, values [records, kv_heads, page_size, head_dim]; INT8 times
    their scales [records, kv_heads, head_dim] and [records, kv_heads, page_size], else None) into
    k_out/v_out [kv_heads, pages, page_size, head_dim] at [heads[i], out_pages[i]], as float32. INT8 pages:
    the entries where `is_open` are the page being written, copied from its float32 rows open_k/open_v
    [kv_heads, page_size, head_dim] instead of its record."""
    full = np.ones(len(slots), bool) if is_open is None else ~is_open
    k, v = keys[slots[full], heads[full]].astype(np.float32), values[slots[full], heads[full]].astype(np.float32)
    if k_scale is not None:
        k *= k_scale[slots[full], heads[full]][:, None, :]
        v *= v_scale[slots[full], heads[full]][:, :, None]
    k_out[heads[full], out_pages[full]], v_out[heads[full], out_pages[full]] = k, v
    if is_open is not None:
        k_out[heads[is_open], out_pages[is_open]] = open_k[heads[is_open]]
        v_out[heads[is_open], out_pages[is_open]] = open_v[heads[is_open]]


@njit(cache=True)
def copy_float_pages(keys, values, slots, heads, k_out, v_out, out_pages) -> None:
    """copy_pages_reference of float32 records, four page-heads at a time: their sources lie scattered in
    memory, and more streams in flight hide more of the latency. Element loops, not slice assignments:
    the record fields are strided views, for which numba's slice copy is generic code."""
    page_size, head_dim = keys.shape[2], keys.shape[3]
    n = len(slots)
    done = 0
    while done + 4 <= n:
        s0, s1, s2, s3 = slots[done], slots[done + 1], slots[done + 2], slots[done + 3]
        h0, h1, h2, h3 = heads[done], heads[done + 1], heads[done + 2], heads[done + 3]
        o0, o1, o2, o3 = out_pages[done], out_pages[done + 1], out_pages[done + 2], out_pages[done + 3]
        for t in range(page_size):
            for d in range(head_dim):
                k_out[h0, o0, t, d] = keys[s0, h0, t, d]
                k_out[h1, o1, t, d] = keys[s1, h1, t, d]
                k_out[h2, o2, t, d] = keys[s2, h2, t, d]
                k_out[h3, o3, t, d] = keys[s3, h3, t, d]
                v_out[h0, o0, t, d] = values[s0, h0, t, d]
                v_out[h1, o1, t, d] = values[s1, h1, t, d]
                v_out[h2, o2, t, d] = values[s2, h2, t, d]
                v_out[h3, o3, t, d] = values[s3, h3, t, d]
        done += 4
    for i in range(done, n):
        slot, head, out = slots[i], heads[i], out_pages[i]
        for t in range(page_size):
            for d in range(head_dim):
                k_out[head, out, t, d] = keys[slot, head, t, d]
                v_out[head, out, t, d] = values[slot, head, t, d]


@njit(cache=True)
def copy_int8_pages(keys, values, k_scale, v_scale, slots, heads, k_out, v_out, out_pages, pages, open_page, open_k,
                    open_v) -> None:
    """copy_pages_reference of INT8 records, dequantized as they are copied, with is_open = (pages ==
    open_page): the page being written comes from its float32 rows in the same pass (numpy's masks and
    fancy indexing for those few rows cost more than the whole copy)."""
    page_size, head_dim = keys.shape[2], keys.shape[3]
    for i in range(len(slots)):
        slot, head, out = slots[i], heads[i], out_pages[i]
        if pages[i] == open_page:
            for t in range(page_size):
                for d in range(head_dim):
                    k_out[head, out, t, d] = open_k[head, t, d]
                    v_out[head, out, t, d] = open_v[head, t, d]
            continue
        for t in range(page_size):
            for d in range(head_dim):
                k_out[head, out, t, d] = keys[slot, head, t, d] * k_scale[slot, head, d]
                v_out[head, out, t, d] = values[slot, head, t, d] * v_scale[slot, head, t]
