"""Sparse prefill attention forward: a Triton kernel that visits exactly the keys a ``SparseLayout`` names.

One program per (64-row query block, query head). It loads its query tile once and streams three kinds of
key tiles through one online-softmax helper (:func:`_fold`): the layout's full ranges (no mask at all),
its partial ranges (range / bounds / causal mask) and its gathered columns (causal / count mask); a key
tile holds one or two 64-key layout ranges (``AttentionLaunch.block_n``). Keys and values are read in place
from a packed tensor or from SGLang's paged pool (:func:`sgl_minference.kernels.kv_access.kv_rows`); K/V heads
are shared by GQA groups, never repeated. With ``AttentionLaunch.pool_runs`` (not the default yet) a paged
request whose slots are consecutive (``KVSource.run_start``, found once per batch) skips the slot table: its key
rows are ``run_start + j``, in the same code path as the table's (:func:`kv_access.kv_rows`). With
``AttentionLaunch.tma`` (not the default) the full tiles of packed keys are read by TMA through tensor descriptors.

Why (H200, 2026-12-03, ``benchmarks.tile_bench``, a plain causal kernel at 32K, head_dim 128): 64-row tiles reach
448 TFLOP/s with row arithmetic, 315 with every row looked up in a table first, 497 with TMA; 128-row tiles with TMA
reach 559, FA3 677. In this kernel (same GPU and day, ``benchmarks.kernel_bench --cases fa3,ours_dense``, packed
K/V, dense layout, head_dim 128, 32K-256K): 354-363 TFLOP/s, 409-428 with TMA, FA3 663-666. A first pool-run
design compiled a second key path beside the table's: its pipeline buffers doubled shared memory (149 KB against
83 KB, one program per SM instead of two) and made the kernel 1.3x slower than the table alone (``chunk_bench``,
Llama-3-8B at 128K, synthetic layouts: 224 against 173 ms; TMA on runs 195), so runs now share the table's path.

Paired launch (``AttentionLaunch.pair_blocks``, not the default): one program per two consecutive query blocks
A, B of a request (128 rows, meant for 8 warps: two warpgroups), over the two blocks' layouts merged by
:func:`pair_plan` (a range or column both name is listed once, flagged for both), so a key tile both blocks visit
feeds twice the rows per byte read. Measured slower (H200, 2026-12-03: its kernel alone 1.18-1.30x the 64-row
launch's time; BENCHMARKS.md): vertical-slash blocks share few tiles, each shifted by one range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sgl_minference.kernels.constants import LOG2E
from sgl_minference.kernels.interpreter import refuse_bf16
from sgl_minference.kernels.kv_access import kv_args, kv_rows
from sgl_minference.checks import check
from sgl_minference.layout import BLOCK, SENTINEL, BatchGeometry, KVSource, SparseLayout, check_tensor

# What the kernel serves, asked by the backend and the plugin before they route a layer or a model here (and
# checked by every kernel wrapper): head sizes it is compiled for (one LAUNCHES entry each) and q/K/V dtypes
# (fp32 for the interpreter tests only).
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # converts the base-2 lse back to the natural log


@triton.jit
def _fold(acc, l_i, m_i, q, k, v, keep, qk_scale, MASKED: tl.constexpr):
    """Fold one key tile into the running softmax state: ``k`` [BLOCK_D, BLOCK_N] and ``v`` [BLOCK_N, BLOCK_D]
    (input dtype); with ``MASKED``, ``keep`` [BLOCK_M, BLOCK_N] bool marks the (row, key) pairs attended, else all
    are. ``acc`` [BLOCK_M, BLOCK_D] fp32, ``l_i`` / ``m_i`` [BLOCK_M] fp32 (running sum and max, base-2 units)."""
    qk = tl.dot(q, k) * qk_scale
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A row that has seen no key yet keeps max = -inf; shifting by 0 then gives p = 0 instead of NaN.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attend(acc, l_i, m_i, q, cols, valid, select, pos_m,
            K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
            k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
            MASKED: tl.constexpr, PAGED: tl.constexpr, RunStart=None, RUNS: tl.constexpr = False):
    """Fold one tile of ``BLOCK_N`` keys (request-local positions ``cols``) into the running softmax state.

    With ``MASKED``, ``valid`` ([BLOCK_N] bool) marks the keys the caller may read (range / bounds / count),
    ``select`` ([BLOCK_M, BLOCK_N] or [1, BLOCK_N] bool, false wherever ``valid`` is) the (row, key) pairs
    among them that the layout names (``valid[None, :]`` when every row of the tile shares the keys; the
    paired kernel's two blocks differ), and the causal cut ``cols <= pos_m`` is applied on top; without it
    (``valid`` and ``select`` are None) every key of the tile is read and attended by every row.
    State as in :func:`_fold`; ``q`` [BLOCK_M, BLOCK_D] input dtype; ``cols`` [BLOCK_N] int32; ``pos_m``
    [BLOCK_M] int32 query positions; ``k_head`` / ``v_head`` int64 element offsets of the KV head; ``RunStart``
    / ``RUNS``: pool runs, as :func:`kv_rows` reads them.
    """
    if MASKED:
        # Masked-out keys are pointed at position 0 (always a real key) so the table lookup stays in bounds.
        cols = tl.where(valid, cols, 0)
    rows = kv_rows(KvStart, ReqToToken, PoolIdx, r, cols, stride_tok, PAGED, RunStart, RUNS)
    k_ptrs = K + k_head + rows[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + v_head + rows[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        keep = select & (cols[None, :] <= pos_m[:, None])
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
        keep = None
    return _fold(acc, l_i, m_i, q, k, v, keep, qk_scale, MASKED=MASKED)


@triton.jit
def _query_tile(qb, h, Q, CuSeqlensQ, SeqLensK, PrefixLens, QbRequest, QbRow, stride_qt, stride_qh, stride_kh,
                stride_vh, group, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The ``BLOCK_M`` chunk rows from query block ``qb``'s first row on, query head ``h``: request ``r``, its
    context length ``seq_k``, ``row_valid`` [BLOCK_M] bool (rows inside the chunk), ``pos_m`` [BLOCK_M] int32
    positions (bottom-right causal: chunk row i sits at position prefix + i), ``tok`` [BLOCK_M] int64 packed token
    rows, ``h64`` int64, ``k_head`` / ``v_head`` int64 element offsets of the KV head (``h // group``), and the
    query tile ``q`` [BLOCK_M, BLOCK_D] (0 past the chunk)."""
    r = tl.load(QbRequest + qb)
    row = tl.load(QbRow + qb)
    q_start = tl.load(CuSeqlensQ + r)
    seq_q = tl.load(CuSeqlensQ + r + 1) - q_start
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = row + offs_m < seq_q
    pos_m = tl.load(PrefixLens + r) + row + offs_m
    tok = (q_start + row + offs_m).to(tl.int64)
    h64 = h.to(tl.int64)
    kv_h64 = (h // group).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + h64 * stride_qh + offs_d[None, :], mask=row_valid[:, None],
                other=0.0)
    return r, tl.load(SeqLensK + r), row_valid, pos_m, tok, h64, kv_h64 * stride_kh, kv_h64 * stride_vh, q


@triton.jit
def _store_rows(acc, l_i, m_i, O, Lse, tok, h64, row_valid, offs_d, stride_ot, stride_oh, stride_lt, stride_lh):
    """Normalise the softmax state and store ``o`` / ``lse`` of the rows ``row_valid`` marks; a row that
    attended nothing has ``l = 0`` and is stored as 0 with ``lse = -inf``.

    ``acc`` [BLOCK_M, BLOCK_D] fp32, ``l_i`` / ``m_i`` [BLOCK_M] fp32 (base 2); ``tok`` [BLOCK_M] int64 packed
    token rows; ``h64`` int64 query head; ``row_valid`` [BLOCK_M] bool.
    """
    attended = l_i > 0.0
    o = acc / tl.where(attended, l_i, 1.0)[:, None]
    lse = tl.where(attended, (m_i + tl.math.log2(tl.where(attended, l_i, 1.0))) * LN2,
                   float("-inf"))
    tl.store(O + tok[:, None] * stride_ot + h64 * stride_oh + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_valid[:, None])
    tl.store(Lse + tok * stride_lt + h64 * stride_lh, lse, mask=row_valid)


@triton.jit
def _visit_layout(acc, l_i, m_i, q, pos_m, seq_k, r, range_start, range_end, n_ranges, n_full, col_base, n_cols,
                  K, V, KvStart, ReqToToken, PoolIdx, stride_tok, RunStart, k_head, v_head, stride_kn, stride_vn,
                  KDesc, VDesc, kv_col, offs_n, offs_d, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, RUNS: tl.constexpr,
                  TMA: tl.constexpr):
    """Phases 1-3 of one program: every key tile the layout names for this (query block, head), folded into the
    softmax state (``acc`` [BLOCK_M, BLOCK_D], ``l_i`` / ``m_i`` [BLOCK_M] fp32, base 2). ``range_start`` /
    ``range_end`` / ``col_base`` point at this program's layout rows; the counts are int32 scalars; keys of
    request ``r`` are addressed through ``kv_rows`` (``PAGED``, with pool runs ``RunStart`` when ``RUNS``, or
    ``KvStart[r] + j``). ``TMA`` (not ``PAGED``, 64-key tiles): the full tiles of phase 1 are read through the
    tensor descriptors ``KDesc`` / ``VDesc`` of
    ``K`` / ``V`` as ``[rows, Hk * D]`` (block ``[BLOCK_N, BLOCK_D]``), at row ``KvStart[r] + start`` and column
    ``kv_col`` (the KV head's first element)."""
    # A key tile of BLOCK_N keys holds PER layout ranges of 64 keys each, side by side: lane n of the tile is key
    # ``within[n]`` of the tile's range number ``part[n]`` (keys are gathered one by one, so the ranges of a tile
    # need not touch). With one range per tile the start is a scalar load, so the key rows are an arange the
    # compiler can see (plain causal probe, H200 2026-12-03: 448 TFLOP/s by row arithmetic against 315 through a
    # row table, head_dim 128; benchmarks/results/tile_h200_32k.json).
    PER: tl.constexpr = BLOCK_N // BLOCK_M
    part = offs_n // BLOCK_M
    within = offs_n % BLOCK_M

    # -- phase 1: tiles of full ranges, 64 keys left of every row of the block: no mask at all --
    full_tiles = n_full // PER
    if TMA:
        tl.static_assert(PER == 1 and not PAGED, "descriptor loads read one contiguous 64-key range")
        row0 = tl.load(KvStart + r)
        for t in range(0, full_tiles):
            row = row0 + tl.load(range_start + t)
            k = KDesc.load([row, kv_col]).T
            v = VDesc.load([row, kv_col])
            acc, l_i, m_i = _fold(acc, l_i, m_i, q, k, v, None, qk_scale, MASKED=False)
    else:
        for t in range(0, full_tiles):
            if PER == 1:
                cols = tl.load(range_start + t) + offs_n
            else:
                cols = tl.load(range_start + t * PER + part) + within
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, None, None, pos_m,
                                    K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                    k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                    MASKED=False, PAGED=PAGED, RunStart=RunStart, RUNS=RUNS)

    # -- phase 2: the other ranges (partial ones, and a full one left over from phase 1's pairs): clip to
    # [max(start, 0), end) and to the context, then the causal cut --
    for b in range(full_tiles * PER, n_ranges, PER):
        if PER == 1:
            cols = tl.load(range_start + b) + offs_n
            valid = (cols >= 0) & (cols < tl.load(range_end + b)) & (cols < seq_k)
        else:
            idx = b + part
            inside = idx < n_ranges
            start = tl.load(range_start + idx, mask=inside, other=0)
            end = tl.load(range_end + idx, mask=inside, other=0)
            cols = start + within
            valid = inside & (cols >= 0) & (cols < end) & (cols < seq_k)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, valid, valid[None, :], pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=True, PAGED=PAGED, RunStart=RunStart, RUNS=RUNS)

    # -- phase 3: gathered columns, BLOCK_N at a time (count mask, then the causal cut) --
    for c in range(0, n_cols, BLOCK_N):
        valid = c + offs_n < n_cols
        cols = tl.load(col_base + c + offs_n, mask=valid, other=0)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, valid, valid[None, :], pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=True, PAGED=PAGED, RunStart=RunStart, RUNS=RUNS)
    return acc, l_i, m_i


