"""Triton kernels for the online index estimation (hot at long lengths, so never Python loops).

* ``lastq_scores``: softmax of the last ``n = min(last_q, Sq)`` queries of each request's chunk against all its
  keys (bottom-right causal, fp32), reduced to per-key column sums and per-diagonal sums, for vertical-slash.
* ``pool_keys``: mean of each aligned 64-key block (padding excluded), for block-sparse.

Both read keys through a ``KVSource`` (contiguous or SGLang's paged pool), so a cached prefix is never copied.
Memory is O(heads x context): no [queries x keys] score matrix is ever materialised.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..checks import check
from ..layout import BLOCK, BatchGeometry, KVSource, check_tensor
from .constants import LOG2E
from .interpreter import refuse_bf16
from .kv_access import kv_args, kv_rows
from .sparse_attention import check_kv, check_queries_and_kv


@triton.jit
def _lastq_setup(Q, KvStart, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, stride_qt, stride_qh, stride_tok, n_last,
                 tiles_per_split, PAGED: tl.constexpr, HEADS: tl.constexpr, BLOCK: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """Program (request r, slot g, split s): up to HEADS scored heads of one KV head, their q tiles stacked, and
    the split's key tiles ``[u_s, u_e)``.

    Row ``m`` of the ``[BLOCK * HEADS]`` tile is estimation row ``a = m // HEADS`` (position ``p0 + a``) of scored
    head ``head[m] = Slots[g, m % HEADS]``; ``head`` is -1 on padding lanes (rows masked: no load, no store).
    Heads are interleaved row by row, so each head's rows spread evenly over a thread's registers.
    Key tile ``u`` holds the keys ``p0 - 64 u + [0, 64)``, aligned to the estimation rows: tile 0 carries the
    causal triangle, tiles ``1 .. n_tiles - 2`` need no mask at all, the last one may reach below key 0.
    ``n_tiles`` is 0 for an all-padding slot, which then scans nothing. ``key_base`` is the request's first K
    row (contiguous) or the offset of its token-table row (paged), loaded once, not per tile.
    """
    tl.static_assert(BLOCK == 64)
    tl.static_assert((HEADS & (HEADS - 1)) == 0)
    r = tl.program_id(0)
    g = tl.program_id(1)
    sk = tl.load(SeqK + r)
    q_end = tl.load(CuQ + r + 1)
    n = tl.minimum(n_last, q_end - tl.load(CuQ + r))
    p0 = sk - n  # absolute position of the first estimation row
    m = tl.arange(0, BLOCK * HEADS)
    rows = m // HEADS
    head = tl.load(Slots + g * HEADS + m % HEADS)
    row_ok = (rows < n) & (head >= 0)
    first = tl.load(Slots + g * HEADS)  # lanes fill in order: a used slot has lane 0
    n_tiles = tl.where(first >= 0, (p0 + BLOCK - 1) // BLOCK + 1, 0)
    kvh = tl.load(KvHead + tl.maximum(first, 0)).to(tl.int64)
    qh = tl.load(QHead + head, mask=head >= 0, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = (q_end - n + rows).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    if PAGED:
        key_base = tl.load(PoolIdx + r).to(tl.int64) * stride_tok
    else:
        key_base = tl.load(KvStart + r).to(tl.int64)
    s = tl.program_id(2)
    u_s = s * tiles_per_split
    u_e = tl.minimum(u_s + tiles_per_split, n_tiles)
    return r, g, s, u_s, u_e, sk, p0, p0 + rows, rows, head, row_ok, n_tiles, kvh, q, key_base


@triton.jit
def _key_tile(K, ReqToToken, key_base, kvh, j, sk, stride_kt, stride_kh,
              HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr):
    """The K tile ``[BLOCK, HEAD_DIM]`` of key positions ``j`` ([BLOCK] int32), contiguous or through the pool's
    table. With ``MASKED`` keys outside ``[0, sk)`` are not read (they load as 0: the caller masks their scores)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        kmask = (j >= 0) & (j < sk)
        j = tl.where(kmask, j, 0)
    if PAGED:
        rows = tl.load(ReqToToken + key_base + j).to(tl.int64)
    else:
        rows = key_base + j
    ptrs = K + rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=kmask[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _key_tile_dot(q, K, ReqToToken, key_base, kvh, j, sk, stride_kt, stride_kh,
                  HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr):
    """Raw scores ``q @ k^T`` of the stacked rows against key positions ``j``: one K tile load, one dot."""
    return tl.dot(q, tl.trans(_key_tile(K, ReqToToken, key_base, kvh, j, sk, stride_kt, stride_kh, HEAD_DIM, PAGED,
                                        MASKED)))


@triton.jit
def _lse_tile(m_i, l_i, q, pos, row_ok, K, ReqToToken, key_base, kvh, u, p0, sk, stride_kt, stride_kh, qk_scale,
              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr):
    """Fold key tile ``u`` into the running (max, sum) of every stacked row, exp2 domain."""
    j = p0 - BLOCK * u + tl.arange(0, BLOCK)
    qk = _key_tile_dot(q, K, ReqToToken, key_base, kvh, j, sk, stride_kt, stride_kh, HEAD_DIM, PAGED, MASKED)
    if MASKED:
        valid = row_ok[:, None] & (j[None, :] >= 0) & (j[None, :] <= pos[:, None])
        qk = tl.where(valid, qk, float("-inf"))
    # scaling by qk_scale > 0 commutes with the max, so the max is taken on raw scores (one multiply per row)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: sums stay 0, no NaN
    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(qk * qk_scale - m_new[:, None]), 1)
    return m_new, l_i


