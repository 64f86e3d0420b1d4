"""Sparse prefill attention forward: one Triton kernel that visits exactly the keys a ``SparseLayout`` names.

One program per (64-row query block, query head). It loads its query tile once and streams three kinds of
key tiles through one online-softmax helper (:func:`_attend`): the layout's full ranges (no mask at all),
its partial ranges (range / bounds / causal mask) and its gathered columns (causal / count mask); a key
tile holds one or two 64-key layout ranges (``AttentionLaunch.block_n``). Keys and values are read in place from a packed tensor or from SGLang's paged pool
(:func:`sgl_minference.kernels.kv_access.kv_rows`); K/V heads are shared by GQA groups, never repeated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sgl_minference.kernels.constants import LOG2E
from sgl_minference.kernels.interpreter import refuse_bf16
from sgl_minference.kernels.kv_access import kv_args, kv_rows
from sgl_minference.checks import check
from sgl_minference.layout import BLOCK, BatchGeometry, KVSource, SparseLayout, check_tensor

# What the kernel serves, asked by the backend and the plugin before they route a layer or a model here (and
# checked by every kernel wrapper): head sizes it is compiled for (one LAUNCHES entry each) and q/K/V dtypes
# (fp32 for the interpreter tests only).
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # converts the base-2 lse back to the natural log


@triton.jit
def _attend(acc, l_i, m_i, q, cols, valid, pos_m,
            K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
            k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
            MASKED: tl.constexpr, PAGED: tl.constexpr):
    """Fold one tile of ``BLOCK_N`` keys (request-local positions ``cols``) into the running softmax state.

    With ``MASKED``, ``valid`` ([BLOCK_N] bool) marks the keys the caller may read (range / bounds / count)
    and the causal cut ``cols <= pos_m`` is applied on top; without it (``valid`` is None) every key of the
    tile is read and attended by every row.
    State: ``acc`` [BLOCK_M, BLOCK_D] fp32, ``l_i`` / ``m_i`` [BLOCK_M] fp32 (running sum and max, base-2
    units); ``q`` [BLOCK_M, BLOCK_D] input dtype; ``cols`` [BLOCK_N] int32; ``pos_m`` [BLOCK_M] int32 query
    positions; ``k_head`` / ``v_head`` int64 element offsets of the KV head.
    """
    if MASKED:
        # Masked-out keys are pointed at position 0 (always a real key) so the table lookup stays in bounds.
        cols = tl.where(valid, cols, 0)
    rows = kv_rows(KvStart, ReqToToken, PoolIdx, r, cols, stride_tok, PAGED)
    k_ptrs = K + k_head + rows[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + v_head + rows[:, None] * stride_vn + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, k) * qk_scale
    if MASKED:
        keep = valid[None, :] & (cols[None, :] <= pos_m[:, None])
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
    KvStart, ReqToToken, PoolIdx, stride_tok,
    BlockStart, BlockEnd, BlockCount, FullCount, ColIndex, ColCount,
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_ot, stride_oh, stride_lt, stride_lh,
    stride_bs_q, stride_bs_h, stride_be_q, stride_be_h, stride_bc_q, stride_bc_h,
    stride_fc_q, stride_fc_h, stride_ci_q, stride_ci_h, stride_cc_q, stride_cc_h,
    qk_scale, group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    """Program (qb, h): rows ``[qb_row, qb_row + 64)`` of request ``qb_request[qb]``, query head ``h``.

    Q / O [T, Hq, D], Lse [T, Hq] fp32; K / V [rows, Hk, D]; geometry vectors int32 ([B+1], [B], [NQB]);
    layout tensors int32 [NQB, Hq, MAXB | MAXC] and [NQB, Hq]; ``group`` = Hq // Hk.
    """
    tl.static_assert(BLOCK_M == 64, "the layout is built for 64-row query blocks")
    tl.static_assert(BLOCK_N == 64 or BLOCK_N == 128, "a key tile holds one or two 64-key layout ranges")
    tl.static_assert(BLOCK_D == 64 or BLOCK_D == 128 or BLOCK_D == 256, "head_dim must be 64, 128 or 256")
    # HEADS_FIRST: the heads of one query block are launched next to each other (a GQA group's heads read the
    # same K/V rows close in time), else the query blocks of one head (neighbouring blocks read shifted keys).
    qb = tl.program_id(1) if HEADS_FIRST else tl.program_id(0)
    h = tl.program_id(0) if HEADS_FIRST else tl.program_id(1)

    # -- setup: which request, rows and positions this query block covers --
    r = tl.load(QbRequest + qb)
    row = tl.load(QbRow + qb)
    q_start = tl.load(CuSeqlensQ + r)
    seq_q = tl.load(CuSeqlensQ + r + 1) - q_start
    seq_k = tl.load(SeqLensK + r)
    prefix = tl.load(PrefixLens + r)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = row + offs_m < seq_q
    pos_m = prefix + row + offs_m  # bottom-right causal: chunk row i sits at position prefix + i
    tok = (q_start + row + offs_m).to(tl.int64)
    h64 = h.to(tl.int64)
    kv_h64 = (h // group).to(tl.int64)

    q = tl.load(Q + tok[:, None] * stride_qt + h64 * stride_qh + offs_d[None, :], mask=row_valid[:, None],
                other=0.0)
    k_head = kv_h64 * stride_kh
    v_head = kv_h64 * stride_vh
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

    # A key tile of BLOCK_N keys holds PER layout ranges of 64 keys each, side by side: lane n of the tile is key
    # ``within[n]`` of the tile's range number ``part[n]`` (keys are gathered one by one, so the ranges of a tile
    # need not touch).
    PER: tl.constexpr = BLOCK_N // BLOCK_M
    part = offs_n // BLOCK_M
    within = offs_n % BLOCK_M

    # -- phase 1: tiles of full ranges, 64 keys left of every row of the block: no mask at all --
    full_tiles = n_full // PER
    for t in range(0, full_tiles):
        cols = tl.load(range_start + t * PER + part) + within
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, None, pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=False, PAGED=PAGED)

    # -- phase 2: the other ranges (partial ones, and a full one left over from phase 1's pairs): clip to
    # [max(start, 0), end) and to the context, then the causal cut --
    for b in range(full_tiles * PER, n_ranges, PER):
        idx = b + part
        inside = idx < n_ranges
        start = tl.load(range_start + idx, mask=inside, other=0)
        end = tl.load(range_end + idx, mask=inside, other=0)
        cols = start + within
        valid = inside & (cols >= 0) & (cols < end) & (cols < seq_k)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, valid, pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=True, PAGED=PAGED)

    # -- phase 3: gathered columns, BLOCK_N at a time (count mask, then the causal cut) --
    for c in range(0, n_cols, BLOCK_N):
        valid = c + offs_n < n_cols
        cols = tl.load(col_base + c + offs_n, mask=valid, other=0)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, cols, valid, pos_m,
                                K, V, KvStart, ReqToToken, PoolIdx, r, stride_tok,
                                k_head, v_head, stride_kn, stride_vn, offs_d, qk_scale,
                                MASKED=True, PAGED=PAGED)

    # -- epilogue: normalise; a row that attended nothing has l = 0 and is stored as 0 with lse = -inf --
    attended = l_i > 0.0
    o = acc / tl.where(attended, l_i, 1.0)[:, None]
    lse = tl.where(attended, (m_i + tl.math.log2(tl.where(attended, l_i, 1.0))) * LN2,
                   float("-inf"))
    tl.store(O + tok[:, None] * stride_ot + h64 * stride_oh + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_valid[:, None])
    tl.store(Lse + tok * stride_lt + h64 * stride_lh, lse, mask=row_valid)


class AttentionLaunch(NamedTuple):
    """Launch configuration of the sparse attention kernel: keys per tile (64: one layout range, 128: two side by
    side), warps, software-pipeline stages, and the program order (``heads_first``: a query block's heads are
    neighbours in the grid)."""

    block_n: int
    num_warps: int
    num_stages: int
    heads_first: bool = False


# bf16/fp16 launch per head_dim. H200 sweep (2026-12-02, `benchmarks.chunk_bench --launches`, every sparse chunk
# of a 128K prompt in 8K chunks, paged KV, synthetic-structure layouts; attention ms summed over the chunks,
# benchmarks/results/chunk_h200_{8b,1b}_128k_launch.json): head_dim 64 (Llama-3.2-1B shapes) with 128-key tiles
# (two layout ranges each), 4 warps, 3 stages: 90 ms against 131 for 64-key tiles (4 stages), and 533 vs 779 ms
# at 512K; head_dim 128 (Llama-3-8B): 64-key tiles stay fastest (726 ms; 128-key tiles 763-1073, heads-first
# order 773). head_dim 256: H100 sweep (2026-11-24, 64-key tiles): 4 warps and 2 stages beat 8 warps by 25%.
LAUNCHES = {64: AttentionLaunch(128, 4, 3), 128: AttentionLaunch(64, 4, 3), 256: AttentionLaunch(64, 4, 2)}


# This kernel's time per attended key over FA3's (bf16, default launch), the routing's cost model
# (backend/routing.py). H200, 2026-12-02, `benchmarks.chunk_bench` at engine shapes (8K chunks, paged KV):
# head_dim 128, 128K keys: 59.7 ms at 0.923 of the causal keys vs FA3's 25.6 ms (2.53x per key; synthetic layouts
# at 0.226: 2.71x); head_dim 64 (128-key tiles), 512K keys, synthetic at 0.065: 9.77 vs 72.5 ms (2.07x).
# head_dim 256 is not measured: the head_dim 128 figure stands in.
DENSE_COST_RATIO = {64: 2.1, 128: 2.6, 256: 2.6}


def attention_launch(head_dim: int, dtype: torch.dtype) -> AttentionLaunch:
    """The default launch (:data:`LAUNCHES`). fp32 (tests only) at head_dim 256 needs one stage and 8 warps: two
    stages of 64x256 fp32 K/V tiles exceed the H100's 228 KB of shared memory (OutOfResources, 2026-11-24)."""
    if head_dim == 256 and dtype == torch.float32:
        return AttentionLaunch(BLOCK, 8, 1)
    return LAUNCHES[head_dim]


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
    ``h`` reads KV head ``h // (Hq // Hk)``. layout: int32 ``[NQB, Hq, ...]`` tensors on ``q``'s device.
    out: optional ``[T, Hq, D]`` of ``q``'s dtype to write the output into. launch: the kernel's launch
    configuration (default :func:`attention_launch`), for benchmarks.
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
    grid = (num_heads, geom.num_query_blocks) if launch.heads_first else (geom.num_query_blocks, num_heads)
    _sparse_attention_fwd[grid](
        q, kv.k, kv.v, o, lse,
        geom.cu_seqlens_q, geom.seq_lens_k, geom.prefix_lens, geom.qb_request, geom.qb_row,
        kv_start, req_to_token, pool_idx, stride_tok,
        bs, be, bc, fc, ci, cc,
        q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv.v.stride(0), kv.v.stride(1),
        o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
        bs.stride(0), bs.stride(1), be.stride(0), be.stride(1), bc.stride(0), bc.stride(1),
        fc.stride(0), fc.stride(1), ci.stride(0), ci.stride(1), cc.stride(0), cc.stride(1),
        sm_scale * LOG2E, num_heads // kv.k.shape[1],
        BLOCK_M=BLOCK, BLOCK_N=launch.block_n, BLOCK_D=head_dim, PAGED=paged, HEADS_FIRST=bool(launch.heads_first),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return o, lse
