"""Exact top-k selection for the index builders, as Triton radix selects (no torch.topk or sort over key axes).

Every fp32 score maps to an order-preserving uint32 key (:func:`_order_key`). The ``b``-th largest key of a row
is found digit by digit, most significant first: 4 levels of 8 bits, each a 256-bin histogram of the next digit
of the elements whose higher digits match the prefix found so far. Then exactly ``b`` positions are kept: every
key above the threshold, and the lowest positions among the keys equal to it (ties break towards low
positions: that is also the "nearer first" order of the forced sink columns and local diagonals). The kept
positions come out in position order (a prefix sum), so no sort is needed afterwards.

* Vertical-slash rows (``[2, B, H, Sk]`` column and diagonal sums, long): several programs per row; one launch
  per digit level (histograms merged with atomics), one to count each program's share, one to write.
* Block-sparse rows (``[NQB, H, NKB]`` block scores, up to 16K key blocks): one program per row, in registers.

NaN never ranks: a vertical-slash row with a NaN falls back to dense (all diagonals), counted on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BLOCK as KEY_BLOCK
from .estimate import slot_program, sm_count

DIGIT_BITS: tl.constexpr = tl.constexpr(8)
BINS: tl.constexpr = tl.constexpr(256)
LEVELS = 4  # 4 x 8 bits: a full 32-bit key, so the threshold is exact
FORCED = 1.0e6  # forced sink columns / local diagonals: above any sum of probabilities (<= 64)
_FORCED: tl.constexpr = tl.constexpr(FORCED)
_KEY_BLOCK: tl.constexpr = tl.constexpr(KEY_BLOCK)
ROW_BLOCK = 4096  # elements per load step of the vertical-slash kernels (16 per thread at 8 warps)
MIN_CHUNK = 16384  # elements per program at least (a program's fixed cost is a 256-bin merge)
BLOCK_CHUNK = 2048  # key blocks per load step of the block-sparse kernel


# Integer arguments that change with the batch's lengths. Triton compiles one variant per specialisation of
# each int argument (equal to 1, divisible by 16, 32 or 64 bits), so each new chunk shape could compile in the
# middle of a user's request; these ints only bound loops, masks and row addresses, where the hints buy nothing.
_VS_SHAPES = ["stride_pair", "stride_b", "stride_h", "num_heads", "num_rows", "forced_sink", "forced_local", "chunk"]
_VS_WRITE_SHAPES = ["width_cols", "width_offs"]


@triton.jit
def _order_key(x):
    """Order-preserving uint32 key of fp32 ``x``: ``a < b`` iff ``key(a) < key(b)`` (NaN: callers mask it out)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits, so int32 order is float order
    return (key ^ (-2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _next_digit(h, need):
    """In a 256-bin histogram ``h`` of the candidates' next digit: the digit holding the ``need``-th largest
    candidate and how many candidates with that digit are still needed. ``need >= 1`` expected."""
    d = tl.arange(0, BINS)
    at_or_above = tl.cumsum(h, 0, reverse=True)
    digit = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1
    above = tl.sum(tl.where(d > digit, h, 0), 0)
    return digit, need - above


@triton.jit
def _threshold(Hist, need, LEVEL: tl.constexpr):
    """Key prefix (the top ``8 * LEVEL`` bits) of the ``need``-th largest key, from the first ``LEVEL`` histograms
    (``Hist`` points at level 0; levels are ``BINS`` apart), and how many keys equal to that prefix to keep."""
    prefix = tl.full([], 0, tl.uint32)
    for level in tl.static_range(LEVEL):
        digit, need = _next_digit(tl.load(Hist + level * BINS + tl.arange(0, BINS)), need)
        prefix = (prefix << DIGIT_BITS) | digit.to(tl.uint32)
    return prefix, need


@triton.jit
def _vs_row(Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows,
            forced_sink, forced_local):
    """Program (row = r * H + h, share p, pair): pair 0 = column sums, 1 = diagonal sums. Returns the row's
    score pointer, its length ``sk``, its budget before clamping, its forced count, and its scratch row."""
    row = tl.program_id(0)
    pair = tl.program_id(2)
    r = row // num_heads
    h = row % num_heads
    sk = tl.load(SeqK + r)
    budget = tl.where(pair == 0, tl.load(Vertical + h), tl.load(Slash + h))
    forced = tl.where(pair == 0, forced_sink, forced_local)
    scores = Scores + pair.to(tl.int64) * stride_pair + r.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    scratch = Scratch + (pair * num_rows + row).to(tl.int64) * (4 * BINS + 1)  # 4 histograms + NaN count
    return row, pair, sk, budget, forced, scores, scratch


@triton.jit
def _vs_keys(scores, i, end, forced):
    """Keys of positions ``i`` (< ``end``): forced positions score FORCED; ``valid`` excludes NaN and the -1s."""
    m = i < end
    x = tl.load(scores + i, mask=m, other=-1.0)
    x = tl.where((i < forced) & (x >= 0.0), _FORCED, x)
    return _order_key(x), m & (x >= 0.0), m & (x != x)


@triton.jit(do_not_specialize=_VS_SHAPES)
def _vs_hist_kernel(Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows,
                    forced_sink, forced_local, chunk, LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    """Digit level ``LEVEL``: histogram of the next digit of this share's candidates, merged into the row's."""
    row, pair, sk, budget, forced, scores, scratch = _vs_row(
        Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows, forced_sink,
        forced_local)
    start = tl.program_id(1) * chunk
    end = tl.minimum(start + chunk, sk)
    prefix = tl.full([], 0, tl.uint32)
    go = start < end
    if LEVEL > 0:
        other = Scratch + ((1 - pair) * num_rows + row).to(tl.int64) * (4 * BINS + 1)
        nan = tl.load(scratch + 4 * BINS) + tl.load(other + 4 * BINS)
        total = tl.sum(tl.load(scratch + tl.arange(0, BINS)), 0)
        need = tl.minimum(budget, total)
        prefix, need = _threshold(scratch, need, LEVEL)
        go = go & (nan == 0) & (need > 0)
    if go:
        shift: tl.constexpr = 32 - DIGIT_BITS * (LEVEL + 1)
        hist = tl.zeros([BINS], tl.int32)
        nans = tl.zeros([BLOCK], tl.int32)
        for s0 in range(start, end, BLOCK):
            key, valid, isnan = _vs_keys(scores, s0 + tl.arange(0, BLOCK), end, forced)
            if LEVEL == 0:
                hist += tl.histogram((key >> shift).to(tl.int32), BINS, mask=valid)
                nans += isnan.to(tl.int32)
            else:
                valid = valid & ((key >> (shift + DIGIT_BITS)) == prefix)
                if tl.max(valid.to(tl.int32), 0) > 0:  # past level 1 most blocks hold no candidate: skip them
                    hist += tl.histogram(((key >> shift) & (BINS - 1)).to(tl.int32), BINS, mask=valid)
        tl.atomic_add(scratch + LEVEL * BINS + tl.arange(0, BINS), hist, sem="relaxed")
        if LEVEL == 0:
            n = tl.sum(nans, 0)
            tl.atomic_add(scratch + 4 * BINS, n, mask=n > 0, sem="relaxed")


@triton.jit
def _vs_plan(scratch, other, budget):
    """Per row after the 4 levels: the exact threshold key, how many keys equal to it to keep, the total kept,
    and whether the (row, head) has a NaN in either of its two score rows."""
    nan = (tl.load(scratch + 4 * BINS) + tl.load(other + 4 * BINS)) > 0
    total = tl.sum(tl.load(scratch + tl.arange(0, BINS)), 0)
    need = tl.where(nan, 0, tl.minimum(budget, total))
    thresh, ties = _threshold(scratch, tl.maximum(need, 1), 4)
    return nan, need, thresh, ties


@triton.jit
def _vs_planned_row(Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows,
                    forced_sink, forced_local):
    """:func:`_vs_row` and :func:`_vs_plan` of this program's row, for the passes after the 4 digit levels:
    ``(row, pair, sk, forced, scores, nan, need, thresh, ties)``."""
    row, pair, sk, budget, forced, scores, scratch = _vs_row(
        Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows, forced_sink,
        forced_local)
    other = Scratch + ((1 - pair) * num_rows + row).to(tl.int64) * (4 * BINS + 1)
    nan, need, thresh, ties = _vs_plan(scratch, other, budget)
    return row, pair, sk, forced, scores, nan, need, thresh, ties


@triton.jit(do_not_specialize=_VS_SHAPES)
def _vs_count_kernel(Scores, Scratch, Counts, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads,
                     num_rows, forced_sink, forced_local, chunk, BLOCK: tl.constexpr):
    """Keys above the threshold and keys equal to it in this share: ``Counts[pair, row, share] = (above, equal)``."""
    row, pair, sk, forced, scores, nan, need, thresh, ties = _vs_planned_row(
        Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows, forced_sink,
        forced_local)
    p = tl.program_id(1)
    start = p * chunk
    end = tl.minimum(start + chunk, sk)
    above = tl.zeros([BLOCK], tl.int32)
    equal = tl.zeros([BLOCK], tl.int32)
    if need > 0:
        for s0 in range(start, end, BLOCK):
            key, valid, isnan = _vs_keys(scores, s0 + tl.arange(0, BLOCK), end, forced)
            above += (valid & (key > thresh)).to(tl.int32)
            equal += (valid & (key == thresh)).to(tl.int32)
    out = Counts + ((pair * num_rows + row) * tl.num_programs(1) + p).to(tl.int64) * 2
    tl.store(out, tl.sum(above, 0))
    tl.store(out + 1, tl.sum(equal, 0))


@triton.jit(do_not_specialize=_VS_SHAPES + _VS_WRITE_SHAPES)
def _vs_write_kernel(Scores, Scratch, Counts, SeqK, Vertical, Slash, Columns, Offsets, NanCount,
                     stride_pair, stride_b, stride_h, num_heads, num_rows, forced_sink, forced_local, chunk,
                     width_cols, width_offs, sentinel, COUNT_NAN: tl.constexpr, BLOCK: tl.constexpr,
                     SHARES_P: tl.constexpr):
    """Write the kept positions: columns ascending (pair 0), diagonal offsets descending (pair 1); unused entries
    ``sentinel`` / -1. A (row, head) with a NaN keeps no column and every diagonal (dense), and is counted."""
    row, pair, sk, forced, scores, nan, need, thresh, ties = _vs_planned_row(
        Scores, Scratch, SeqK, Vertical, Slash, stride_pair, stride_b, stride_h, num_heads, num_rows, forced_sink,
        forced_local)
    p = tl.program_id(1)
    shares = tl.num_programs(1)
    width = tl.where(pair == 0, width_cols, width_offs)
    cols = Columns + row.to(tl.int64) * width_cols
    offs = Offsets + row.to(tl.int64) * width_offs
    # -- where this share's kept positions start: kept above + the first `ties` equal keys, over earlier shares
    q = tl.arange(0, SHARES_P)
    counts = Counts + ((pair * num_rows + row) * shares).to(tl.int64) * 2
    earlier = q < p
    above_before = tl.sum(tl.load(counts + 2 * q, mask=earlier, other=0), 0)
    equal_before = tl.sum(tl.load(counts + 2 * q + 1, mask=earlier, other=0), 0)
    base = above_before + tl.minimum(equal_before, ties)
    start = p * chunk
    end = tl.minimum(start + chunk, sk)
    if need > 0:
        for s0 in range(start, end, BLOCK):
            i = s0 + tl.arange(0, BLOCK)
            key, valid, isnan = _vs_keys(scores, i, end, forced)
            if tl.max((valid & (key >= thresh)).to(tl.int32), 0) > 0:  # most blocks keep nothing: skip them
                eq = valid & (key == thresh)
                eq_rank = equal_before + tl.cumsum(eq.to(tl.int32), 0) - 1
                keep = (valid & (key > thresh)) | (eq & (eq_rank < ties))
                slot = base + tl.cumsum(keep.to(tl.int32), 0) - 1
                tl.store(cols + slot, i, mask=keep & (pair == 0))
                tl.store(offs + need - 1 - slot, i, mask=keep & (pair == 1))
                base += tl.sum(keep.to(tl.int32), 0)
                equal_before += tl.sum(eq.to(tl.int32), 0)
    if p == 0:
        # -- the unused tail; a NaN head: no columns, and the dense band sk-1, sk-65, ..., 0 as its diagonals
        for t0 in range(need, width, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            m = t < width
            raw = sk - 1 - _KEY_BLOCK * t
            band = tl.where(raw > 0, raw, tl.where(raw > -_KEY_BLOCK, 0, -1))
            tl.store(cols + t, tl.zeros([BLOCK], tl.int32) + sentinel, mask=m & (pair == 0))
            tl.store(offs + t, tl.where(nan, band, -1), mask=m & (pair == 1))
        if COUNT_NAN:
            tl.atomic_add(NanCount, 1, mask=nan & (pair == 1), sem="relaxed")


@triton.jit
def _block_keys(row, kb, n_valid, diag_lo):
    """Keys of key blocks ``kb``: the diagonal ones (``>= diag_lo``) outrank every score; NaN never ranks."""
    m = kb < n_valid
    x = tl.load(row + kb, mask=m, other=0.0)
    diag = m & (kb >= diag_lo)
    key = tl.where(diag, tl.full(kb.shape, 0xFFFFFFFF, tl.uint32), _order_key(x))
    return key, diag | (m & (x == x))


@triton.jit(do_not_specialize=["stride_ss", "stride_sg", "stride_sq", "num_heads", "width"])
def _block_select_kernel(Scores, Table, Topk, CuQ, SeqK, QbReq, QbRow, BlockStart, BlockEnd, BlockCount,
                         FullCount, stride_ss, stride_sg, stride_sq, num_heads, width,
                         BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program (query block qb, slot s, lane g): the key blocks of scored head ``h = Table[s, g]``, ascending.

    Candidates are the key blocks holding a causal key of the block's last row; the blocks holding its diagonal
    are always kept; of the rest the highest scores fill ``Topk[h]`` (ties towards lower blocks). Ascending
    blocks are also "full ranges first": a block is full exactly when it ends at or before the block's first row.
    """
    qb, s, g, h = slot_program(Table)
    if h >= 0:
        r = tl.load(QbReq + qb)
        row = tl.load(QbRow + qb)
        sq = tl.load(CuQ + r + 1) - tl.load(CuQ + r)
        sk = tl.load(SeqK + r)
        r0 = sk - sq + row
        p_last = r0 + tl.minimum(BLOCK, sq - row) - 1
        n_valid = p_last // BLOCK + 1
        diag_lo = r0 // BLOCK
        need = tl.minimum(tl.maximum(tl.load(Topk + h), n_valid - diag_lo), n_valid)
        scores = Scores + s.to(tl.int64) * stride_ss + g.to(tl.int64) * stride_sg + qb.to(tl.int64) * stride_sq
        offs = tl.arange(0, CHUNK)
        # -- the need-th largest key, digit by digit
        prefix = tl.full([], 0, tl.uint32)
        left = need
        for level in tl.static_range(4):
            hist = tl.zeros([BINS], tl.int32)
            for c0 in range(0, n_valid, CHUNK):
                key, valid = _block_keys(scores, c0 + offs, n_valid, diag_lo)
                if level > 0:
                    valid = valid & ((key >> (32 - DIGIT_BITS * level)) == prefix)
                digits = ((key >> (32 - DIGIT_BITS * (level + 1))) & (BINS - 1)).to(tl.int32)
                hist += tl.histogram(digits, BINS, mask=valid)
            digit, left = _next_digit(hist, left)
            prefix = (prefix << DIGIT_BITS) | digit.to(tl.uint32)
        # -- keep every key above it and the first `left` equal to it, in block order
        base = (qb * num_heads + h).to(tl.int64) * width
        kept = 0
        equal = 0
        n_full = 0
        for c0 in range(0, n_valid, CHUNK):
            kb = c0 + offs
            key, valid = _block_keys(scores, kb, n_valid, diag_lo)
            eq = valid & (key == prefix)
            keep = (valid & (key > prefix)) | (eq & (equal + tl.cumsum(eq.to(tl.int32), 0) - 1 < left))
            slot = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
            start = kb * BLOCK
            tl.store(BlockStart + base + slot, start, mask=keep)
            tl.store(BlockEnd + base + slot, tl.minimum(start + BLOCK, sk), mask=keep)
            kept += tl.sum(keep.to(tl.int32), 0)
            equal += tl.sum(eq.to(tl.int32), 0)
            n_full += tl.sum((keep & (start + BLOCK - 1 <= r0)).to(tl.int32), 0)
        tl.store(BlockCount + qb * num_heads + h, kept)
        tl.store(FullCount + qb * num_heads + h, n_full)


def select_blocks(scores: torch.Tensor, table: torch.Tensor, topk: torch.Tensor, geom, *, num_heads: int,
                  width: int) -> tuple[torch.Tensor, ...]:
    """Block-sparse selection of every (query block, scored head), written as layout tensors.

    Args:
        scores: ``[slots, G, NQB, NKB]`` float32 block scores (pooled q . pooled k), grouped like ``table``.
        table: ``[slots, G]`` int32 scored head of each (slot, lane), -1 padding; topk: ``[Hs]`` int32 budgets.
        num_heads: ``Hs``; width: capacity per (query block, head), at least ``max topk + 1`` or ``NKB``.
    Returns:
        ``block_start, block_end`` ``[NQB, Hs, width]`` and ``block_count, full_count`` ``[NQB, Hs]``, int32.
    """
    slots, group, nqb, nkb = scores.shape
    dev = scores.device
    block_start = torch.empty(nqb, num_heads, width, dtype=torch.int32, device=dev)
    block_end = torch.empty_like(block_start)
    # Separate tensors: a slice of one [2, NQB, H] tensor would start unaligned for odd NQB x H, and Triton
    # compiles a variant per pointer alignment.
    counts = [torch.empty(nqb, num_heads, dtype=torch.int32, device=dev) for _ in range(2)]
    _block_select_kernel[(nqb, slots, group)](
        scores, table, topk, geom.cu_seqlens_q, geom.seq_lens_k, geom.qb_request, geom.qb_row, block_start,
        block_end, counts[0], counts[1], scores.stride(0), scores.stride(1), scores.stride(2), num_heads, width,
        BLOCK=KEY_BLOCK, CHUNK=min(BLOCK_CHUNK, triton.next_power_of_2(nkb)), num_warps=4)
    return block_start, block_end, counts[0], counts[1]


def dense_band_width(max_seqlen_k: int) -> int:
    """Diagonal offsets ``w-1, w-65, ..., 0`` that cover every causal key of a context of ``max_seqlen_k`` keys."""
    return triton.cdiv(max_seqlen_k - 1, KEY_BLOCK) + 1


def shares_lanes(device) -> int:
    """Lanes of the write kernel's prefix sum over shares: a power of two above any share count on ``device``
    (at most ``2 x SMs``), fixed per device so that no context length compiles another variant (on an H200 a
    length-dependent width compiled ``_vs_write_kernel`` again at 40K and 72K keys, about 1.2 s each)."""
    return triton.next_power_of_2(2 * sm_count(device))


def select_vertical_slash(scores: torch.Tensor, seq_lens_k: torch.Tensor, vertical: torch.Tensor,
                          slash: torch.Tensor, *, width_cols: int, width_offs: int, forced_sink: int,
                          forced_local: int, sentinel: int, nan_count: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top columns and diagonals of every (request, head), exactly, in position order.

    Args:
        scores: ``[2, B, H, N]`` float32: column sums (``[0]``) and diagonal sums (``[1]``); entries ``< 0`` are
            invalid (past a request's ``Sk``), NaN never ranks.
        seq_lens_k: ``[B]`` int32 ``Sk`` per request (only positions below it are read).
        vertical, slash: ``[H]`` int32 budgets; a row keeps ``min(budget, valid entries)``.
        width_cols, width_offs: output widths (``width_offs`` at least :func:`dense_band_width` of ``N``).
        forced_sink, forced_local: the first valid positions of each row outrank every score, nearer first.
        nan_count: optional ``[1]`` int32 on the device: incremented once per (request, head) that fell back to
            dense because its scores held a NaN (read it outside the per-layer path; nothing here syncs).
    Returns:
        ``columns [B, H, width_cols]`` int32 ascending (unused ``sentinel``) and ``offsets [B, H, width_offs]``
        int32 descending (unused -1).
    """
    _, B, H, N = scores.shape
    dev = scores.device
    rows = B * H
    shares = max(1, min(triton.cdiv(N, MIN_CHUNK), triton.cdiv(4 * sm_count(dev), 2 * rows)))  # ~4 per SM
    chunk = triton.cdiv(triton.cdiv(N, shares), ROW_BLOCK) * ROW_BLOCK
    shares = triton.cdiv(N, chunk)
    scratch = torch.zeros(2, rows, LEVELS * 256 + 1, dtype=torch.int32, device=dev)  # 4 histograms + NaN count
    counts = torch.empty(2, rows, shares, 2, dtype=torch.int32, device=dev)
    columns = torch.empty(B, H, width_cols, dtype=torch.int32, device=dev)
    offsets = torch.empty(B, H, width_offs, dtype=torch.int32, device=dev)
    budgets = (seq_lens_k, vertical, slash)
    rest = (scores.stride(0), scores.stride(1), scores.stride(2), H, rows, forced_sink, forced_local, chunk)
    grid = (rows, shares, 2)
    for level in range(LEVELS):
        _vs_hist_kernel[grid](scores, scratch, *budgets, *rest, LEVEL=level, BLOCK=ROW_BLOCK, num_warps=8)
    _vs_count_kernel[grid](scores, scratch, counts, *budgets, *rest, BLOCK=ROW_BLOCK, num_warps=8)
    _vs_write_kernel[grid](scores, scratch, counts, *budgets, columns, offsets,
                           nan_count if nan_count is not None else scratch, *rest, width_cols, width_offs, sentinel,
                           COUNT_NAN=nan_count is not None, BLOCK=ROW_BLOCK, SHARES_P=shares_lanes(dev),
                           num_warps=8)
    return columns, offsets


__all__ = ["FORCED", "dense_band_width", "select_blocks", "select_vertical_slash"]
