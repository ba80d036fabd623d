"""Page selection policies: which pages of a layer enter the graph's fixed KV budget this step.

A selection always holds the sink page (page 0) and the pages the step writes (the current, partly
filled page in decode; every page a prefill chunk covers), and between them `middle` pages chosen by
the policy, the same number for every KV head. While the context fits in the budget every page is
selected, which is exactly dense attention.

- quest: the pages of highest Quest bound (an upper bound of q·k over the page, from its key min/max).
- rerank: Quest's shortlist of a few times the free room (RERANK_SHORTLIST_*), re-ranked by the
  attention the step's query rows really give each page (softmax over the shortlist, the sink and the
  step's pages). A bound adds each channel's largest product, which can come from different keys, so
  on repeated text many filler pages bound as high as the one page a question needs; their true
  attention does not (benchmarks/selection_oracle.py). It reads the shortlist's keys: a cost that
  stops growing once the context passes the shortlist.
- streaming: the most recent pages (StreamingLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from edgekv.runtime.pages import bfloat16_value, float32_from_bits, widen_bfloat16
from edgekv.runtime.tiers import LayerKeys

POLICIES = ("quest", "rerank", "streaming", "dense")
# rerank reads the keys of this many times the free room, per KV head: 4 for one query row (decode), 8
# for a prefill chunk, whose one selection serves all its rows (with 4 in prefill, Retrieve.Number at
# 8000 tokens lost one number of three; benchmarks/RESULTS.md).
RERANK_SHORTLIST_ROW, RERANK_SHORTLIST_CHUNK = 4, 8
# Rows per KV head (the group's query heads times the step's tokens) up to which a step counts as decode
# sized: its products take a different form than a prefill chunk's hundreds of rows.
FEW_ROWS = 16
SCORE_CHANNELS = 16  # channels the compiled decode score takes a pass (few_row_bound_scores)


@dataclass
class Selection:
    """The pages of one layer and step: sink (page 0, when the step does not write it), `middle`
    [kv_heads, m] wholly in the past (any order), and the pages the step writes, first_new..n_pages-1."""

    middle: np.ndarray
    first_new: int
    n_pages: int

    @property
    def has_sink(self) -> bool:
        return self.first_new > 0

    def pages(self) -> np.ndarray:
        """Every selected page, [kv_heads, k], sorted per head."""
        heads = self.middle.shape[0]
        sink = np.zeros((heads, int(self.has_sink)), dtype=np.int64)
        new = np.broadcast_to(np.arange(self.first_new, self.n_pages, dtype=np.int64),
                              (heads, self.n_pages - self.first_new))
        return np.concatenate([sink, np.sort(self.middle, axis=1), new], axis=1)


def quest_page_scores(q: np.ndarray, bounds: np.ndarray, pages: slice) -> np.ndarray:
    """Quest's upper bound of q·k over each page of `pages`, aggregated per KV head.

    q [q_heads, rows, head_dim] (post-RoPE, real rows only); bounds [kv_heads, 2*head_dim, >= pages.stop],
    each page's per-channel key max then min as bfloat16 bits (PageStore.bounds). The bound
    sum_i max(q_i*max_i, q_i*min_i) equals relu(q)·max + min(q, 0)·min. The G query heads of a KV head's
    group, and all rows of a prefill chunk, are aggregated with max: a page is worth keeping if any of them
    wants it. Returns [kv_heads, len(pages)].

    A decode step's few rows are scored by a compiled loop that reads, per channel, only the bound row
    each query row needs (for a head_dim that is a multiple of SCORE_CHANNELS, as every supported model's
    is); a prefill chunk's many rows by one batched product of [relu(q), min(q, 0)] with the widened bounds
    (BLAS).
    """
    kv_heads = bounds.shape[0]
    grouped = q.reshape(kv_heads, -1, q.shape[-1])  # [kv_heads, G*rows, head_dim]
    if grouped.shape[1] <= FEW_ROWS and q.shape[-1] % SCORE_CHANNELS == 0:
        scores = np.empty((kv_heads, pages.stop - pages.start), np.float32)
        few_row_bound_scores(np.ascontiguousarray(grouped), np.ascontiguousarray(bounds), pages.start,
                             pages.stop, scores)
        return scores
    split = np.concatenate([np.maximum(grouped, 0), np.minimum(grouped, 0)], axis=-1)
    return np.matmul(split, widen_bfloat16(bounds[:, :, pages])).max(axis=1)


# Compiled: in decode the bounds (an eighth of the keys' bytes) come from memory at every layer and token;
# numpy's product would also read the half of them each row multiplies by zero, and allocate its operands.
@njit(cache=True, fastmath=True)
def few_row_bound_scores(rows: np.ndarray, bounds: np.ndarray, start: int, stop: int, scores: np.ndarray) -> None:
    """quest_page_scores of rows [kv_heads, R, head_dim] over bfloat16 bounds[:, :, start:stop] into scores
    (head_dim a multiple of SCORE_CHANNELS)."""
    kv_heads, channels, _ = bounds.shape
    head_dim = channels // 2
    n = stop - start
    totals = np.empty((rows.shape[1], n), np.float32)
    for head in range(kv_heads):
        totals[:] = 0
        # Sixteen channels a pass, written out so that the page loop vectorizes: each row's running totals
        # are read and written a sixteenth as often as one channel a pass would, and sixteen bound rows
        # stream from memory at once (cold, after a graph call, as in the runtime: 82 us per layer at 8K
        # with four channels a pass, 47 with sixteen; in cache 17 and 16). Per channel, a row reads the
        # max where its q is positive (x*k is then largest at the max), else the min.
        for c in range(0, head_dim, SCORE_CHANNELS):
            for r in range(rows.shape[1]):
                x = rows[head, r, c:c + SCORE_CHANNELS]
                x0, x1, x2, x3, x4, x5, x6, x7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
                x8, x9, x10, x11, x12, x13, x14, x15 = x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]
                b0 = bounds[head, c if x0 > 0 else head_dim + c, start:stop]
                b1 = bounds[head, c + 1 if x1 > 0 else head_dim + c + 1, start:stop]
                b2 = bounds[head, c + 2 if x2 > 0 else head_dim + c + 2, start:stop]
                b3 = bounds[head, c + 3 if x3 > 0 else head_dim + c + 3, start:stop]
                b4 = bounds[head, c + 4 if x4 > 0 else head_dim + c + 4, start:stop]
                b5 = bounds[head, c + 5 if x5 > 0 else head_dim + c + 5, start:stop]
                b6 = bounds[head, c + 6 if x6 > 0 else head_dim + c + 6, start:stop]
                b7 = bounds[head, c + 7 if x7 > 0 else head_dim + c + 7, start:stop]
                b8 = bounds[head, c + 8 if x8 > 0 else head_dim + c + 8, start:stop]
                b9 = bounds[head, c + 9 if x9 > 0 else head_dim + c + 9, start:stop]
                b10 = bounds[head, c + 10 if x10 > 0 else head_dim + c + 10, start:stop]
                b11 = bounds[head, c + 11 if x11 > 0 else head_dim + c + 11, start:stop]
                b12 = bounds[head, c + 12 if x12 > 0 else head_dim + c + 12, start:stop]
                b13 = bounds[head, c + 13 if x13 > 0 else head_dim + c + 13, start:stop]
                b14 = bounds[head, c + 14 if x14 > 0 else head_dim + c + 14, start:stop]
                b15 = bounds[head, c + 15 if x15 > 0 else head_dim + c + 15, start:stop]
                total = totals[r]
                for page in range(n):  # indexed from 0 over slices: indexed from start, it was 3x slower
                    total[page] += (x0 * bfloat16_value(b0[page]) + x1 * bfloat16_value(b1[page])
                                    + x2 * bfloat16_value(b2[page]) + x3 * bfloat16_value(b3[page])
                                    + x4 * bfloat16_value(b4[page]) + x5 * bfloat16_value(b5[page])
                                    + x6 * bfloat16_value(b6[page]) + x7 * bfloat16_value(b7[page])
                                    + x8 * bfloat16_value(b8[page]) + x9 * bfloat16_value(b9[page])
                                    + x10 * bfloat16_value(b10[page]) + x11 * bfloat16_value(b11[page])
                                    + x12 * bfloat16_value(b12[page]) + x13 * bfloat16_value(b13[page])
                                    + x14 * bfloat16_value(b14[page]) + x15 * bfloat16_value(b15[page]))
        for page in range(n):
            best = totals[0, page]
            for r in range(1, rows.shape[1]):
                best = max(best, totals[r, page])
            scores[head, page] = best


def attention_mass(rows: np.ndarray, keys: np.ndarray, local_keys: np.ndarray, local_visible: np.ndarray) -> np.ndarray:
    """The attention each candidate page's keys receive, summed over the rows and the group's query heads.

    rows [kv_heads, G*S, head_dim] (post-RoPE); keys [kv_heads, pages, page_size, head_dim], candidate
    pages wholly in the past (every row sees them); local_keys [kv_heads, L, head_dim], the sink's and the
    step's own keys, which a row sees where local_visible [G*S, L] says so. They take their share of each
    row's softmax, so a row that mostly attends nearby gives the candidates little. Returns [kv_heads, pages].
    """
    heads, pages, page_size, head_dim = keys.shape
    scaled = rows * np.float32(1 / np.sqrt(head_dim))
    logits = row_logits(scaled, keys.reshape(heads, pages * page_size, head_dim))  # [h, R, pages*P]
    local = scaled @ local_keys.transpose(0, 2, 1)  # [h, R, L]
    local[:, ~local_visible] = -np.inf
    mass = np.zeros((heads, pages), np.float32)
    for head in range(heads):
        add_softmax_page_mass(logits[head], local[head], page_size, mass[head])
    return mass


# Compiled: a prefill chunk's softmax over its shortlist (192 rows by 8064 keys per KV head) took numpy a
# max, a subtraction, an exp, a sum and a product, each a pass over the logits (3.5 ms per layer and chunk).
@njit(cache=True, fastmath=True)
def add_softmax_page_mass(logits: np.ndarray, local_logits: np.ndarray, page_size: int, mass: np.ndarray) -> None:
    """Add to mass [pages] each row's softmax over its logits [R, pages*page_size] and local_logits [R, L]
    (-inf where the row does not see a key), summed per page of the logits."""
    weights = np.empty(logits.shape[1], np.float32)
    key_mass = np.zeros(logits.shape[1], np.float32)  # summed over the rows, then per page: flat loops vectorize
    for r in range(logits.shape[0]):
        row, local = logits[r], local_logits[r]
        top = max(largest(row), local.max())
        total = np.float32(0)
        for j in range(len(row)):
            weights[j] = exp_nonpositive(row[j] - top)
            total += weights[j]
        for j in range(len(local)):
            total += exp_nonpositive(local[j] - top)
        share = np.float32(1) / total
        for j in range(len(row)):
            key_mass[j] += weights[j] * share
    for i in range(len(mass)):
        for t in range(page_size):
            mass[i] += key_mass[i * page_size + t]


MAX_LANES = 16  # running maxima of `largest`


@njit(inline="always", fastmath=True)
def largest(values: np.ndarray) -> np.float32:
    """values.max() of a non-empty float32 array, in MAX_LANES running maxima that vectorize (numba's max
    is a scalar loop: 0.76 ms for a prefill chunk's 192 rows by 8064 logits, this 0.23)."""
    lanes = np.full(MAX_LANES, values[0])
    whole = len(values) // MAX_LANES * MAX_LANES
    for j in range(0, whole, MAX_LANES):
        for lane in range(MAX_LANES):
            x = values[j + lane]
            lanes[lane] = x if x > lanes[lane] else lanes[lane]
    top = values[0]
    for lane in range(MAX_LANES):
        top = max(top, lanes[lane])
    for j in range(whole, len(values)):
        top = max(top, values[j])
    return top


# Compiled: in decode, numpy's fancy index copied the shortlist's keys (four times the budget's free room,
# 1.5 MiB per layer at 8K) out of the host records before its product could read them, and its softmax
# took several passes over the logits.
@njit(cache=True, fastmath=True)
def record_page_mass(rows: np.ndarray, records: np.ndarray, scales: np.ndarray | None, slots: np.ndarray,
                     page_size: int, local_keys: np.ndarray, local_positions: np.ndarray, row_positions: np.ndarray,
                     mass: np.ndarray) -> None:
    """attention_mass of a decode step's few rows into mass [kv_heads, c], the candidates' keys read where
    they lie in the host tier: rows [kv_heads, G*S, head_dim]; records, scales and slots from
    TieredPool.key_records (float32 keys, or int8 times scales [records, kv_heads, head_dim]; candidate
    [h, i], a page of page_size keys, in record slots[h, i]); local_keys [kv_heads, L, head_dim] at
    local_positions [L], each seen by the rows whose position (row_positions [S], the S rows fastest) is
    at least its own."""
    kv_heads, n_rows, head_dim = rows.shape
    n, n_local, steps = slots.shape[1], local_keys.shape[1], len(row_positions)
    span = page_size * head_dim  # one KV head's keys of a page, contiguous in its record
    line = max(1, 64 // records.itemsize)  # elements per cache line
    logits = np.empty((n_rows, n * page_size), np.float32)
    local_logits = np.empty((n_rows, n_local), np.float32)
    scaled = np.empty((n_rows, head_dim), np.float32)
    head_rows = np.empty((n_rows, head_dim), np.float32)  # an INT8 page's rows times its key scales
    for head in range(kv_heads):
        for r in range(n_rows):
            for d in range(head_dim):
                scaled[r, d] = rows[head, r, d] / np.sqrt(np.float32(head_dim))
            for j in range(n_local):
                logit = np.float32(0)
                for d in range(head_dim):
                    logit += scaled[r, d] * local_keys[head, j, d]
                local_logits[r, j] = logit if local_positions[j] <= row_positions[r % steps] else -np.inf
        head_rows[:] = scaled
        for i in range(n):
            # The pages lie scattered in DRAM and the step runs cold after a graph call: reading each page
            # only when its turn came left the loop waiting on memory (cold, 215 us for 744 page-heads;
            # fetching two pages ahead, 106; in cache 50).
            if i + PREFETCH_PAGES_AHEAD < n:
                ahead = slots[head, i + PREFETCH_PAGES_AHEAD] * records.shape[1] + head * span
                for offset in range(0, span, line):
                    prefetch(records, ahead + offset)
            slot = slots[head, i]
            if scales is not None:
                for r in range(n_rows):
                    for d in range(head_dim):
                        head_rows[r, d] = scaled[r, d] * scales[slot, head, d]
            for t in range(page_size):
                key = records[slot, head * span + t * head_dim:head * span + (t + 1) * head_dim]
                for r in range(n_rows):
                    acc = np.float32(0)
                    for d in range(head_dim):
                        acc += head_rows[r, d] * np.float32(key[d])
                    logits[r, i * page_size + t] = acc
        mass[head] = 0
        add_softmax_page_mass(logits, local_logits, page_size, mass[head])


# Cephes' expf: exp(x) = 2^n * exp(r), r = x - n*ln(2) in [-ln(2)/2, ln(2)/2], exp(r) by a polynomial
# (within 2e-7 of np.exp). Compiled np.exp calls libm for each value; this vectorizes (18K softmax terms
# per layer and decode step at 8K: 32 us, this 4).
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln(2) in two parts, for an exact r
EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


@njit(inline="always", fastmath=True)
def exp_nonpositive(x: np.float32) -> np.float32:
    """exp(x) for x <= 0 (below -87, where float32 would go subnormal, the value of -87: about 1e-38)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * LOG2E + np.float32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p0, p1, p2, p3, p4, p5 = EXP_POLY
    y = (((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5) * r * r + r + np.float32(1)
    return y * float32_from_bits(np.uint32(np.int32(n) + 127) << np.uint32(23))


PREFETCH_PAGES_AHEAD = 2  # record_page_mass (one page ahead: 128 us cold, two 106, four 115)


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring element `index` of a C-contiguous array into its caches (LLVM's prefetch for a
    read, kept in every cache level), in compiled code: numba has no such call."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        function = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [byte] + [ir.IntType(32)] * 3))
        read, keep, data_cache = (ir.Constant(ir.IntType(32), v) for v in (0, 3, 1))
        builder.call(function, [builder.bitcast(builder.gep(data, [args[1]]), byte), read, keep, data_cache])
        return context.get_dummy_value()
    return types.void(array, index), codegen


def row_logits(rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """rows [h, R, D] times keys [h, K, D] transposed: [h, R, K], contiguous.

    For a few rows (decode) BLAS is about 3x faster with the keys on the left and the rows' transpose
    contiguous, and transposing the small result back costs little; for a prefill chunk's rows the
    plain product is faster than transposing its large result."""
    if rows.shape[1] > FEW_ROWS:
        return rows @ keys.transpose(0, 2, 1)
    return np.ascontiguousarray((keys @ np.ascontiguousarray(rows.transpose(0, 2, 1))).transpose(0, 2, 1))


def top_pages(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest scores of each row of [kv_heads, candidates], in any order."""
    if count == 0:
        return np.zeros((scores.shape[0], 0), dtype=np.int64)
    return top_by_histogram(np.ascontiguousarray(scores, np.float32), count)


TOP_BINS = 256  # histogram bins of top_by_histogram
FEW_TIED = 64  # boundary-bin entries up to which a selection sort picks among them


# Compiled: it runs for every layer and token, cold after a graph call. numpy's argpartition (an
# introselect per row) took 28-30 us per layer and step at 8K in the runtime, this 14-15 (8 and 10 in
# cache; benchmarks/host_step.py).
@njit(cache=True)
def top_by_histogram(scores: np.ndarray, count: int) -> np.ndarray:
    """top_pages (0 < count <= candidates): per row, a histogram of the scores over TOP_BINS bins between
    their min and max finds the bin holding the count-th highest; the bins above it are taken whole, and
    the highest of that bin's entries make up the rest."""
    heads, n = scores.shape
    top = np.empty((heads, count), np.int64)
    bins = np.empty(TOP_BINS, np.int64)
    tied = np.empty(n, np.int64)  # the boundary bin's entries
    for head in range(heads):
        row = scores[head]
        low, high = row.min(), row.max()
        scale = (TOP_BINS - 1) / (high - low) if high > low else 0.0
        bins[:] = 0
        for i in range(n):
            bins[int((row[i] - low) * scale)] += 1
        boundary, above = TOP_BINS - 1, 0
        while above + bins[boundary] < count:
            above += bins[boundary]
            boundary -= 1
        taken = ties = 0
        for i in range(n):
            b = int((row[i] - low) * scale)
            if b > boundary:
                top[head, taken] = i
                taken += 1
            elif b == boundary:
                tied[ties] = i
                ties += 1
        need = count - taken
        if ties > FEW_TIED:  # a crowded bin (a few outlying scores squeeze the rest together)
            order = np.argsort(-row[tied[:ties]])
            for j in range(need):
                top[head, taken + j] = tied[order[j]]
            continue
        for j in range(need):  # selection sort of the few entries of the boundary bin
            best = j
            for t in range(j + 1, ties):
                if row[tied[t]] > row[tied[best]]:
                    best = t
            tied[j], tied[best] = tied[best], tied[j]
            top[head, taken + j] = tied[j]
    return top


def select_pages(policy: str, q: np.ndarray, bounds: np.ndarray, n_pages: int, first_new: int,
                 budget_pages: int, keys: LayerKeys | None = None, row_positions: np.ndarray | None = None
                 ) -> Selection:
    """The selection of one layer and step (quest, rerank or streaming; dense never selects).

    `first_new` is the first page the step writes. rerank also needs the layer's `keys` and the positions
    of q's rows.
    """
    kv_heads = bounds.shape[0]
    if first_new == 0:
        return Selection(np.zeros((kv_heads, 0), dtype=np.int64), 0, n_pages)
    if n_pages <= budget_pages:
        middle = np.arange(1, first_new, dtype=np.int64)
        return Selection(np.broadcast_to(middle, (kv_heads, len(middle))), first_new, n_pages)
    room = budget_pages - 1 - (n_pages - first_new)  # middle pages that fit besides sink and new pages
    if room < 0:
        raise ValueError(f"a step writing {n_pages - first_new} pages does not fit a budget of {budget_pages}")
    if policy == "streaming":
        middle = np.arange(first_new - room, first_new, dtype=np.int64)
        return Selection(np.broadcast_to(middle, (kv_heads, room)), first_new, n_pages)
    if policy == "quest" or room == 0:  # candidates: pages 1..first_new-1
        return Selection(top_pages(quest_page_scores(q, bounds, slice(1, first_new)), room) + 1, first_new, n_pages)
    factor = RERANK_SHORTLIST_ROW if q.shape[1] == 1 else RERANK_SHORTLIST_CHUNK
    shortlist = min(first_new - 1, factor * room)
    if shortlist == first_new - 1:  # every candidate is shortlisted: no need for their bounds
        candidates = np.broadcast_to(np.arange(1, first_new), (kv_heads, shortlist))
    else:
        candidates = top_pages(quest_page_scores(q, bounds, slice(1, first_new)), shortlist) + 1
    return Selection(most_attended(q, candidates, room, keys, row_positions, first_new, n_pages),
                     first_new, n_pages)


def most_attended(q: np.ndarray, candidates: np.ndarray, room: int, keys: LayerKeys, row_positions: np.ndarray,
                  first_new: int, n_pages: int) -> np.ndarray:
    """The `room` pages of candidates [kv_heads, c] (pages wholly in the past) that receive the most of
    q's attention (attention_mass, with the sink and the step's pages first_new..n_pages-1 in each row's
    softmax), per KV head: [kv_heads, room]. `keys` and `row_positions` as in select_pages."""
    kv_heads = candidates.shape[0]
    local_pages = np.concatenate([[0], np.arange(first_new, n_pages)])
    local_keys = keys.read(np.broadcast_to(local_pages, (kv_heads, len(local_pages))))
    page_size, head_dim = local_keys.shape[2:]
    local_keys = local_keys.reshape(kv_heads, -1, head_dim)
    local_positions = (local_pages[:, None] * page_size + np.arange(page_size)).ravel()
    rows = q.reshape(kv_heads, -1, head_dim)  # [kv_heads, G*S]: the step's S rows fastest
    if rows.shape[1] <= FEW_ROWS:
        mass = np.empty(candidates.shape, np.float32)
        record_page_mass(rows, *keys.records(candidates), page_size, local_keys, local_positions, row_positions,
                         mass)
    else:
        groups = rows.shape[1] // len(row_positions)
        visible = np.tile(local_positions[None, :] <= row_positions[:, None], (groups, 1))
        mass = attention_mass(rows, keys.read(candidates), local_keys, visible)
    return np.take_along_axis(candidates, top_pages(mass, room), axis=1)
