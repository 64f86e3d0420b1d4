"""Triton kernel that turns per-request range/column lists into the per-query-block ``SparseLayout``.

Vertical-slash, A-shape and dense layouts are *shift invariant*: a diagonal offset ``o`` means, for the query
block whose first row sits at position ``r0``, the key range ``[r0 - o, r0 - o + 64)``. So the merged ranges are
computed once per (request, head) *relative to r0* (torch, ``patterns.convert``), and this kernel only shifts,
clips and splits them per query block into full ranges first and partial ranges after, and drops the columns
that a range already covers. One program per (query block, head); every loop is over a fixed-size list.
"""

import triton
import triton.language as tl

SENTINEL = 1 << 29  # "no entry" in start/column lists; far right of every position, r0 + SENTINEL fits int32
_SENTINEL: tl.constexpr = tl.constexpr(SENTINEL)


@triton.jit
def _shifted_ranges(RelStart, RelEnd, base, i, n_rel, r0, p_last, BLOCK: tl.constexpr):
    m = i < n_rel
    s = r0 + tl.load(RelStart + base + i, mask=m, other=_SENTINEL)
    e = r0 + tl.load(RelEnd + base + i, mask=m, other=_SENTINEL)
    valid = m & (e > 0) & (s <= p_last)
    s = tl.maximum(s, 0)
    full = valid & (e - s == BLOCK) & (e - 1 <= r0)
    return s, e, valid, full


@triton.jit
def _materialise_kernel(RelStart, RelEnd, Cols, Cover, QbReq, QbRow, CuQ, SeqK,
                        BlockStart, BlockEnd, BlockCount, FullCount, ColIndex, ColCount,
                        n_rel, n_col, cover_w, cover_lo,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    r = tl.load(QbReq + qb)
    row = tl.load(QbRow + qb)
    sq = tl.load(CuQ + r + 1) - tl.load(CuQ + r)
    r0 = tl.load(SeqK + r) - sq + row  # position of the block's first row
    p_last = r0 + tl.minimum(BLOCK, sq - row) - 1
    rel_base = (r * H + h).to(tl.int64) * n_rel
    out_base = (qb * H + h).to(tl.int64) * n_rel
    offs = tl.arange(0, CHUNK)

    # -- pass 1: how many full ranges (they go first)
    n_full = 0
    for c0 in range(0, n_rel, CHUNK):
        s, e, valid, full = _shifted_ranges(RelStart, RelEnd, rel_base, c0 + offs, n_rel, r0, p_last, BLOCK)
        n_full += tl.sum(full.to(tl.int32), 0)

    # -- pass 2: compact full ranges to [0, n_full), partial ones after, each group keeping its order
    done_full = 0
    done_part = 0
    for c0 in range(0, n_rel, CHUNK):
        s, e, valid, full = _shifted_ranges(RelStart, RelEnd, rel_base, c0 + offs, n_rel, r0, p_last, BLOCK)
        part = valid & (full == 0)
        pos = tl.where(full, done_full + tl.cumsum(full.to(tl.int32), 0) - 1,
                       n_full + done_part + tl.cumsum(part.to(tl.int32), 0) - 1)
        tl.store(BlockStart + out_base + pos, s, mask=valid)
        tl.store(BlockEnd + out_base + pos, e, mask=valid)
        done_full += tl.sum(full.to(tl.int32), 0)
        done_part += tl.sum(part.to(tl.int32), 0)
    tl.store(BlockCount + qb * H + h, n_full + done_part)
    tl.store(FullCount + qb * H + h, n_full)

    # -- columns: causal for the block's last row, and not already inside one of this block's ranges
    col_base = (r * H + h).to(tl.int64) * n_col
    col_out = (qb * H + h).to(tl.int64) * n_col
    cover_base = (r * H + h).to(tl.int64) * cover_w
    kept = 0
    for c0 in range(0, n_col, CHUNK):
        i = c0 + offs
        c = tl.load(Cols + col_base + i, mask=i < n_col, other=_SENTINEL)
        ok = (i < n_col) & (c <= p_last)
        covered = tl.load(Cover + cover_base + (c - r0 - cover_lo), mask=ok, other=0)
        keep = ok & (covered == 0)
        tl.store(ColIndex + col_out + kept + tl.cumsum(keep.to(tl.int32), 0) - 1, c, mask=keep)
        kept += tl.sum(keep.to(tl.int32), 0)
    tl.store(ColCount + qb * H + h, kept)
