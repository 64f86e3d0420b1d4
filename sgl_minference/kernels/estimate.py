"""Triton kernels for the online index estimation (hot at long lengths, so never Python loops).

* ``lastq_scores``: softmax of the last ``n = min(last_q, Sq)`` queries of each request's chunk against all its
  keys (bottom-right causal, fp32), reduced to per-key column sums and per-diagonal sums, for vertical-slash.
* ``pool_keys``: mean of each aligned 64-key block (padding excluded), for block-sparse.

Both read keys through a ``KVSource`` (contiguous or SGLang's paged pool), so a cached prefix is never copied.
Memory is O(heads x context): no [queries x keys] score matrix is ever materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import BLOCK, BatchGeometry, KVSource, check, check_queries_and_kv, check_tensor
from .interpreter import refuse_bf16
from .kv_access import kv_args, kv_rows
from .sparse_attention import LOG2E


@triton.jit
def _lastq_tile_scores(q, pos, row_ok, K, KvStart, ReqToToken, PoolIdx, r, kvh, j, sk, stride_tok,
                      stride_kt, stride_kh, qk_scale, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr):
    """exp2-domain scores of the stacked row tile ``q`` against key positions ``j`` (one K tile load, one dot),
    and which pairs are valid."""
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = (j >= 0) & (j < sk)
    rows = kv_rows(KvStart, ReqToToken, PoolIdx, r, tl.where(kmask, j, 0), stride_tok, PAGED)
    k = tl.load(K + rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kmask[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    valid = row_ok[:, None] & kmask[None, :] & (j[None, :] <= pos[:, None])
    return qk, valid


@triton.jit
def _lastq_setup(Q, CuQ, SeqK, QHead, KvHead, Slots, stride_qt, stride_qh, n_last,
                 HEADS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Program (request r, slot g, split s): up to HEADS scored heads of one KV head, their q tiles stacked.

    Row ``m`` of the ``[HEADS * BLOCK_M]`` tile is estimation row ``m % BLOCK_M`` (position ``pos``) of scored
    head ``head[m] = Slots[g, m // BLOCK_M]``; ``head`` is -1 on padding lanes (rows masked: no load, no store).
    ``busy`` is false for an all-padding slot, which then scans no key tile.
    """
    r = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    sk = tl.load(SeqK + r)
    q_end = tl.load(CuQ + r + 1)
    n = tl.minimum(n_last, q_end - tl.load(CuQ + r))
    p0 = sk - n  # absolute position of the first estimation row
    m = tl.arange(0, HEADS * BLOCK_M)
    rows = m % BLOCK_M
    head = tl.load(Slots + g * HEADS + m // BLOCK_M)
    row_ok = (rows < n) & (head >= 0)
    first = tl.load(Slots + g * HEADS)  # lanes fill in order: a used slot has lane 0
    busy = first >= 0
    kvh = tl.load(KvHead + tl.maximum(first, 0)).to(tl.int64)
    qh = tl.load(QHead + head, mask=head >= 0, other=0).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = (q_end - n + rows).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    return r, g, s, sk, busy, p0, p0 + rows, rows, head, row_ok, kvh, q


@triton.jit
def _lastq_lse_kernel(Q, K, KvStart, ReqToToken, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, MaxOut, SumOut,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_tok, qk_scale, n_last, tiles_per_split,
                      num_heads, PAGED: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pass 1: partial (row max, row sum) in the exp2 domain over this program's share of key tiles.

    Rows are independent, so the stacked heads share only the K tile and the dot; each keeps its own row state.
    """
    tl.static_assert(BLOCK_M == 64)
    tl.static_assert((HEADS & (HEADS - 1)) == 0)
    r, g, s, sk, busy, p0, pos, rows, head, row_ok, kvh, q = _lastq_setup(
        Q, CuQ, SeqK, QHead, KvHead, Slots, stride_qt, stride_qh, n_last, HEADS, BLOCK_M, HEAD_DIM)
    m_i = tl.full([HEADS * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_M], tl.float32)
    t_end = tl.minimum((s + 1) * tiles_per_split, tl.where(busy, tl.cdiv(sk, BLOCK_N), 0))
    for t in range(s * tiles_per_split, t_end):
        j = t * BLOCK_N + tl.arange(0, BLOCK_N)
        qk, valid = _lastq_tile_scores(q, pos, row_ok, K, KvStart, ReqToToken, PoolIdx, r, kvh, j, sk,
                                      stride_tok, stride_kt, stride_kh, qk_scale, HEAD_DIM, PAGED)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: keep sums at 0, no NaN
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
        m_i = m_new
    # -- every row of every scored head is written (rows past n keep -inf / 0); padding lanes are not
    out = ((r * num_heads + head).to(tl.int64) * tl.num_programs(2) + s) * BLOCK_M + rows
    tl.store(MaxOut + out, m_i, mask=head >= 0)
    tl.store(SumOut + out, l_i, mask=head >= 0)


@triton.jit
def _lastq_scores_kernel(Q, K, KvStart, ReqToToken, PoolIdx, CuQ, SeqK, QHead, KvHead, Slots, Lse2, ColOut,
                         DiagOut, stride_qt, stride_qh, stride_kt, stride_kh, stride_tok, stride_out_b,
                         stride_out_h, qk_scale, n_last, tiles_per_split, num_heads,
                         PAGED: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
    """Pass 2: probabilities summed per key (column) and per diagonal ``offset = pos - key``, per stacked head.

    Program tile t owns diagonal offsets [64t, 64t+64). Those offsets touch the 128 keys
    [p0 - 64t - 63, p0 - 64t + 64]; the upper 64 of them are this tile's columns (tiles 0..cdiv(Sk,64) cover every
    key exactly once). A gather skews each head's [64, 128] probability tile so that each diagonal becomes a
    column; the stacked ``[HEADS * 64, N]`` tiles are then reshaped to ``[HEADS, 64, N]`` and summed per head.
    """
    tl.static_assert(BLOCK_M == 64)
    tl.static_assert(BLOCK_N == 64)
    tl.static_assert((HEADS & (HEADS - 1)) == 0)
    r, g, s, sk, busy, p0, pos, rows, head, row_ok, kvh, q = _lastq_setup(
        Q, CuQ, SeqK, QHead, KvHead, Slots, stride_qt, stride_qh, n_last, HEADS, BLOCK_M, HEAD_DIM)
    lse2 = tl.load(Lse2 + (r * num_heads + head).to(tl.int64) * BLOCK_M + rows, mask=row_ok, other=0.0)
    slot_head = tl.load(Slots + g * HEADS + tl.arange(0, HEADS))  # [HEADS] output head of each lane, -1 padding
    out_base = r.to(tl.int64) * stride_out_b + slot_head.to(tl.int64) * stride_out_h
    jj = tl.arange(0, 2 * BLOCK_N)
    o = tl.arange(0, BLOCK_N)
    skew = (BLOCK_N - 1) + rows[:, None] - o[None, :]  # [HEADS*64, 64]: p[a, skew[a, o]] lies on diagonal o0 + o
    t_end = tl.minimum((s + 1) * tiles_per_split, tl.where(busy, tl.cdiv(sk, BLOCK_N) + 1, 0))
    for t in range(s * tiles_per_split, t_end):
        o0 = t * BLOCK_N
        j = p0 - o0 - (BLOCK_N - 1) + jj
        qk, valid = _lastq_tile_scores(q, pos, row_ok, K, KvStart, ReqToToken, PoolIdx, r, kvh, j, sk,
                                      stride_tok, stride_kt, stride_kh, qk_scale, HEAD_DIM, PAGED)
        p = tl.where(valid, tl.exp2(qk - lse2[:, None]), 0.0)
        # -- columns: keys of the upper half belong to this tile
        col = tl.sum(tl.reshape(p, [HEADS, BLOCK_M, 2 * BLOCK_N]), 1)
        col_ok = (jj >= BLOCK_N) & (j >= 0) & (j < sk)
        tl.store(ColOut + out_base[:, None] + j[None, :], col, mask=(slot_head >= 0)[:, None] & col_ok[None, :])
        # -- diagonals: skew each row by its position within its head, then reduce over that head's rows
        diag = tl.sum(tl.reshape(tl.gather(p, skew, axis=1), [HEADS, BLOCK_M, BLOCK_N]), 1)
        tl.store(DiagOut + out_base[:, None] + (o0 + o)[None, :], diag,
                 mask=(slot_head >= 0)[:, None] & ((o0 + o) < sk)[None, :])


def _validate(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, q_head: torch.Tensor, kv_head: torch.Tensor):
    check_queries_and_kv(q, kv, geom)
    check_tensor(q_head, "q_head", ndim=1, dtypes=(torch.int32,))
    check_tensor(kv_head, "kv_head", ndim=1, dtypes=(torch.int32,))
    check(kv_head.shape == q_head.shape, "kv_head", "one KV head per query head needed")
    check(q_head.shape[0] > 0, "q_head", "no head to score")


def _splits(num_tiles: int, programs: int) -> tuple[int, int]:
    """(splits, tiles per split): enough programs to fill an H100 (132 SMs) without tiny splits."""
    splits = max(1, min(triton.cdiv(num_tiles, 4), triton.cdiv(4 * 132, max(programs, 1))))
    per = triton.cdiv(num_tiles, splits)
    return triton.cdiv(num_tiles, per), per


def _head_slots(kv_head: torch.Tensor, num_kv_heads: int, group: int, heads: int) -> torch.Tensor:
    """Scored heads grouped by the KV head they read: ``[slots, heads]`` int32 indices into ``kv_head``, -1 padded.

    A KV head's scored heads fill ``cdiv(count, heads)`` consecutive slots, lanes in order. The slot count is a
    host-side bound (at most ``group`` distinct heads per KV head, at most ``Hs`` in all), so nothing syncs; slots
    past the used ones are all -1.
    """
    hs = kv_head.shape[0]
    slots = min(num_kv_heads * triton.cdiv(group, heads), (hs + min(num_kv_heads, hs) * (heads - 1)) // heads)
    kv_sorted, order = torch.sort(kv_head, stable=True)
    rank = torch.arange(hs, device=kv_head.device) - torch.searchsorted(kv_sorted, kv_sorted)  # within its KV head
    lane = rank % heads
    slot = torch.cumsum(lane == 0, 0) - 1
    table = torch.full((slots * heads,), -1, device=kv_head.device, dtype=torch.int32)
    return table.scatter_(0, slot * heads + lane, order.to(torch.int32)).view(slots, heads)


def _heads_per_program(group: int, num_scored: int, head_dim: int) -> int:
    """Scored heads stacked per program: two where the GQA group allows, one at head_dim 256.

    Measured on the H100 (2026-11-24, 8K-query chunk at 128K keys, 32/8 heads, bf16): last-q sums 3.58 ms with
    one head per program, 2.91 ms with two, 3.40 ms with four (register spills); at head_dim 256 two heads need
    256 KiB of shared memory in the scores pass (OutOfResources, limit 227 KiB).
    """
    return min(triton.next_power_of_2(min(group, num_scored)), 2 if head_dim <= 128 else 1)


def _num_warps(heads: int, head_dim: int) -> int:
    """Warps of both last-q passes: one warpgroup for a single 64-row tile up to head_dim 128, else two."""
    return 4 if heads == 1 and head_dim <= 128 else 8


def lastq_scores(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, q_head: torch.Tensor, kv_head: torch.Tensor,
                 *, sm_scale: float, last_q: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal softmax sums of the last ``min(last_q, Sq_r)`` queries of every request.

    Each program scores up to ``HEADS`` heads of one KV head at once, so a key tile is read once per group of
    heads, not once per head.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 chunk queries, packed by ``geom.cu_seqlens_q``.
        kv: keys of every request (``k`` is ``[rows, Hk, D]``, same dtype as ``q``).
        q_head, kv_head: ``[Hs]`` int32: the distinct query heads to score (any order, any subset) and the KV head
            each reads (GQA: ``q_head // (Hq // Hk)``).
    Returns:
        ``(col, diag)``, each ``[B, Hs, max Sk]`` float32 in the order of ``q_head``: ``col[r, h, j]`` =
        probability mass on key ``j``, ``diag[r, h, o]`` = mass on the diagonal ``pos - key = o``; entries at
        ``>= Sk_r`` are ``-1``.
    """
    _validate(q, kv, geom, q_head, kv_head)
    refuse_bf16(q=q)
    check(1 <= last_q <= BLOCK, "last_q", f"{last_q} not in [1, {BLOCK}]")
    B, Hs, D = geom.num_requests, q_head.shape[0], q.shape[2]
    Hk = kv.k.shape[1]
    group = q.shape[1] // Hk
    heads = _heads_per_program(group, Hs, D)
    slots = _head_slots(kv_head, Hk, group, heads)
    max_sk = geom.max_seqlen_k
    qk_scale = sm_scale * LOG2E
    kv_ptrs = kv_args(kv)
    common = dict(PAGED=kv_ptrs[4], HEADS=heads, BLOCK_M=BLOCK, BLOCK_N=BLOCK, HEAD_DIM=D,
                  num_warps=_num_warps(heads, D))

    splits, per = _splits(triton.cdiv(max_sk, BLOCK), B * slots.shape[0])
    maxes = torch.empty(B, Hs, splits, BLOCK, device=q.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    _lastq_lse_kernel[(B, slots.shape[0], splits)](
        q, kv.k, *kv_ptrs[:3], geom.cu_seqlens_q, geom.seq_lens_k, q_head, kv_head, slots, maxes, sums,
        q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv_ptrs[3], qk_scale, last_q, per, Hs, **common)
    m = maxes.amax(2, keepdim=True)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse2 = (m_safe + torch.log2((sums * torch.exp2(maxes - m_safe)).sum(2, keepdim=True))).squeeze(2).contiguous()

    col = torch.full((B, Hs, max_sk), -1.0, device=q.device, dtype=torch.float32)
    diag = torch.full_like(col, -1.0)
    splits, per = _splits(triton.cdiv(max_sk, BLOCK) + 1, B * slots.shape[0])
    _lastq_scores_kernel[(B, slots.shape[0], splits)](
        q, kv.k, *kv_ptrs[:3], geom.cu_seqlens_q, geom.seq_lens_k, q_head, kv_head, slots, lse2, col, diag,
        q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv_ptrs[3], col.stride(0), col.stride(1),
        qk_scale, last_q, per, Hs, **common)
    return col, diag


@triton.jit
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
    kv.validate(geom)
    B, Hk, D = geom.num_requests, kv.k.shape[1], kv.k.shape[2]
    nkb = triton.cdiv(geom.max_seqlen_k, BLOCK)
    out = torch.zeros(B, Hk, nkb, D, device=kv.k.device, dtype=torch.float32)
    kv_ptrs = kv_args(kv)
    _pool_keys_kernel[(B, Hk, nkb)](kv.k, *kv_ptrs[:3], geom.seq_lens_k, out, kv.k.stride(0), kv.k.stride(1),
                                    kv_ptrs[3], out.stride(0), out.stride(1), out.stride(2), PAGED=kv_ptrs[4],
                                    BLOCK_N=BLOCK, HEAD_DIM=D)
    return out


__all__ = ["lastq_scores", "pool_keys"]
