"""Triton kernels that turn per-request diagonal offsets and columns into the per-query-block ``SparseLayout``.

Vertical-slash, A-shape and dense layouts are *shift invariant*: a diagonal offset ``o`` means, for the query
block whose first row sits at position ``r0``, the key range ``[r0 - o, r0 - o + 64)``. So everything is computed
once per (request, head) *relative to r0* (:func:`_relative_kernel`): the diagonals' windows merge into
intervals, each interval is cut into 64-key ranges from its left end, and the ranges are split into two
ascending lists: "relatively full" (64 wide, ending at or before r0 + 1: full in every block where they are not
clipped at key 0) and the rest; a coverage map marks the relative positions inside a range.

Per query block (:func:`_materialise_kernel`) a block only drops the ranges left of key 0 (a prefix of each
list), clips the one range that straddles key 0 (it becomes the first partial range) and, in a short last block,
drops the partial ranges that start after its last row (a suffix). So each block's lists are *slices* of the
relative lists, found by binary search and copied with a shift: no per-block scan over the whole list. Columns
are kept when causal for the block's last row and not on the coverage map.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BLOCK, SENTINEL, BatchGeometry, SparseLayout


def search_steps(n_off: int) -> int:
    """Binary-search steps of :func:`_materialise_kernel` over lists of up to ``n_off`` ranges, in two sizes only:
    16 below 65535 offsets (every context under 4M keys at the default budgets) and 30 above, so that growing
    contexts compile no new variant (the exact bit length recompiled it at 512K keys on an H200: 0.8 s)."""
    return 16 if n_off + 1 < (1 << 16) else 30


_SENTINEL: tl.constexpr = tl.constexpr(SENTINEL)


@triton.jit
def _intervals_at(Offsets, base, i, n_off, BLOCK: tl.constexpr):
    """Which offsets ``i`` are valid, open a new interval (a gap before their window), close one (a gap after)."""
    o = tl.load(Offsets + base + i, mask=i < n_off, other=-1)
    o_prev = tl.load(Offsets + base + i - 1, mask=(i >= 1) & (i < n_off), other=-1)
    o_next = tl.load(Offsets + base + i + 1, mask=i + 1 < n_off, other=-1)
    valid = o >= 0
    rel = -o  # window start relative to r0; ascending since offsets are descending
    new = valid & ((o_prev < 0) | (rel > BLOCK - o_prev))
    last = valid & ((o_next < 0) | (-o_next > rel + BLOCK))
    return valid, rel, new, last


# Ints that change with the batch's lengths are not specialised: one compile, not one per chunk shape.
@triton.jit(do_not_specialize=["n_off", "cover_w", "cover_lo"])
def _relative_kernel(Offsets, Rel, RelCounts, Cover, n_off, cover_w, cover_lo,
                     BLOCK: tl.constexpr, CH: tl.constexpr):
    """Program (request r, head h) = row ``r * H + h`` of ``Offsets [B * H, n_off]`` (descending, -1 padded).

    ``Rel [6, B * H, n_off]``: writes planes 0 (relatively-full range starts; ends are start + 64), 1 and 2 (the
    other ranges' starts and ends), each ascending, with their counts ``RelCounts[row] = (full, partial)``, and
    1s on ``Cover[row, d - cover_lo]`` for every relative position ``d`` inside a range. Planes 3-5 are scratch:
    each interval's start, end and first member index.
    """
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_off
    plane = tl.num_programs(0).to(tl.int64) * n_off
    full_start = Rel + base
    part_start = Rel + plane + base
    part_end = Rel + 2 * plane + base
    int_start = Rel + 3 * plane + base
    int_end = Rel + 4 * plane + base
    int_first = Rel + 5 * plane + base
    offs = tl.arange(0, CH)
    # -- pass 1: the merged intervals (an interval merged from m windows is at most 64 m keys wide)
    n_int = 0
    for c0 in range(0, n_off, CH):
        i = c0 + offs
        valid, rel, new, last = _intervals_at(Offsets, base, i, n_off, BLOCK)
        k = n_int + tl.cumsum(new.to(tl.int32), 0) - 1
        tl.store(int_start + k, rel, mask=new)
        tl.store(int_first + k, i, mask=new)
        tl.store(int_end + k, rel + BLOCK, mask=last)
        n_int += tl.sum(new.to(tl.int32), 0)
    # -- pass 2: member m of an interval emits its m-th 64-key range if the interval is that wide
    n_int = 0
    n_full = 0
    n_part = 0
    cols = tl.arange(0, BLOCK)
    cover = Cover + row.to(tl.int64) * cover_w - cover_lo
    for c0 in range(0, n_off, CH):
        i = c0 + offs
        valid, rel, new, last = _intervals_at(Offsets, base, i, n_off, BLOCK)
        k = n_int + tl.cumsum(new.to(tl.int32), 0) - 1
        k = tl.where(valid, k, 0)
        start = tl.load(int_start + k, mask=valid, other=0)
        end = tl.load(int_end + k, mask=valid, other=0)
        member = i - tl.load(int_first + k, mask=valid, other=0)
        s = start + BLOCK * member
        emit = valid & (s < end)
        e = tl.minimum(s + BLOCK, end)
        full = emit & (e - s == BLOCK) & (e <= 1)
        part = emit & (full == 0)
        tl.store(full_start + n_full + tl.cumsum(full.to(tl.int32), 0) - 1, s, mask=full)
        slot = n_part + tl.cumsum(part.to(tl.int32), 0) - 1
        tl.store(part_start + slot, s, mask=part)
        tl.store(part_end + slot, e, mask=part)
        # positions left of cover_lo are left of key 0 in every block: no column there, nothing to mark
        inside = emit[:, None] & (cols[None, :] < (e - s)[:, None]) & (s[:, None] + cols[None, :] >= cover_lo)
        tl.store(cover + s[:, None] + cols[None, :], tl.full([CH, BLOCK], 1, tl.int8), mask=inside)
        n_int += tl.sum(new.to(tl.int32), 0)
        n_full += tl.sum(full.to(tl.int32), 0)
        n_part += tl.sum(part.to(tl.int32), 0)
    tl.store(RelCounts + 2 * row, n_full)
    tl.store(RelCounts + 2 * row + 1, n_part)


@triton.jit
def _count_at_most(Arr, n, target, LOG: tl.constexpr):
    """Per lane: how many of the ascending ``Arr[lane][0:n[lane])`` are ``<= target[lane]`` (binary search)."""
    lo = tl.zeros_like(n)
    hi = n
    for _ in tl.static_range(LOG):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(Arr + mid, mask=active, other=0)
        right = active & (v <= target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (right == 0), mid, hi)
    return lo


@triton.jit(do_not_specialize=["n_off", "n_col", "cover_w", "cover_lo", "plane"])
def _materialise_kernel(Rel, RelCounts, Cols, Cover, QbReq, QbRow, CuQ, SeqK,
                        BlockStart, BlockEnd, BlockCount, FullCount, ColIndex, ColCount,
                        n_off, n_col, cover_w, cover_lo, plane,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr, LOG: tl.constexpr):
    """Program (query block qb, head h): its full ranges, then its partial ones, then its columns.

    ``Rel`` / ``RelCounts`` as written by :func:`_relative_kernel` (``plane`` = ``B * H * n_off``)."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    r = tl.load(QbReq + qb)
    row = tl.load(QbRow + qb)
    sq = tl.load(CuQ + r + 1) - tl.load(CuQ + r)
    r0 = tl.load(SeqK + r) - sq + row  # position of the block's first row
    p_last = r0 + tl.minimum(BLOCK, sq - row) - 1
    rh = r * H + h
    rel_base = rh.to(tl.int64) * n_off
    full_start = Rel + rel_base
    part_start = Rel + plane + rel_base
    part_end = Rel + 2 * plane + rel_base
    out_base = (qb * H + h).to(tl.int64) * n_off
    n_rf = tl.load(RelCounts + 2 * rh)
    n_rp = tl.load(RelCounts + 2 * rh + 1)

    # -- the block's slices: ranges ending at or before key 0 go (prefixes), partial ones starting after the
    #    block's last row go (a suffix); lanes: [full ends <= 0, partial ends <= 0, partial starts <= p_last]
    lane = tl.arange(0, 4)
    arr = Rel + tl.where(lane == 0, 0, tl.where(lane == 1, 2, 1)).to(tl.int64) * plane + rel_base
    n = tl.where(lane == 0, n_rf, tl.where(lane < 3, n_rp, 0))
    target = tl.where(lane == 0, -r0 - BLOCK, tl.where(lane == 1, -r0, p_last - r0))
    found = _count_at_most(arr, n, target, LOG)
    a_f = tl.sum(tl.where(lane == 0, found, 0), 0)
    a_p = tl.sum(tl.where(lane == 1, found, 0), 0)
    b_p = tl.sum(tl.where(lane == 2, found, 0), 0)
    # -- at most one range straddles key 0; a full one turns partial (clipped, and the leftmost: it goes first)
    f0 = tl.load(full_start + a_f, mask=a_f < n_rf, other=0)
    straddle = ((a_f < n_rf) & (f0 < -r0)).to(tl.int32)
    n_full = n_rf - a_f - straddle
    offs = tl.arange(0, CHUNK)
    for t0 in range(0, n_full, CHUNK):
        t = t0 + offs
        s = r0 + tl.load(full_start + a_f + straddle + t, mask=t < n_full, other=0)
        tl.store(BlockStart + out_base + t, s, mask=t < n_full)
        tl.store(BlockEnd + out_base + t, s + BLOCK, mask=t < n_full)
    first = (offs == 0) & (straddle == 1)
    tl.store(BlockStart + out_base + n_full + offs, tl.zeros([CHUNK], tl.int32), mask=first)
    tl.store(BlockEnd + out_base + n_full + offs, tl.zeros([CHUNK], tl.int32) + r0 + f0 + BLOCK, mask=first)
    n_p = b_p - a_p
    for t0 in range(0, n_p, CHUNK):
        t = t0 + offs
        m = t < n_p
        s = tl.maximum(r0 + tl.load(part_start + a_p + t, mask=m, other=0), 0)
        e = r0 + tl.load(part_end + a_p + t, mask=m, other=0)
        tl.store(BlockStart + out_base + n_full + straddle + t, s, mask=m)
        tl.store(BlockEnd + out_base + n_full + straddle + t, e, mask=m)
    tl.store(BlockCount + qb * H + h, n_full + straddle + n_p)
    tl.store(FullCount + qb * H + h, n_full)

    # -- columns: causal for the block's last row, and not already inside one of this block's ranges
    col_base = rh.to(tl.int64) * n_col
    col_out = (qb * H + h).to(tl.int64) * n_col
    cover = Cover + rh.to(tl.int64) * cover_w - cover_lo - r0
    kept = 0
    for c0 in range(0, n_col, CHUNK):
        i = c0 + offs
        c = tl.load(Cols + col_base + i, mask=i < n_col, other=_SENTINEL)
        ok = (i < n_col) & (c <= p_last)
        covered = tl.load(cover + c, mask=ok, other=0)
        keep = ok & (covered == 0)
        tl.store(ColIndex + col_out + kept + tl.cumsum(keep.to(tl.int32), 0) - 1, c, mask=keep)
        kept += tl.sum(keep.to(tl.int32), 0)
    tl.store(ColCount + qb * H + h, kept)


def materialise_layout(columns: torch.Tensor, offsets: torch.Tensor, geom: BatchGeometry) -> SparseLayout:
    """Layout of every query block of the batch from per-request columns and diagonals: both launches.

    Args:
        columns: ``[B, H, V]`` int32 key columns sorted ascending, unused entries ``SENTINEL`` at the end.
        offsets: ``[B, H, S]`` int32 diagonal offsets sorted descending, unused entries ``-1`` at the end
            (duplicates allowed).
        geom: batch geometry (``B`` requests).
    Returns:
        ``SparseLayout`` over ``H`` heads with ``MAXB = S`` and ``MAXC = V`` (an interval merged from ``m``
        diagonals needs at most ``m`` ranges, so no capacity beyond the slash budget).
    """
    B, H, n_off = offsets.shape
    n_col = columns.shape[-1]
    nqb, dev = geom.num_query_blocks, columns.device
    offsets, columns = offsets.contiguous(), columns.contiguous()
    max_sk = geom.max_seqlen_k
    cover_lo, cover_w = -max_sk, max_sk + BLOCK + 1  # relative positions [-max Sk, 64]: every causal key
    rel = torch.empty(6, B * H, n_off, dtype=torch.int32, device=dev)
    rel_counts = torch.empty(B * H, 2, dtype=torch.int32, device=dev)
    cover = torch.zeros(B * H, cover_w, dtype=torch.int8, device=dev)
    # 8 warps: with 4 the [256, 64] coverage store spills (sm_90 ptxas, 32 bytes)
    _relative_kernel[(B * H,)](offsets, rel, rel_counts, cover, n_off, cover_w, cover_lo, BLOCK=BLOCK, CH=256,
                               num_warps=8)
    block_start = torch.empty(nqb, H, n_off, dtype=torch.int32, device=dev)
    block_end = torch.empty_like(block_start)
    col_index = torch.empty(nqb, H, n_col, dtype=torch.int32, device=dev)
    # Separate tensors, each 16-byte aligned (slices of one would not be for odd NQB x H: a compile per alignment).
    counts = [torch.empty(nqb, H, dtype=torch.int32, device=dev) for _ in range(3)]
    _materialise_kernel[(nqb, H)](
        rel, rel_counts, columns, cover, geom.qb_request, geom.qb_row, geom.cu_seqlens_q, geom.seq_lens_k,
        block_start, block_end, counts[0], counts[1], col_index, counts[2], n_off, n_col, cover_w, cover_lo,
        B * H * n_off, BLOCK=BLOCK, CHUNK=256, LOG=search_steps(n_off), num_warps=4)
    return SparseLayout(block_start=block_start, block_end=block_end, block_count=counts[0], full_count=counts[1],
                        col_index=col_index, col_count=counts[2])


__all__ = ["materialise_layout"]