# Ints that change with the batch's lengths are not specialised (one compile, not one per chunk shape: Triton
# compiles a variant per int specialisation, = 1 / divisible by 16); they only bound loops and masks.
@triton.jit(do_not_specialize=["tiles_per_split", "n_last", "num_heads", "stride_tok"])
def _lastq_lse_kernel(Q, K, KvStart, ReqToToken, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, MaxOut, SumOut,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_tok, qk_scale, n_last, tiles_per_split,
                      num_heads, PAGED: tl.constexpr, HEADS: tl.constexpr, BLOCK: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """Pass 1: partial (row max, row sum) in the exp2 domain over this program's share of key tiles.

    Rows are independent, so the stacked heads share only the K tile and the dot; each keeps its own row state.
    Tiles 0 and ``n_tiles - 1`` are masked, every other tile runs without a single mask.
    """
    r, g, s, u_s, u_e, sk, p0, pos, rows, head, row_ok, n_tiles, kvh, q, key_base = _lastq_setup(
        Q, KvStart, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, stride_qt, stride_qh, stride_tok, n_last,
        tiles_per_split, PAGED, HEADS, BLOCK, HEAD_DIM)
    m_i = tl.full([BLOCK * HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK * HEADS], tl.float32)
    if u_s == 0 and u_e > 0:  # -- tile 0: the causal triangle
        m_i, l_i = _lse_tile(m_i, l_i, q, pos, row_ok, K, ReqToToken, key_base, kvh, 0, p0, sk, stride_kt,
                             stride_kh, qk_scale, BLOCK, HEAD_DIM, PAGED, True)
    for u in range(tl.maximum(u_s, 1), tl.minimum(u_e, n_tiles - 1)):  # -- interior: no mask
        m_i, l_i = _lse_tile(m_i, l_i, q, pos, row_ok, K, ReqToToken, key_base, kvh, u, p0, sk, stride_kt,
                             stride_kh, qk_scale, BLOCK, HEAD_DIM, PAGED, False)
    last = n_tiles - 1
    if last > 0 and last >= u_s and last < u_e:  # -- the last tile may reach below key 0
        m_i, l_i = _lse_tile(m_i, l_i, q, pos, row_ok, K, ReqToToken, key_base, kvh, last, p0, sk, stride_kt,
                             stride_kh, qk_scale, BLOCK, HEAD_DIM, PAGED, True)
    # -- [B, Hs, 64, splits]: one row's partials are contiguous for pass 2's merge; padding lanes not stored
    out = ((r * num_heads + head).to(tl.int64) * BLOCK + rows) * tl.num_programs(2) + s
    tl.store(MaxOut + out, m_i, mask=head >= 0)
    tl.store(SumOut + out, l_i, mask=head >= 0)


@triton.jit
def _merged_lse(MaxIn, SumIn, r, head, rows, row_ok, num_heads, splits,
                HEADS: tl.constexpr, BLOCK: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """Log2-sum-exp of each stacked row from pass 1's per-split partials; ``+inf`` on rows that are not scored
    (their probabilities become exactly 0 without a mask). A NaN score anywhere in a row makes its lse NaN."""
    base = ((r * num_heads + tl.maximum(head, 0)).to(tl.int64) * BLOCK + rows) * splits
    m = tl.full([BLOCK * HEADS], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK * HEADS], tl.float32)
    for s0 in range(0, splits, SPLIT_CHUNK):
        si = s0 + tl.arange(0, SPLIT_CHUNK)
        ok = row_ok[:, None] & (si < splits)[None, :]
        ms = tl.load(MaxIn + base[:, None] + si[None, :], mask=ok, other=float("-inf"))
        ls = tl.load(SumIn + base[:, None] + si[None, :], mask=ok, other=0.0)
        m_new = tl.maximum(m, tl.max(ms, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - m_new) + tl.sum(ls * tl.exp2(ms - m_new[:, None]), 1)
        m = m_new
    return tl.where(row_ok, m + tl.log2(tl.where(row_ok, l, 1.0)), float("inf"))


@triton.jit
def _scores_tile(qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, u, p0, sk, stride_kt, stride_kh,
                 qk_scale, HEADS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr,
                 MASKED: tl.constexpr):
    """Probabilities of key tile ``u`` summed per (key, head) and per (diagonal, head), one dot, one skew.

    The tile is computed transposed, ``k @ q^T`` (keys along the MMA's rows, the stacked estimation rows along
    its columns), so the sums over estimation rows stay inside a thread and its quad: no cross-warp reduction.
    Element (key c, row a) lies on diagonal ``64 u + a - c``: diagonal tile ``u`` when ``a >= c``, ``u - 1``
    otherwise. Gathering key ``(a - o) mod 64`` of each row ``a`` puts both halves of diagonal index ``o`` in row
    ``o`` of the gathered tile; ``lower`` (``a >= o``) tells them apart. Returns ``(col, d_lo, d_hi)``, each
    ``[64, HEADS]``: column sums, diagonal-tile-``u`` sums, diagonal-tile-``u - 1`` sums.
    """
    j = p0 - BLOCK * u + tl.arange(0, BLOCK)
    k = _key_tile(K, ReqToToken, key_base, kvh, j, sk, stride_kt, stride_kh, HEAD_DIM, PAGED, MASKED)
    p = tl.exp2(tl.dot(k, qt) * qk_scale - lse[None, :])  # [64 keys, 64 * HEADS rows]
    if MASKED:
        p = tl.where((j[:, None] >= 0) & (j[:, None] <= pos[None, :]), p, 0.0)
    col = tl.sum(tl.reshape(p, [BLOCK, BLOCK, HEADS]), 1)
    g = tl.gather(p, skew, axis=0)
    d_lo = tl.sum(tl.reshape(tl.where(lower, g, 0.0), [BLOCK, BLOCK, HEADS]), 1)
    d_hi = tl.sum(tl.reshape(tl.where(lower, 0.0, g), [BLOCK, BLOCK, HEADS]), 1)
    return col, d_lo, d_hi


@triton.jit
def _scores_step(carry, qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, u, p0, sk, stride_kt, stride_kh,
                 qk_scale, ColOut, DiagOut, out_base, lane_ok, o, HEADS: tl.constexpr, BLOCK: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr):
    """Key tile ``u`` after a split's first: stores its columns and diagonal tile ``u - 1`` (``carry``, the lower
    half kept from tile ``u - 1``, plus this tile's upper half); returns the lower half of diagonal tile ``u``."""
    col, d_lo, d_hi = _scores_tile(qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, u, p0, sk, stride_kt,
                                   stride_kh, qk_scale, HEADS, BLOCK, HEAD_DIM, PAGED, MASKED)
    j = p0 - BLOCK * u + o
    tl.store(ColOut + out_base + j[:, None], col, mask=lane_ok & (j >= 0)[:, None])
    off = BLOCK * (u - 1) + o
    tl.store(DiagOut + out_base + off[:, None], carry + d_hi, mask=lane_ok & (off < sk)[:, None])
    return d_lo


@triton.jit(do_not_specialize=["tiles_per_split", "n_last", "num_heads", "splits1", "stride_out_b",
                                "stride_out_h", "stride_tok"])
def _lastq_scores_kernel(Q, K, KvStart, ReqToToken, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, MaxIn, SumIn,
                         ColOut, DiagOut, stride_qt, stride_qh, stride_kt, stride_kh, stride_tok, stride_out_b,
                         stride_out_h, qk_scale, n_last, tiles_per_split, num_heads, splits1,
                         PAGED: tl.constexpr, HEADS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                         SPLIT_CHUNK: tl.constexpr):
    """Pass 2: probabilities summed per key (column) and per diagonal ``offset = pos - key``, per stacked head.

    The program merges pass 1's partials of its rows itself, then walks its key tiles ``[u_s, u_e)`` once,
    one dot each. Key tile ``u`` completes the columns of its own keys, the lower half of diagonal tile ``u``
    (kept in registers) and the upper half of diagonal tile ``u - 1`` (stored with the half kept from the tile
    before). The upper half of diagonal tile ``u_e - 1`` comes from key tile ``u_e``, the next split's first:
    the program computes that one tile too, so splits never write the same entry (no atomics, deterministic).
    """
    r, g, s, u_s, u_e, sk, p0, pos, rows, head, row_ok, n_tiles, kvh, q, key_base = _lastq_setup(
        Q, KvStart, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, stride_qt, stride_qh, stride_tok, n_last,
        tiles_per_split, PAGED, HEADS, BLOCK, HEAD_DIM)
    if u_s < u_e:
        lse = _merged_lse(MaxIn, SumIn, r, head, rows, row_ok, num_heads, splits1, HEADS, BLOCK, SPLIT_CHUNK)
        qt = tl.trans(q)  # [D, 64 * HEADS], loop invariant
        slot_head = tl.load(Slots + g * HEADS + tl.arange(0, HEADS))  # [HEADS] output head of each lane
        lane_ok = (slot_head >= 0)[None, :]
        out_base = (r.to(tl.int64) * stride_out_b + slot_head.to(tl.int64) * stride_out_h)[None, :]
        o = tl.arange(0, BLOCK)
        skew = (rows[None, :] - o[:, None]) & (BLOCK - 1)  # [64, 64*HEADS]: key of diagonal index o in row a
        lower = rows[None, :] >= o[:, None]
        # -- first tile of the split (masked: it may be tile 0): its columns, the lower half of its diagonals
        col, carry, d_hi = _scores_tile(qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, u_s, p0, sk,
                                        stride_kt, stride_kh, qk_scale, HEADS, BLOCK, HEAD_DIM, PAGED, True)
        j = p0 - BLOCK * u_s + o
        tl.store(ColOut + out_base + j[:, None], col, mask=lane_ok & ((j >= 0) & (j < sk))[:, None])
        # -- interior tiles, no mask: columns, diagonal tile u - 1 complete, lower half of tile u carried
        last = n_tiles - 1
        inner_end = tl.where(u_e == n_tiles, last, u_e)
        for u in range(u_s + 1, inner_end):
            carry = _scores_step(carry, qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, u, p0, sk,
                                 stride_kt, stride_kh, qk_scale, ColOut, DiagOut, out_base, lane_ok, o, HEADS,
                                 BLOCK, HEAD_DIM, PAGED, False)
        # -- the request's last tile (may reach below key 0), when it is in this split and not its first
        if inner_end < u_e and inner_end > u_s:
            carry = _scores_step(carry, qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, last, p0, sk,
                                 stride_kt, stride_kh, qk_scale, ColOut, DiagOut, out_base, lane_ok, o, HEADS,
                                 BLOCK, HEAD_DIM, PAGED, True)
        # -- diagonal tile u_e - 1: its upper half from key tile u_e (all keys below 0 past the last tile: 0)
        col, d_lo, d_hi = _scores_tile(qt, pos, lse, skew, lower, K, ReqToToken, key_base, kvh, u_e, p0, sk,
                                       stride_kt, stride_kh, qk_scale, HEADS, BLOCK, HEAD_DIM, PAGED, True)
        off = BLOCK * (u_e - 1) + o
        tl.store(DiagOut + out_base + off[:, None], carry + d_hi, mask=lane_ok & (off < sk)[:, None])


def _validate(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, q_head: torch.Tensor, kv_head: torch.Tensor):
    check_queries_and_kv(q, kv, geom)
    check_tensor(q_head, "q_head", ndim=1, dtypes=(torch.int32,))
    check_tensor(kv_head, "kv_head", ndim=1, dtypes=(torch.int32,))
    check(kv_head.shape == q_head.shape, "kv_head", "one KV head per query head needed")
    check(q_head.shape[0] > 0, "q_head", "no head to score")


@dataclass(frozen=True)
class LastqLaunch:
    """How ``lastq_scores`` launches its passes: scored heads stacked per program (a power of two, at most the
    GQA group) and warps, per pass; pipeline stages; the split count aims at ``waves`` programs per SM."""

    lse_heads: int
    lse_warps: int
    scores_heads: int
    scores_warps: int
    num_stages: int
    waves: int = 4


MIN_TILES_PER_SPLIT = 8  # below this a split's fixed cost (q load, lse merge, pass 2's extra tile) dominates
SPLIT_CHUNK = 16  # pass-1 partials merged per step in pass 2


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (host-side property, no sync); 132 (an H100/H200) off the GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _splits(num_tiles: int, programs: int, sms: int, waves: int) -> tuple[int, int]:
    """(splits, tiles per split) over the key axis: about ``waves`` programs per SM, no split under
    ``MIN_TILES_PER_SPLIT`` tiles (one split when the context is short)."""
    want = max(1, triton.cdiv(waves * sms, max(programs, 1)))
    splits = max(1, min(want, triton.cdiv(num_tiles, MIN_TILES_PER_SPLIT)))
    per = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, per), per


@triton.jit(do_not_specialize=["hs"])
def _head_slots_kernel(KvHead, Table, hs, HEADS: tl.constexpr, HS_P: tl.constexpr):
    """One program: lane ``rank % HEADS`` of slot ``base + rank // HEADS`` gets scored head ``i``, where ``rank`` is
    ``i``'s rank among the heads of its KV head (index order) and ``base`` counts the slots of smaller KV heads."""
    i = tl.arange(0, HS_P)
    ok = i < hs
    kv = tl.load(KvHead + i, mask=ok, other=-1)
    kv_col = tl.reshape(kv, [1, HS_P])
    ok_col = tl.reshape(ok, [1, HS_P])
    same = (kv[:, None] == kv_col) & ok_col  # [i, i']
    rank = tl.sum((same & (tl.reshape(i, [1, HS_P]) < i[:, None])).to(tl.int32), 1)
    count = tl.sum(same.to(tl.int32), 1)
    slots_of = (count + HEADS - 1) // HEADS  # slots of i's KV head
    first_col = tl.reshape(rank == 0, [1, HS_P])
    below = (kv_col < kv[:, None]) & first_col & ok_col
    base = tl.sum(tl.where(below, tl.reshape(slots_of, [1, HS_P]), 0), 1)
    tl.store(Table + (base + rank // HEADS) * HEADS + rank % HEADS, i, mask=ok)


@triton.jit
def slot_program(Table):
    """The (query block, slot, lane) of a program on a ``(NQB, slots, G)`` grid over the slot table
    (:func:`_head_slots`), and the scored head in that lane (``-1``: a padding lane, nothing to do)."""
    qb = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    return qb, s, g, tl.load(Table + s * tl.num_programs(2) + g)


def _head_slots(kv_head: torch.Tensor, num_kv_heads: int, group: int, heads: int) -> torch.Tensor:
    """Scored heads grouped by the KV head they read: ``[slots, heads]`` int32 indices into ``kv_head``, -1 padded.

    A KV head's scored heads fill ``cdiv(count, heads)`` consecutive slots (KV heads ascending), lanes in index
    order. The slot count is a host-side bound (at most ``group`` distinct heads per KV head, at most ``Hs`` in
    all), so nothing syncs; slots past the used ones are all -1. One small kernel, no torch op chain.
    """
    hs = kv_head.shape[0]
    slots = min(num_kv_heads * triton.cdiv(group, heads), (hs + min(num_kv_heads, hs) * (heads - 1)) // heads)
    table = torch.full((slots, heads), -1, device=kv_head.device, dtype=torch.int32)
    _head_slots_kernel[(1,)](kv_head, table, hs, HEADS=heads, HS_P=triton.next_power_of_2(hs))
    return table


def lastq_launch(group: int, num_scored: int, head_dim: int) -> LastqLaunch:
    """Default launch. Pass 1 stacks up to 4 heads (a K tile read once per Llama-3 GQA group; no register spill
    at any head_dim on sm_90), 8 warps. Pass 2 (transposed) stacks 2 heads on 4 warps; one at head_dim 256 (two
    spill 360 bytes on sm_90; not measured). 4 waves of programs per SM, 3 stages (2 at head_dim 256, for
    shared memory).

    Measured on an H200 (2026-12-01, one 8K-query chunk at 256K keys, 32/8 heads, bf16; ``lastq_scores`` ms for
    the 8B (D 128) / 1B (D 64) shapes; benchmarks/results/estimate_h200_launch_sweep.json and
    estimate_h200_pass2_variants.json): this default 1.19 / 1.04; 2 waves 1.59 / 1.35, 8 waves 1.28 / 1.11;
    2 stages 1.51 / 1.39; pass 2 with 4 heads on 8 warps 1.80 / 1.63, with 1 head 1.94 / 1.63; pass 2 not
    transposed (estimation rows along the MMA's rows: cross-warp sums, 15 barriers per tile) 2.70 / 2.76;
    pass 1 with 2 heads instead of 4: 2.99 against 2.70 (8B, untransposed pass 2).
    """
    most = triton.next_power_of_2(min(group, num_scored))
    lse, scores = min(most, 4), min(most, 2 if head_dim <= 128 else 1)
    return LastqLaunch(lse_heads=lse, lse_warps=4 if lse == 1 else 8, scores_heads=scores, scores_warps=4,
                       num_stages=3 if head_dim <= 128 else 2, waves=4)


def lastq_scores(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, q_head: torch.Tensor, kv_head: torch.Tensor,
                 *, sm_scale: float, last_q: int = 64, launch: LastqLaunch | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal softmax sums of the last ``min(last_q, Sq_r)`` queries of every request.

    Each program scores several heads of one KV head at once, so a key tile is read once per group of heads,
    not once per head; two passes (row log-sum-exp, then the sums), one dot per key tile each.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 chunk queries, packed by ``geom.cu_seqlens_q``.
        kv: keys of every request (``k`` is ``[rows, Hk, D]``, same dtype as ``q``).
        q_head, kv_head: ``[Hs]`` int32: the distinct query heads to score (any order, any subset) and the KV head
            each reads (GQA: ``q_head // (Hq // Hk)``).
        launch: launch configuration (default :func:`lastq_launch`), for benchmarks.
    Returns:
        ``(col, diag)``, each ``[B, Hs, max Sk]`` float32 in the order of ``q_head``: ``col[r, h, j]`` =
        probability mass on key ``j``, ``diag[r, h, o]`` = mass on the diagonal ``pos - key = o``; entries at
        ``>= Sk_r`` are ``-1``. A NaN in a head's estimation queries or keys makes that head's sums NaN.
    """
    sums = lastq_sums(q, kv, geom, q_head, kv_head, sm_scale=sm_scale, last_q=last_q, launch=launch)
    return sums[0], sums[1]


def lastq_sums(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, q_head: torch.Tensor, kv_head: torch.Tensor,
               *, sm_scale: float, last_q: int = 64, launch: LastqLaunch | None = None) -> torch.Tensor:
    """:func:`lastq_scores` as one ``[2, B, Hs, max Sk]`` float32 tensor (column sums, then diagonal sums), the
    form the selection kernels read both from in one launch."""
    _validate(q, kv, geom, q_head, kv_head)
    refuse_bf16(q=q)
    check(1 <= last_q <= BLOCK, "last_q", f"{last_q} not in [1, {BLOCK}]")
    B, Hs, D = geom.num_requests, q_head.shape[0], q.shape[2]
    Hk = kv.k.shape[1]
    group = q.shape[1] // Hk
    launch = launch or lastq_launch(group, Hs, D)
    for name in ("lse_heads", "scores_heads"):
        n = getattr(launch, name)
        check(n >= 1 and (n & (n - 1)) == 0, "launch", f"{name} = {n} is not a power of two")
    max_sk = geom.max_seqlen_k
    num_tiles = (max_sk + BLOCK - 2) // BLOCK + 1  # key tiles of the longest request (p0 <= max_sk - 1)
    qk_scale = sm_scale * LOG2E
    kv_ptrs = kv_args(kv)
    args = (q, kv.k, *kv_ptrs[:3], geom.cu_seqlens_q, geom.seq_lens_k, q_head, kv_head)
    strides = (q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv_ptrs[3])
    common = dict(PAGED=kv_ptrs[4], BLOCK=BLOCK, HEAD_DIM=D, num_stages=launch.num_stages)
    sms = sm_count(q.device)

    slots = _head_slots(kv_head, Hk, group, launch.lse_heads)
    splits1, per1 = _splits(num_tiles, B * slots.shape[0], sms, launch.waves)
    row_max = torch.empty(B, Hs, BLOCK, splits1, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    _lastq_lse_kernel[(B, slots.shape[0], splits1)](
        *args, slots, row_max, row_sum, *strides, qk_scale, last_q, per1, Hs, HEADS=launch.lse_heads,
        num_warps=launch.lse_warps, **common)

    if launch.scores_heads != launch.lse_heads:
        slots = _head_slots(kv_head, Hk, group, launch.scores_heads)
    # Rows padded to 4 floats: the diagonal half then starts 16-byte aligned at every length (Triton compiles a
    # variant per pointer alignment, so an odd length would compile the kernel again mid-request).
    sums = torch.empty(2, B, Hs, triton.cdiv(max_sk, 4) * 4, device=q.device, dtype=torch.float32)[..., :max_sk]
    col, diag = sums[0], sums[1]
    splits2, per2 = _splits(num_tiles, B * slots.shape[0], sms, launch.waves)
    _lastq_scores_kernel[(B, slots.shape[0], splits2)](
        *args, slots, row_max, row_sum, col, diag, *strides, col.stride(0), col.stride(1), qk_scale, last_q, per2, Hs,
        splits1, HEADS=launch.scores_heads, SPLIT_CHUNK=SPLIT_CHUNK, num_warps=launch.scores_warps, **common)
    for r, sk in enumerate(geom.seq_lens_k_cpu):  # the kernels write every entry below Sk_r; host ints, no sync
        if sk < max_sk:
            sums[:, r, :, sk:] = -1.0
    return sums


@triton.jit(do_not_specialize=["stride_tok", "stride_ob", "stride_oh", "stride_on"])
def _pool_keys_kernel(K, KvStart, ReqToToken, PoolIdx, SeqK, Out, stride_kt, stride_kh, stride_tok,
                      stride_ob, stride_oh, stride_on, PAGED: tl.constexpr, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """Mean of the valid keys of aligned key block ``n`` of request ``r``, KV head ``h`` (fp32)."""
    r = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2)
    sk = tl.load(SeqK + r)
    j = n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = j < sk
    rows = kv_rows(KvStart, ReqToToken, PoolIdx, r, tl.where(kmask, j, 0), stride_tok, PAGED)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + rows[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kmask[:, None], other=0.0)
    count = tl.maximum(tl.minimum(sk - n * BLOCK_N, BLOCK_N), 1)
    mean = tl.sum(k.to(tl.float32), 0) / count.to(tl.float32)
    tl.store(Out + r.to(tl.int64) * stride_ob + h * stride_oh + n.to(tl.int64) * stride_on + offs_d, mean,
             mask=n * BLOCK_N < sk)


def pool_keys(kv: KVSource, geom: BatchGeometry) -> torch.Tensor:
    """Mean-pooled keys per aligned 64-key block: ``[B, Hk, cdiv(max Sk, 64), D]`` float32.

    Blocks past a request's end are 0; the last partial block averages only its valid keys (padding excluded).
    """
    check_kv(kv, geom)
    B, Hk, D = geom.num_requests, kv.k.shape[1], kv.k.shape[2]
    nkb = triton.cdiv(geom.max_seqlen_k, BLOCK)
    out = torch.zeros(B, Hk, nkb, D, device=kv.k.device, dtype=torch.float32)
    kv_ptrs = kv_args(kv)
    _pool_keys_kernel[(B, Hk, nkb)](kv.k, *kv_ptrs[:3], geom.seq_lens_k, out, kv.k.stride(0), kv.k.stride(1),
                                    kv_ptrs[3], out.stride(0), out.stride(1), out.stride(2), PAGED=kv_ptrs[4],
                                    BLOCK_N=BLOCK, HEAD_DIM=D)
    return out


@triton.jit(do_not_specialize=["stride_os", "stride_og", "stride_oq"])
def _pool_queries_kernel(Q, CuQ, QbReq, QbRow, QHead, Table, Out, stride_qt, stride_qh, stride_os, stride_og,
                         stride_oq, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Mean of the valid rows of query block ``qb`` for the scored head in lane ``g`` of slot ``s`` (fp32)."""
    qb, s, g, h = slot_program(Table)
    if h >= 0:
        r = tl.load(QbReq + qb)
        start = tl.load(CuQ + r) + tl.load(QbRow + qb)
        n = tl.minimum(tl.load(CuQ + r + 1) - start, BLOCK_M)
        rows = tl.arange(0, BLOCK_M)
        qh = tl.load(QHead + h).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        x = tl.load(Q + (start + rows).to(tl.int64)[:, None] * stride_qt + qh * stride_qh + offs_d[None, :],
                    mask=(rows < n)[:, None], other=0.0)
        mean = tl.sum(x.to(tl.float32), 0) / n.to(tl.float32)
        tl.store(Out + s.to(tl.int64) * stride_os + g.to(tl.int64) * stride_og + qb.to(tl.int64) * stride_oq + offs_d,
                 mean)


def pool_queries(q: torch.Tensor, geom: BatchGeometry, q_head: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Mean-pooled queries of every query block, grouped like the slot table (padding rows excluded).

    Args:
        q: ``[T, Hq, D]`` chunk queries; q_head: ``[Hs]`` int32 scored heads; table: ``[slots, G]`` int32 indices
            into ``q_head`` (``_head_slots``: the heads of one KV head per slot, -1 padding).
    Returns:
        ``[slots, G, NQB, D]`` float32: ``out[s, g, qb]`` is query block ``qb``'s mean for head ``table[s, g]``;
        padding lanes are left unwritten (their scores are never read).
    """
    check_tensor(q, "q", ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    nqb, (slots, group), D = geom.num_query_blocks, table.shape, q.shape[2]
    out = torch.empty(slots, group, nqb, D, device=q.device, dtype=torch.float32)
    _pool_queries_kernel[(nqb, slots, group)](
        q, geom.cu_seqlens_q, geom.qb_request, geom.qb_row, q_head, table, out, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), out.stride(2), BLOCK_M=BLOCK, HEAD_DIM=D)
    return out


__all__ = ["LastqLaunch", "lastq_launch", "lastq_scores", "lastq_sums", "pool_keys", "pool_queries"]
