"""XAttention: adaptive block-sparse, key blocks chosen by antidiagonal scores and cumulative mass.

Scoring, per request and head. Inside every 64x64 (query block, key block) tile, the sum of every ``S``-th
antidiagonal predicts the tile's attention mass at ``1/S`` of its work: downsample the queries and keys by ``S``
along the sequence, with ``S * D`` features each (strided query ``g`` = rows ``gS .. gS+S-1`` concatenated in
*reverse* order, strided key ``t`` = keys ``tS .. tS+S-1`` in order), so ``strided_q[g] . strided_k[t]`` sums
``q[gS+S-1-s] . k[tS+s]`` over ``s``: one antidiagonal of the ``S x S`` sub-tile. The logit is scaled by
``sm_scale / S`` (the antidiagonal's mean logit); each strided row takes a softmax over its causal strided keys
(key group start ``tS <=`` the row group's first position; bottom-right causal: the chunk's queries are the last
``Sq`` of ``Sk`` positions, key positions absolute); the probabilities are summed per 64x64 block and normalised
per query block (each block's share of its block row's estimated mass).

Selection: per query block, key blocks in descending share until their cumulative share reaches the head's
``threshold`` (:func:`~sgl_minference.patterns.blocks.keep_by_mass`); the first key block (the attention sink)
and the diagonal block(s) always kept first, as in the published method.
Budgets so adapt per chunk, request, head and query block, on the device; the layout's capacity is every key
block of the longest context (``MAXB = ceil(max Sk / 64)``), a host bound.

Memory: the strided logits are computed in chunks of query blocks of at most ``SCORE_ELEMENTS`` fp32 entries,
never ``[H, Sq, Sk]``; each request's keys are gathered once per layer (``[Sk, Hk, D]`` in the model dtype,
through the ``KVSource``, paged or not). The GEMM runs in the model dtype (fp32 accumulation), the softmax in fp32.
A logit soft-cap is not applied (layers with one run dense online).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check
from ..config import Estimation
from ..kernels.sparse_attention import check_queries_and_kv
from ..layout import BLOCK, BatchGeometry, KVSource, SparseLayout
from ..registry import XATTENTION_STRIDES
from .blocks import block_candidates, grid, keep_by_mass, keep_ranked, layout_from_blocks, pad_last
from .heads import HeadSet
from .selection import Selection, block_keys
from .share_fit import largest_share_within

SCORE_ELEMENTS = 1 << 27  # strided logits per chunk: 512 MiB in fp32 (the softmax makes one more of them)


def forced_blocks(diagonal: torch.Tensor) -> torch.Tensor:
    """The blocks always kept: the diagonal one(s) (``[NQB, 1, NKB]`` bool) and key block 0, the sink."""
    return diagonal | (torch.arange(diagonal.shape[-1], device=diagonal.device) == 0)


def kv_runs(heads: list[int], group: int) -> list[tuple[int, int, int]]:
    """``(first, end, kv_head)``: runs of consecutive scored heads (positions in ``heads``) reading one KV head,
    so each run's scores are one batched GEMM against that KV head's keys, never a per-query-head copy of them."""
    runs: list[tuple[int, int, int]] = []
    for i, h in enumerate(heads):
        if runs and runs[-1][2] == h // group:
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2])
        else:
            runs.append((i, i + 1, h // group))
    return runs


def _strided(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """``[L, H, D]`` (``L`` a multiple of 64) -> ``[H, L / stride, stride * D]``: groups of ``stride`` rows
    concatenated, reversed within each group when ``reverse`` (the queries), so products run along antidiagonals."""
    length, h, d = x.shape
    g = x.view(length // stride, stride, h, d)
    if reverse:
        g = g.flip(1)
    return g.permute(2, 0, 1, 3).reshape(h, length // stride, stride * d)


def antidiagonal_block_mass(q_rows: torch.Tensor, k_rows: torch.Tensor, runs: list[tuple[int, int, int]], *,
                            stride: int, sm_scale: float, num_key_blocks: int,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Estimated share of every key block in its query block's row, for one request (module docstring).

    Args:
        q_rows: ``[Sq, Hs, D]`` the chunk's queries of the scored heads (the last ``Sq`` of ``Sk`` positions).
        k_rows: ``[Sk, Hk, D]`` the request's keys, same dtype; runs: :func:`kv_runs` of the scored heads.
        num_key_blocks: output width, at least ``ceil(Sk / 64)``.
        out: where to write the result (zero-filled, the returned shape), else a new tensor.
    Returns:
        ``[ceil(Sq / 64), Hs, num_key_blocks]`` float32, each row summing to 1 over the causal key blocks.
    """
    sq, hs, _ = q_rows.shape
    sk = k_rows.shape[0]
    nqb, nkb = -(-sq // BLOCK), -(-sk // BLOCK)
    per = BLOCK // stride  # strided rows (and keys) per 64-block
    prefix, rows_valid = sk - sq, -(-sq // stride)  # strided rows holding a real query (host ints)
    # Strided row g's first position is prefix + stride g, strided key t's first key stride t: t is causal for g
    # exactly when t - prefix // stride <= g (integers), a comparison of two slices of one range.
    shift = prefix // stride
    # the scale folded into the (small) strided queries saves a pass over the logits
    qs = _strided(pad_rows(q_rows * (sm_scale / stride), nqb * BLOCK), stride, reverse=True)
    ks = _strided(pad_rows(k_rows, nkb * BLOCK), stride, reverse=False)  # [Hk, T, S*D]
    lanes = torch.arange(max(nqb, nkb) * per, device=q_rows.device)
    if out is None:
        out = torch.zeros(nqb, hs, num_key_blocks, device=q_rows.device, dtype=torch.float32)
    for i0, i1, kh in runs:
        rows_per = max(per, SCORE_ELEMENTS // ((i1 - i0) * nkb * per) // per * per)  # whole query blocks
        for g0 in range(0, nqb * per, rows_per):
            g1 = min(g0 + rows_per, nqb * per)
            # -- key groups some row of the chunk sees: [0, t_hi) (whole key blocks); masked from t_lo on
            t_lo = shift + g0 + 1
            t_hi = min(nkb * per, -(-(shift + g1) // per) * per)
            # -- strided logits of this chunk, one GEMM per KV head run (model dtype, fp32 accumulate)
            logits = torch.matmul(qs[i0:i1, g0:g1], ks[kh, :t_hi].T).float()  # [n, g, t_hi]
            if t_lo < t_hi:
                logits[..., t_lo:].masked_fill_(lanes[t_lo - shift:t_hi - shift].view(1, -1)
                                                > lanes[g0:g1].view(-1, 1), float("-inf"))
            p = logits.softmax(-1)
            if rows_valid < g1:
                p[:, max(rows_valid - g0, 0):] = 0.0  # padding rows of the last block add nothing
            # -- sum to 64x64 blocks and normalise per query block, written in place
            blocks = p.view(i1 - i0, (g1 - g0) // per, per, t_hi // per, per).sum((2, 4))
            torch.div(blocks, blocks.sum(-1, keepdim=True),
                      out=out[g0 // per: g1 // per, i0:i1, :t_hi // per].transpose(0, 1))
    return out


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x [L, ...]`` padded with zero rows to ``rows`` (``x`` itself when it has them)."""
    return x if x.shape[0] == rows else F.pad(x, (0, 0, 0, 0, 0, rows - x.shape[0]))


def request_keys(kv: KVSource, r: int, seq_len_k: int) -> torch.Tensor:
    """Request ``r``'s keys ``[Sk, Hk, D]`` gathered on the device (row offsets stay device tensors: no sync), or
    a view of ``kv.k`` where the request's rows are known on the host."""
    if kv.paged:  # a one-entry index keeps the pool row on the device (indexing by kv.req_pool_indices[r] syncs)
        rows = kv.req_to_token.index_select(0, kv.req_pool_indices[r:r + 1])[0, :seq_len_k]
    elif kv.kv_start_cpu is not None:  # rows known on the host: a view, no copy
        return kv.k[kv.kv_start_cpu[r]:kv.kv_start_cpu[r] + seq_len_k]
    else:
        rows = kv.kv_start[r] + torch.arange(seq_len_k, device=kv.k.device)
    return kv.k.index_select(0, rows)


def build_xattention(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet, *, sm_scale: float,
                     est: Estimation) -> SparseLayout:
    """XAttention layout over ``len(heads.heads)`` heads sharing one ``stride``; per-head ``threshold``.

    q: ``[T, Hq, D]`` chunk queries packed by ``geom.cu_seqlens_q`` (RoPE applied); kv: the requests' keys.
    Returns a layout ``[NQB, Hs, ...]`` with ``MAXB = ceil(max Sk / 64)``.
    """
    check_queries_and_kv(q, kv, geom)
    check("threshold" in heads.budgets and "stride" in heads.budgets, "heads", "needs budgets threshold and stride")
    stride = int(heads.budget_max["stride"])  # one per head group (the planner groups heads by it)
    check(stride in XATTENTION_STRIDES, "stride", f"{stride} not one of {XATTENTION_STRIDES}")
    nkb = -(-geom.max_seqlen_k // BLOCK)
    runs = kv_runs(heads.heads, q.shape[1] // kv.k.shape[1])
    mass = torch.zeros(geom.num_query_blocks, len(heads.heads), nkb, device=q.device, dtype=torch.float32)
    qb0, t0 = 0, 0
    for r, (sq, sk) in enumerate(zip(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu)):  # host lengths: no sync
        n = -(-sq // BLOCK)
        antidiagonal_block_mass(q[t0:t0 + sq].index_select(1, heads.q_head), request_keys(kv, r, sk), runs,
                                stride=stride, sm_scale=sm_scale, num_key_blocks=nkb, out=mass[qb0:qb0 + n])
        qb0, t0 = qb0 + n, t0 + sq
    # the block shares are 0 off the candidates, so mass + offset is keep_by_mass's priority
    offset = geom.derived(("xattention_offset", nkb), lambda: _priority_offset(geom, nkb))
    keep = keep_ranked(mass, mass + offset, heads.budgets["threshold"].view(1, -1), forced=True)
    return layout_from_blocks(keep, geom)


def _priority_offset(geom: BatchGeometry, num_key_blocks: int) -> torch.Tensor:
    """``[NQB, 1, NKB]`` float32: ``2`` on the forced blocks, ``0`` on the other candidates, ``-1`` elsewhere."""
    g = grid(geom, num_key_blocks)
    return torch.where(g.candidate, 2.0 * forced_blocks(g.diagonal), -1.0)


def _head_mass(spec, q: torch.Tensor, k: torch.Tensor, sm_scale: float):
    """One head's block shares ``[NB, 1, NB]`` and its (candidate, forced) masks, full prefill of ``n`` keys."""
    n = q.shape[0]
    nb = -(-n // BLOCK)
    mass = antidiagonal_block_mass(q[:, None], k[:, None], [(0, 1, 0)], stride=spec.stride, sm_scale=sm_scale,
                                   num_key_blocks=nb)
    candidate, diagonal = block_candidates(BatchGeometry.build([n], [n], q.device), nb)
    return mass, candidate, forced_blocks(diagonal)


def realise_xattention(spec, q: torch.Tensor, k: torch.Tensor, *, sm_scale: float, est: Estimation,
                       softcap: float | None):
    """The blocks the online builder keeps for one head of ``n`` tokens (q, k: ``[n, D]``)."""
    mass, candidate, forced = _head_mass(spec, q, k, sm_scale)
    keep = keep_by_mass(mass, candidate, torch.tensor([spec.threshold], device=q.device), forced=forced)
    none = torch.zeros(0, dtype=torch.int64, device=q.device)
    return Selection(n=q.shape[0], columns=none, offsets=none, blocks=keep[:, 0])


def fit_xattention(spec, q: torch.Tensor, k: torch.Tensor, budget: int, *, sm_scale: float, est: Estimation,
                   softcap: float | None, row_block: int, skip_rows: int):
    """``spec`` with the largest threshold (bisected, at least ``share_fit.MIN_SHARE``) whose kept blocks on this
    head cost at most ``budget`` keys per row over rows ``skip_rows .. n-1``; scores computed once."""
    mass, candidate, forced = _head_mass(spec, q, k, sm_scale)
    n = q.shape[0]

    def keys(share: float) -> float:
        keep = keep_by_mass(mass, candidate, torch.tensor([share], device=q.device), forced=forced)
        return block_keys(keep[:, 0], n, skip_rows)

    return spec.model_copy(update={"threshold": largest_share_within(keys, budget, steps=20)})