# The layout tensors' strides change with the batch (query blocks, heads, range/column capacities). Triton
# compiles one variant per int specialisation (equal to 1, divisible by 16, 32/64 bits), so without this a new
# chunk shape could compile inside a user's request; they address scalar loads, where the hints buy nothing.
# The q/k/v/o strides keep theirs (vectorised tile loads; fixed per model).
_LAYOUT_SHAPES = ["stride_bs_q", "stride_bs_h", "stride_be_q", "stride_be_h", "stride_bc_q", "stride_bc_h",
                  "stride_fc_q", "stride_fc_h", "stride_ci_q", "stride_ci_h", "stride_cc_q", "stride_cc_h",
                  "stride_lt", "stride_lh", "stride_tok"]


@triton.jit(do_not_specialize=_LAYOUT_SHAPES)
def _sparse_attention_fwd(
    Q, K, V, O, Lse,
    CuSeqlensQ, SeqLensK, PrefixLens, QbRequest, QbRow,
    KvStart, ReqToToken, PoolIdx, stride_tok, RunStart, KDesc, VDesc,
    BlockStart, BlockEnd, BlockCount, FullCount, ColIndex, ColCount,
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    stride_bs_q, stride_bs_h, stride_be_q, stride_be_h, stride_bc_q, stride_bc_h,
    stride_fc_q, stride_fc_h, stride_ci_q, stride_ci_h, stride_cc_q, stride_cc_h,
    qk_scale, group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
    HAS_RUNS: tl.constexpr, TMA: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    """Program (qb, h): rows ``[qb_row, qb_row + 64)`` of request ``qb_request[qb]``, query head ``h``.

    Q / O [T, Hq, D], Lse [T, Hq] fp32; K / V [rows, Hk, D]; geometry vectors int32 ([B+1], [B], [NQB]);
    RunStart [B] int32 (``HAS_RUNS``, paged only: ``KVSource.run_start``); KDesc / VDesc (``TMA``): tensor
    descriptors of K / V as [rows, Hk * D], block [BLOCK_N, BLOCK_D], for the full tiles of contiguous keys;
    layout tensors int32 [NQB, Hq, MAXB | MAXC] and [NQB, Hq]; ``group`` = Hq // Hk.
    """
    tl.static_assert(BLOCK_M == 64, "the layout is built for 64-row query blocks")
    tl.static_assert(BLOCK_N == 64 or BLOCK_N == 128, "a key tile holds one or two 64-key layout ranges")
    tl.static_assert(BLOCK_D == 64 or BLOCK_D == 128 or BLOCK_D == 256, "head_dim must be 64, 128 or 256")
    # HEADS_FIRST: the heads of one query block are launched next to each other (a GQA group's heads read the
    # same K/V rows close in time), else the query blocks of one head (neighbouring blocks read shifted keys).
    qb = tl.program_id(1) if HEADS_FIRST else tl.program_id(0)
    h = tl.program_id(0) if HEADS_FIRST else tl.program_id(1)

    # -- setup: which request, rows and positions this query block covers; its query tile and layout rows --
    r, seq_k, row_valid, pos_m, tok, h64, k_head, v_head, q = _query_tile(
        qb, h, Q, CuSeqlensQ, SeqLensK, PrefixLens, QbRequest, QbRow, stride_qt, stride_qh, stride_kh, stride_vh,
        group, BLOCK_M, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    qb64 = qb.to(tl.int64)
    range_start = BlockStart + qb64 * stride_bs_q + h64 * stride_bs_h
    range_end = BlockEnd + qb64 * stride_be_q + h64 * stride_be_h
    n_ranges = tl.load(BlockCount + qb64 * stride_bc_q + h64 * stride_bc_h)
    n_full = tl.load(FullCount + qb64 * stride_fc_q + h64 * stride_fc_h)
    col_base = ColIndex + qb64 * stride_ci_q + h64 * stride_ci_h
    n_cols = tl.load(ColCount + qb64 * stride_cc_q + h64 * stride_cc_h)

    # -- phases 1-3: the layout's key tiles; with pool runs, a paged request whose slots are one run is read by row
    # arithmetic (RunStart[r] + j), the others through the slot table, in one code path --
    kv_col = ((h // group) * BLOCK_D).to(tl.int32)
    acc, l_i, m_i = _visit_layout(acc, l_i, m_i, q, pos_m, seq_k, r, range_start, range_end, n_ranges,
                                  n_full, col_base, n_cols, K, V, KvStart, ReqToToken, PoolIdx, stride_tok, RunStart,
                                  k_head, v_head, stride_kn, stride_vn, KDesc, VDesc, kv_col, offs_n, offs_d,
                                  qk_scale, BLOCK_M, BLOCK_N, PAGED=PAGED, RUNS=HAS_RUNS, TMA=TMA)

    # -- epilogue: normalise and store the block's valid rows --
    _store_rows(acc, l_i, m_i, O, Lse, tok, h64, row_valid, offs_d, stride_ot, stride_oh, stride_lt, stride_lh)


# The paired layout's strides change with the batch like the layout's (pairs, heads, merged capacities).
_PAIRED_SHAPES = ["stride_pr_p", "stride_pr_h", "stride_pc_p", "stride_pc_h", "stride_pn_p", "stride_pn_h",
                  "stride_lt", "stride_lh", "stride_tok"]


@triton.jit(do_not_specialize=_PAIRED_SHAPES)
def _paired_attention_fwd(
    Q, K, V, O, Lse,
    CuSeqlensQ, SeqLensK, PrefixLens, QbRequest, QbRow, PairQb,
    KvStart, ReqToToken, PoolIdx, stride_tok,
    RangeStart, RangeEnd, RangeFlag, RangeCount, FullCount, ColIndex, ColFlag, ColCount,
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    stride_pr_p, stride_pr_h, stride_pc_p, stride_pc_h, stride_pn_p, stride_pn_h,
    qk_scale, group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """Program (p, h): query blocks A = ``pair_qb[p]`` and B = A + 1 of one request, query head ``h``: the 128
    rows ``[qb_row[A], qb_row[A] + 128)`` (B's half is past the chunk's end when A is the request's last block).

    Q / O [T, Hq, D], Lse [T, Hq] fp32; K / V [rows, Hk, D]; geometry vectors int32 ([B+1], [B], [NQB]),
    PairQb int32 [NP]; the :class:`PairedLayout`'s tensors int32: RangeStart / RangeEnd / RangeFlag
    [NP, Hq, MAXR] (strides ``stride_pr_*``), ColIndex / ColFlag [NP, Hq, MAXC] (``stride_pc_*``), RangeCount /
    FullCount / ColCount [NP, Hq] (``stride_pn_*``); ``group`` = Hq // Hk.
    """
    tl.static_assert(BLOCK_M == 128, "a pair is two 64-row query blocks")
    tl.static_assert(BLOCK_N == 64, "a key tile holds one 64-key merged range")
    tl.static_assert(BLOCK_D == 64 or BLOCK_D == 128 or BLOCK_D == 256, "head_dim must be 64, 128 or 256")
    p = tl.program_id(1) if HEADS_FIRST else tl.program_id(0)
    h = tl.program_id(0) if HEADS_FIRST else tl.program_id(1)

    # -- setup: the pair's request, rows (block A's 64, then block B's 64) and positions; its query tile --
    r, seq_k, row_valid, pos_m, tok, h64, k_head, v_head, q = _query_tile(
        tl.load(PairQb + p), h, Q, CuSeqlensQ, SeqLensK, PrefixLens, QbRequest, QbRow, stride_qt, stride_qh,
        stride_kh, stride_vh, group, BLOCK_M, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_a = offs_m < BLOCK_M // 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    p64 = p.to(tl.int64)
    range_at = p64 * stride_pr_p + h64 * stride_pr_h
    col_at = p64 * stride_pc_p + h64 * stride_pc_h
    count_at = p64 * stride_pn_p + h64 * stride_pn_h
    n_ranges = tl.load(RangeCount + count_at)
    n_full = tl.load(FullCount + count_at)
    n_cols = tl.load(ColCount + count_at)

    # -- phase 1: merged ranges full for every row of the pair (both blocks' full ranges): no mask at all --
    for t in range(0, n_full):
        cols = tl.load(RangeStart + range_at + t) + offs_n
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, None, None, pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=False, PAGED=PAGED)

    # -- phase 2: the other merged ranges, each tile read once for both blocks: clip to [max(start, 0), end)
    # and to the context; block A's rows attend it when it is A's range, B's rows when it is B's; causal cut --
    for t in range(n_full, n_ranges):
        start = tl.load(RangeStart + range_at + t)
        end = tl.load(RangeEnd + range_at + t)
        flag = tl.load(RangeFlag + range_at + t)
        cols = start + offs_n
        valid = (cols >= 0) & (cols < end) & (cols < seq_k)
        mine = tl.where(in_a, flag & 1, flag & 2) != 0  # flag bits IN_A = 1, IN_B = 2
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, valid, mine[:, None] & valid[None, :], pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=True, PAGED=PAGED)

    # -- phase 3: merged columns, BLOCK_N at a time: each column read once, attended by the rows of the
    # blocks whose flag it carries (padding has flag 0), then the causal cut --
    for c in range(0, n_cols, BLOCK_N):
        inside = c + offs_n < n_cols
        cols = tl.load(ColIndex + col_at + c + offs_n, mask=inside, other=0)
        flag = tl.load(ColFlag + col_at + c + offs_n, mask=inside, other=0)
        select = tl.where(in_a[:, None], (flag & 1)[None, :], (flag & 2)[None, :]) != 0
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, flag != 0, select, pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=True, PAGED=PAGED)

    # -- epilogue: normalise and store both blocks' valid rows (none past the request's chunk end) --
    _store_rows(acc, l_i, m_i, O, Lse, tok, h64, row_valid, offs_d, stride_ot, stride_oh, stride_lt, stride_lh)


class AttentionLaunch(NamedTuple):
    """Launch configuration of the sparse attention kernel: keys per tile (64: one layout range, 128: two side by
    side), warps, software-pipeline stages, the program order (``heads_first``: a query block's heads are
    neighbours in the grid), ``pair_blocks``: one program per two consecutive query blocks of a request
    (:func:`pair_plan`, ``_paired_attention_fwd``; 64-key tiles only, meant for 8 warps) and ``pool_runs``: a
    paged request in consecutive slots skips the slot table (``KVSource.run_start``; same code path, no extra
    shared memory). ``tma``: the full tiles of packed K/V are read by TMA through tensor descriptors (64-key tiles
    only; a paged source ignores it)."""

    block_n: int
    num_warps: int
    num_stages: int
    heads_first: bool = False
    pair_blocks: bool = False
    pool_runs: bool = True
    tma: bool = False


# bf16/fp16 launch per head_dim. H200 sweep (2026-12-02, `benchmarks.chunk_bench --launches`, every sparse chunk
# of a 128K prompt in 8K chunks, paged KV, synthetic-structure layouts; attention ms summed over the chunks,
# benchmarks/results/chunk_h200_{8b,1b}_128k_launch.json): head_dim 64 (Llama-3.2-1B shapes) with 128-key tiles
# (two layout ranges each), 4 warps, 3 stages: 90 ms against 131 for 64-key tiles (4 stages), and 533 vs 779 ms
# at 512K; head_dim 128 (Llama-3-8B): 64-key tiles stay fastest (726 ms; 128-key tiles 763-1073, heads-first
# order 773). 2026-12-03 (chunk_h200_8b_128k_runs_sweep.json, synthetic, table path): 3 stages 173 ms, 2 stages
# 260, 8 warps 323. head_dim 256: H100 sweep (2026-11-24, 64-key tiles): 4 warps and 2 stages beat 8 warps by 25%.
# Pool runs stay off until the shared-path design is measured against the table alone.
LAUNCHES = {64: AttentionLaunch(128, 4, 3, pool_runs=False), 128: AttentionLaunch(64, 4, 3, pool_runs=False),
            256: AttentionLaunch(64, 4, 2, pool_runs=False)}


# This kernel's time per attended key over FA3's (bf16, default launch), the routing's cost model
# (backend/routing.py). H200, 2026-12-02, `benchmarks.chunk_bench` at engine shapes (8K chunks, paged KV):
# head_dim 128, 128K keys: 59.7 ms at 0.923 of the causal keys vs FA3's 25.6 ms (2.53x per key; synthetic layouts
# at 0.226: 2.71x); head_dim 64 (128-key tiles), 512K keys, synthetic at 0.065: 9.77 vs 72.5 ms (2.07x).
# head_dim 256 is not measured: the head_dim 128 figure stands in.
DENSE_COST_RATIO = {64: 2.1, 128: 2.6, 256: 2.6}


def key_paths(launch: AttentionLaunch, *, paged: bool, has_runs: bool) -> dict[str, bool]:
    """The block kernel's key-path constexprs for ``launch`` over a paged source or not, ``has_runs``: one with
    ``KVSource.run_start``. ``HAS_RUNS``: a request in consecutive slots skips the slot table (same code path);
    ``TMA``: full tiles of packed keys through tensor descriptors."""
    return {"HAS_RUNS": paged and has_runs and launch.pool_runs, "TMA": launch.tma and not paged}


def attention_launch(head_dim: int, dtype: torch.dtype) -> AttentionLaunch:
    """The default launch (:data:`LAUNCHES`). fp32 (tests only) at head_dim 256 needs one stage and 8 warps: two
    stages of 64x256 fp32 K/V tiles exceed the H100's 228 KB of shared memory (OutOfResources, 2026-11-24)."""
    if head_dim == 256 and dtype == torch.float32:
        return AttentionLaunch(BLOCK, 8, 1)
    return LAUNCHES[head_dim]


# ---- the paired launch's plan: two consecutive query blocks' layouts merged into one list per (pair, head) ----

IN_A, IN_B = 1, 2  # flag bits of a merged entry: named by block A's layout, by block B's


@dataclass(kw_only=True)
class PairedLayout:
    """A :class:`SparseLayout` regrouped for the paired kernel: per (pair, head) one merged range list and one
    merged column list for the pair's blocks A = ``pair_qb[p]`` and B = A + 1 (same request; absent when A is
    the request's last block, ``has_b`` false: then nothing carries ``IN_B``).

    A range named by both blocks (same start, same end) appears once with flags ``IN_A | IN_B``, every other range
    once with its block's flag; likewise columns (same position). Ranges ``[0, full_count)`` are the ones every
    row of the pair attends whole (full ranges of A that are full ranges of B too, or of A alone when there is
    no B), ascending by start; the rest follow, ascending by start. Columns are ascending. Slots past the counts
    hold ``SENTINEL`` (start, end and column) and flag 0. Built on the layout's device, no host sync.
    """

    pair_qb: torch.Tensor  # [NP] int32: block A (the first query block) of each pair
    has_b: torch.Tensor  # [NP] bool: block B = pair_qb + 1 exists (same request)
    range_start: torch.Tensor  # [NP, Hq, 2 * MAXB] int32: merged ranges' first keys (request-local)
    range_end: torch.Tensor  # [NP, Hq, 2 * MAXB] int32: one past their last keys
    range_flag: torch.Tensor  # [NP, Hq, 2 * MAXB] int32: IN_A / IN_B bits
    range_count: torch.Tensor  # [NP, Hq] int32: valid merged ranges
    full_count: torch.Tensor  # [NP, Hq] int32: ranges [0, full_count) need no mask for any row of the pair
    col_index: torch.Tensor  # [NP, Hq, 2 * MAXC] int32: merged columns, ascending
    col_flag: torch.Tensor  # [NP, Hq, 2 * MAXC] int32: IN_A / IN_B bits
    col_count: torch.Tensor  # [NP, Hq] int32: valid merged columns


def num_pairs(geom: BatchGeometry) -> int:
    """Pairs of the batch, from host lengths: ``ceil(blocks_r / 2)`` per request."""
    return sum((-(-sq // BLOCK) + 1) // 2 for sq in geom.seq_lens_q_cpu)


def _sorted_by(key: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` (each shaped like ``key``) reordered along the last dim by ascending ``key``, ties in order."""
    order = torch.argsort(key, dim=-1, stable=True)
    return [t.gather(-1, order) for t in tensors]


def _dedupe(same: torch.Tensor, flag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry ``i`` and ``i + 1`` are one key set named by A and by B where ``same[..., i]`` ([..., W-1] bool):
    the first keeps both flags, the second is dropped (flag 0). Returns ``(flag, merged)``, ``merged`` [..., W]
    bool marking the entries that absorbed their neighbour."""
    no = torch.zeros_like(same[..., :1])
    merged, absorbed = torch.cat([same, no], -1), torch.cat([no, same], -1)
    flag = torch.where(merged, IN_A | IN_B, torch.where(absorbed, 0, flag))
    return flag, merged


def pair_plan(layout: SparseLayout, geom: BatchGeometry) -> PairedLayout:
    """Merge each pair of consecutive query blocks' ranges and columns (see :class:`PairedLayout`).

    layout: ``[NQB, Hq, ...]`` int32 (the invariants of ``sgl_minference.layout``; slots past the counts are never
    read); geom: its batch, ``num_pairs(geom)`` pairs from the host lengths. Torch ops on the layout's device, no
    host sync; two stable sorts per list.
    """
    device = layout.block_count.device
    nqb = geom.num_query_blocks
    # Pair geometry: block b of a request (qb_row = 64 b) is A when b is even; its pair index counts the A blocks.
    is_a = (geom.qb_row // BLOCK) % 2 == 0
    pair_of = torch.cumsum(is_a.long(), 0) - 1
    blocks = torch.arange(nqb, device=device)
    n = num_pairs(geom)
    a = torch.zeros(n, dtype=torch.long, device=device).scatter_reduce_(0, pair_of, blocks, "amin",
                                                                        include_self=False)
    has_b = torch.zeros(n, dtype=torch.long, device=device).scatter_add_(0, pair_of, torch.ones_like(blocks)) == 2
    b = (a + 1).clamp(max=nqb - 1)  # has_b false: B's entries are masked off below
    b_on = has_b.view(-1, 1, 1)

    # Ranges: both blocks' lists side by side, sorted by start (A's entry before B's on a tie).
    slot = torch.arange(layout.block_start.shape[2], device=device)
    used_a, used_b = slot < layout.block_count[a].unsqueeze(-1), (slot < layout.block_count[b].unsqueeze(-1)) & b_on
    used = torch.cat([used_a, used_b], -1)
    start = torch.where(used, torch.cat([layout.block_start[a], layout.block_start[b]], -1), SENTINEL)
    end = torch.where(used, torch.cat([layout.block_end[a], layout.block_end[b]], -1), SENTINEL)
    flag = torch.cat([used_a * IN_A, used_b * IN_B], -1)
    full = torch.cat([slot < layout.full_count[a].unsqueeze(-1), slot < layout.full_count[b].unsqueeze(-1)], -1)
    start, end, flag, full = _sorted_by(start, start, end, flag, full)
    same = (start[..., 1:] == start[..., :-1]) & (end[..., 1:] == end[..., :-1]) & (flag[..., 1:] != 0)
    flag, merged = _dedupe(same, flag)
    full_next = torch.cat([full[..., 1:], torch.zeros_like(full[..., :1])], -1)
    unmasked = torch.where(merged, full & full_next, full & (flag == IN_A) & ~b_on)
    # Compact: unmasked ranges first, then the others, each ascending by start; dropped and unused slots last.
    key = torch.where(flag == 0, 1 << 62, start.long() + torch.where(unmasked, 0, 1 << 31))
    start, end, flag = _sorted_by(key, start, end, flag)
    kept = flag != 0

    # Columns: the same merge by position (a column is unique within a block).
    slot = torch.arange(layout.col_index.shape[2], device=device)
    used_a, used_b = slot < layout.col_count[a].unsqueeze(-1), (slot < layout.col_count[b].unsqueeze(-1)) & b_on
    cols = torch.where(torch.cat([used_a, used_b], -1), torch.cat([layout.col_index[a], layout.col_index[b]], -1),
                       SENTINEL)
    col_flag = torch.cat([used_a * IN_A, used_b * IN_B], -1)
    cols, col_flag = _sorted_by(cols, cols, col_flag)
    col_flag, _ = _dedupe((cols[..., 1:] == cols[..., :-1]) & (col_flag[..., 1:] != 0), col_flag)
    cols = torch.where(col_flag == 0, SENTINEL, cols)
    cols, col_flag = _sorted_by(cols, cols, col_flag)

    def i32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32).contiguous()

    return PairedLayout(
        pair_qb=i32(a), has_b=has_b,
        range_start=i32(torch.where(kept, start, SENTINEL)), range_end=i32(torch.where(kept, end, SENTINEL)),
        range_flag=i32(flag), range_count=i32(kept.sum(-1)), full_count=i32(unmasked.sum(-1)),
        col_index=i32(cols), col_flag=i32(col_flag), col_count=i32((col_flag != 0).sum(-1)),
    )


def check_kv(kv: KVSource, geom: BatchGeometry) -> None:
    """Host checks of a K/V source before a kernel reads it for ``geom``: a supported dtype, then
    :meth:`KVSource.validate`; ``ValueError`` names the tensor."""
    check_tensor(kv.k, "k", ndim=3, dtypes=SUPPORTED_DTYPES)
    kv.validate(geom)


def check_queries_and_kv(q: torch.Tensor, kv: KVSource, geom: BatchGeometry) -> None:
    """The checks every kernel wrapper shares: ``q [T, Hq, D]`` against the geometry and the KV source."""
    check_tensor(q, "q", ndim=3, dtypes=SUPPORTED_DTYPES)
    tokens, num_heads, head_dim = q.shape
    check(head_dim in SUPPORTED_HEAD_DIMS, "head_dim",
          f"{head_dim} not supported, expected one of {SUPPORTED_HEAD_DIMS}")
    check(tokens == geom.num_tokens, "q", f"{tokens} tokens but geom packs {geom.num_tokens} chunk tokens")
    check_kv(kv, geom)
    check(kv.k.device == q.device, "k", f"on {kv.k.device}, q on {q.device}")
    check(kv.k.dtype == q.dtype, "k", f"dtype {kv.k.dtype} != q dtype {q.dtype}")
    check(kv.k.shape[2] == head_dim, "k", f"head_dim {kv.k.shape[2]} != q head_dim {head_dim}")
    check(num_heads % kv.k.shape[1] == 0, "k", f"{kv.k.shape[1]} KV heads do not divide {num_heads} query heads")


def _check_inputs(q, kv: KVSource, layout: SparseLayout, geom: BatchGeometry, out) -> None:
    """Validate every argument of :func:`sparse_attention` up front: host metadata only, no device sync, except in
    checked mode (``SGL_MINFERENCE_CHECKED=1``, see ``sgl_minference.layout``), which also checks the index contents
    of ``kv``, ``geom`` and ``layout`` before the launch."""
    check_queries_and_kv(q, kv, geom)
    check(q.stride(-1) == 1, "q", "head_dim must be the contiguous dimension")
    check(kv.k.stride(-1) == 1 and kv.v.stride(-1) == 1, "k", "head_dim must be the contiguous dimension of k and v")
    if kv.paged:
        check(kv.req_to_token.stride(1) == 1, "req_to_token", "rows must be contiguous")
    layout.validate(geom, q.shape[1], q.device)
    if out is not None:
        check_tensor(out, "out", ndim=3, dtypes=(q.dtype,))
        check(out.shape == q.shape, "out", f"shape {tuple(out.shape)} != q {tuple(q.shape)}")
        check(out.stride(-1) == 1, "out", "head_dim must be the contiguous dimension")
        check(out.device == q.device, "out", f"on {out.device}, q on {q.device}")


def sparse_attention(q: torch.Tensor, kv: KVSource, layout: SparseLayout, geom: BatchGeometry, *,
                     sm_scale: float, out: torch.Tensor | None = None, launch: AttentionLaunch | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each chunk query over exactly the keys ``layout`` selects (see ``sgl_minference.layout``).

    q: ``[T, Hq, D]`` fp16/bf16 (fp32 accepted for testing), the chunk tokens packed by ``geom.cu_seqlens_q``;
    D in (64, 128, 256). kv: ``[rows, Hk, D]`` keys/values of ``q``'s dtype, ``Hq % Hk == 0``; query head
    ``h`` reads KV head ``h // (Hq // Hk)``; a paged ``kv`` with ``run_start`` has its consecutive requests read
    without the slot table (the paired launch always reads the table). layout: int32 ``[NQB, Hq, ...]`` tensors
    on ``q``'s device.
    out: optional ``[T, Hq, D]`` of ``q``'s dtype to write the output into. launch: the kernel's launch
    configuration (default :func:`attention_launch`), for benchmarks; with ``pair_blocks`` the layout is first
    merged per pair of query blocks (:func:`pair_plan`) and the paired kernel runs, same keys, same results.
    Returns ``o`` ``[T, Hq, D]`` (``q.dtype``) and ``lse`` ``[T, Hq]`` float32, the natural-log log-sum-exp of
    the scaled scores; a row that attends no key gets ``o = 0`` and ``lse = -inf``.
    """
    _check_inputs(q, kv, layout, geom, out)
    refuse_bf16(q=q)
    tokens, num_heads, head_dim = q.shape
    o = torch.empty_like(q) if out is None else out
    lse = torch.empty(tokens, num_heads, dtype=torch.float32, device=q.device)
    kv_start, req_to_token, pool_idx, stride_tok, paged = kv_args(kv)
    bs, be, bc, fc, ci, cc = (layout.block_start, layout.block_end, layout.block_count, layout.full_count,
                              layout.col_index, layout.col_count)
    launch = launch or attention_launch(head_dim, q.dtype)
    check(launch.block_n in (BLOCK, 2 * BLOCK), "launch", f"block_n {launch.block_n} is not {BLOCK} or {2 * BLOCK}")
    check(launch.block_n == BLOCK or not launch.pair_blocks, "launch",
          f"a paired launch reads {BLOCK}-key tiles, not {launch.block_n}")
    check(not launch.tma or (launch.block_n == BLOCK and not launch.pair_blocks), "launch",
          f"descriptor loads read {BLOCK}-key tiles of one range, not {launch.block_n} or pairs of blocks")
    common = (q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv.v.stride(0), kv.v.stride(1),
              o.stride(0), o.stride(1), lse.stride(0), lse.stride(1))
    tuning = dict(BLOCK_N=launch.block_n, BLOCK_D=head_dim, PAGED=paged, HEADS_FIRST=bool(launch.heads_first),
                  num_warps=launch.num_warps, num_stages=launch.num_stages)
    geometry = (geom.cu_seqlens_q, geom.seq_lens_k, geom.prefix_lens, geom.qb_request, geom.qb_row)
    if launch.pair_blocks:
        pl = pair_plan(layout, geom)
        programs = pl.pair_qb.shape[0]
        grid = (num_heads, programs) if launch.heads_first else (programs, num_heads)
        rs, cs, rc = pl.range_start, pl.col_index, pl.range_count  # each shares its strides with its group
        _paired_attention_fwd[grid](
            q, kv.k, kv.v, o, lse, *geometry, pl.pair_qb,
            kv_start, req_to_token, pool_idx, stride_tok,
            rs, pl.range_end, pl.range_flag, rc, pl.full_count, cs, pl.col_flag, pl.col_count,
            *common, rs.stride(0), rs.stride(1), cs.stride(0), cs.stride(1), rc.stride(0), rc.stride(1),
            sm_scale * LOG2E, num_heads // kv.k.shape[1], BLOCK_M=2 * BLOCK, **tuning,
        )
        return o, lse
    grid = (num_heads, geom.num_query_blocks) if launch.heads_first else (geom.num_query_blocks, num_heads)
    keys = key_paths(launch, paged=paged, has_runs=kv.run_start is not None)
    descs = (None, None)
    if keys["TMA"]:
        descs = tuple(TensorDescriptor.from_tensor(t.view(t.shape[0], -1), [BLOCK, head_dim]) for t in (kv.k, kv.v))
    _sparse_attention_fwd[grid](
        q, kv.k, kv.v, o, lse, *geometry,
        kv_start, req_to_token, pool_idx, stride_tok, kv.run_start if keys["HAS_RUNS"] else kv_start, *descs,
        bs, be, bc, fc, ci, cc, *common,
        bs.stride(0), bs.stride(1), be.stride(0), be.stride(1), bc.stride(0), bc.stride(1),
        fc.stride(0), fc.stride(1), ci.stride(0), ci.stride(1), cc.stride(0), cc.stride(1),
        sm_scale * LOG2E, num_heads // kv.k.shape[1], BLOCK_M=BLOCK, **keys, **tuning,
    )
    return o, lse
