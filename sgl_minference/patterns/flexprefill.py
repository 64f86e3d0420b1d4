"""FlexPrefill: per head and input, a query-aware block pattern or vertical-slash, budgets by cumulative mass.

Decision, per (request, head) of each chunk. The last ``n = min(last_q, Sq)`` queries' true attention (the
vertical-slash estimation's column sums, ``kernels.estimate.lastq_scores``) summed per 64-key block is compared
with the block-pooled estimate of the same rows (softmax over key blocks of ``sm_scale`` times the mean of those
queries dotted with the mean-pooled keys, ``pool_keys``) by the Jensen-Shannon distance (the square root of the
divergence, natural log, in ``[0, sqrt(ln 2)]``). Below the head's ``tau`` the pooled estimate is trusted and the
head runs the *query-aware block pattern*, else *vertical-slash*.

Budgets by cumulative mass ``gamma`` (:func:`~sgl_minference.patterns.blocks.keep_by_mass`: the smallest set,
largest first, whose normalised mass reaches ``gamma``) instead of a fixed top-k:

* block pattern, per query block: the key blocks of the pooled estimate (softmax of ``sm_scale`` times the block's
  mean query dotted with the pooled keys over its causal key blocks); the diagonal block(s) first; at least
  ``ceil(min_budget / 64)`` blocks. Capacity: every key block (``ceil(max Sk / 64)``).
* vertical-slash, per request: key columns by the last queries' column mass and diagonals by their diagonal mass,
  each set reaching ``gamma``, at least ``min_budget`` of each, the config's forced sink columns / local diagonals
  first; then the vertical-slash conversion (``patterns.convert``). Capacity: ``min(max Sk, max(VS_CAP,
  max min_budget))`` columns and diagonals per head, a host bound; a head whose ``gamma`` needs more keeps its
  top ``VS_CAP`` of each.

Both branches are built for every head and the layout picks per head on the device, so nothing syncs. Chunked
prefill: each chunk decides and budgets anew against the whole context (bottom-right causal, absolute keys).
"""

from __future__ import annotations

import torch

from ..checks import check
from ..config import Estimation
from ..kernels.estimate import lastq_sums, pool_keys
from ..kernels.sparse_attention import check_queries_and_kv
from ..layout import BLOCK, SENTINEL, BatchGeometry, KVSource, SparseLayout
from .blocks import (block_candidates, grid, keep_by_mass, keep_ranked, layout_from_blocks, mean_rows, pad_last,
                     pooled_query_blocks, row_span, select_heads)
from .convert import indices_to_layout
from .heads import HeadSet
from .selection import Selection, block_means, selection_keys
from .selection import lastq_scores as exact_lastq_scores
from .share_fit import largest_share_within

VS_CAP = 8192  # columns (and diagonals) the vertical-slash branch can keep per head: the layout's capacity


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance between distributions along the last dimension (natural log); ``[...]`` float32."""
    m = (p + q) / 2
    div = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return div.clamp(min=0).sqrt()


def top_by_mass(mass: torch.Tensor, valid: torch.Tensor, share: torch.Tensor, min_count: torch.Tensor,
                forced: torch.Tensor, cap: int, unused: int, descending: bool) -> torch.Tensor:
    """Positions kept by :func:`keep_by_mass` (``forced`` first), at most ``cap`` (the largest), sorted.

    ``mass [B, H, N]``; returns ``[B, H, cap]`` int32 ascending (``descending``: descending), padded with ``unused``.
    """
    keep = keep_by_mass(mass, valid, share, forced=forced, min_count=min_count)
    prio = torch.where(keep, torch.where(forced, 2.0 + mass, mass), -1.0)
    vals, idx = prio.topk(cap, dim=-1)
    idx = torch.where(vals >= 0, idx, unused)
    return idx.sort(dim=-1, descending=descending).values.to(torch.int32)


def _batch_constants(geom: BatchGeometry, est: Estimation):
    """What the build reads that depends on the batch only, made once per batch:

    * ``rows [B, 1, 1]`` int32: estimation rows per request;
    * ``vs_offset [2, B, 1, max Sk]`` float32: the columns' and diagonals' priority offsets, ``2`` forced, ``0``
      other keys, ``-1`` past ``Sk_r`` (where the masses are 0), so ``mass + offset`` is :func:`keep_by_mass`'s
      priority;
    * ``pos [max Sk]`` int64 lanes; ``unused [2, 1, 1, 1]`` int64: the index lists' padding (``SENTINEL``
      columns, ``-1`` diagonals, both sorted ascending);
    * ``outside [B, 1, NKB]`` bool: key blocks past ``Sk_r``;
    * ``block_offset [NQB, 1, NKB]`` float32: the block priority offsets (``2`` diagonal, ``0`` other
      candidates, ``-1`` the rest: their probabilities are 0); ``block_lanes [NKB]`` int64: ``64 b``, so
      ``64 b < min_budget`` is ``b < ceil(min_budget / 64)``.
    """
    dev = geom.seq_lens_k.device
    nkb = -(-geom.max_seqlen_k // BLOCK)
    pos = torch.arange(geom.max_seqlen_k, device=dev)
    forced = torch.stack([pos < est.forced_sink, pos < est.forced_local]).view(2, 1, 1, -1)
    sk = geom.seq_lens_k.view(-1, 1, 1)
    g = grid(geom, nkb)
    return dict(rows=(geom.cu_seqlens_q[1:] - geom.cu_seqlens_q[:-1]).clamp(max=est.last_q).view(-1, 1, 1),
                vs_offset=torch.where(pos < sk, 2.0 * forced, -1.0), pos=pos,
                unused=torch.tensor([SENTINEL, -1], device=dev).view(2, 1, 1, 1),
                outside=g.start >= sk,
                block_offset=torch.where(g.candidate, 2.0 * g.diagonal, -1.0), block_lanes=g.lanes * BLOCK)


def _last_rows_mean(q: torch.Tensor, geom: BatchGeometry, q_head: torch.Tensor, last_q: int) -> torch.Tensor:
    """Mean of the last ``min(last_q, Sq_r)`` queries of each request: ``[B, Hs, D]`` float32."""
    def span():
        end = geom.cu_seqlens_q[1:]
        return row_span(end - (end - geom.cu_seqlens_q[:-1]).clamp(max=last_q), end, last_q)

    return mean_rows(q, geom.derived(("last_rows", last_q), span), q_head)


def build_flexprefill(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet, *, sm_scale: float,
                      est: Estimation) -> SparseLayout:
    """FlexPrefill layout over ``len(heads.heads)`` heads; per-head ``gamma``, ``tau``, ``min_budget``.

    q: ``[T, Hq, D]`` chunk queries packed by ``geom.cu_seqlens_q`` (RoPE applied); kv: the requests' keys.
    Returns a layout ``[NQB, Hs, ...]`` (``MAXB = max(ceil(max Sk / 64), cap)``, ``MAXC = cap``; module docstring).
    What depends on the batch only (masks, lanes, row indices) is built once per batch and shared by the layers.
    """
    check_queries_and_kv(q, kv, geom)
    check(all(b in heads.budgets for b in ("gamma", "tau", "min_budget")), "heads",
          "needs budgets gamma, tau and min_budget")
    b, hs, dev = geom.num_requests, len(heads.heads), q.device
    max_sk = geom.max_seqlen_k
    nkb = -(-max_sk // BLOCK)
    gamma, tau = heads.budgets["gamma"].view(1, -1), heads.budgets["tau"].view(1, -1)
    min_budget = heads.budgets["min_budget"].view(1, -1)
    g = grid(geom, nkb)
    c = geom.derived(("flexprefill", est.last_q, est.forced_sink, est.forced_local),
                lambda: _batch_constants(geom, est))

    # -- the last queries' true attention: per key column, per diagonal, per key block (each sums to 1)
    sums = lastq_sums(q, kv, geom, heads.q_head, heads.kv_head, sm_scale=sm_scale, last_q=est.last_q)
    mass = sums.clamp(min=0) / c["rows"]  # [2, B, Hs, max Sk]: column, diagonal masses (0 past Sk_r)
    true_blocks = pad_last(mass[0], nkb * BLOCK).view(b, hs, nkb, BLOCK).sum(-1)

    # -- the pooled estimate of the same rows, and the decision per (request, head)
    keys = pool_keys(kv, geom).index_select(1, heads.kv_head)  # [B, Hs, NKB, D] float32
    logits = torch.einsum("bhd,bhkd->bhk", _last_rows_mean(q, geom, heads.q_index, est.last_q), keys) * sm_scale
    pooled = logits.masked_fill_(c["outside"], float("-inf")).softmax(-1)
    use_blocks = js_distance(true_blocks, pooled) < tau  # [B, Hs]

    # -- vertical-slash branch: columns and diagonals by cumulative mass, both at once. The sums of a head are
    # all >= 0 below Sk_r, or all NaN (then nothing is kept, as when they count as invalid).
    cap = min(max_sk, max(VS_CAP, int(heads.budget_max["min_budget"])))
    prio = mass + c["vs_offset"]
    keep = keep_ranked(mass, prio, gamma, forced=True, lanes=c["pos"], min_lanes=min_budget)
    vals, idx = torch.where(keep, prio, -1.0).topk(cap, dim=-1)
    idx = torch.where(vals >= 0, idx, c["unused"]).sort(dim=-1).values.to(torch.int32)
    vertical_slash = indices_to_layout(idx[0], idx[1].flip(-1), geom)  # diagonals descending

    # -- query-aware block branch: per query block, key blocks by cumulative pooled mass
    pooled_q = pooled_query_blocks(q, geom, heads.q_index)  # [NQB, Hs, D]
    scores = torch.empty(geom.num_query_blocks, hs, nkb, device=dev, dtype=torch.float32)
    qb0 = 0
    for r, sq in enumerate(geom.seq_lens_q_cpu):  # one batched product per request; host ints only, no sync
        n = -(-sq // BLOCK)
        torch.mul(torch.einsum("nhd,hkd->nhk", pooled_q[qb0:qb0 + n], keys[r]), sm_scale, out=scores[qb0:qb0 + n])
        qb0 += n
    p = scores.masked_fill_(g.not_candidate, float("-inf")).softmax(-1)
    keep = keep_ranked(p, p + c["block_offset"], gamma, forced=True, lanes=c["block_lanes"], min_lanes=min_budget)
    return select_heads(use_blocks[g.qb_request], layout_from_blocks(keep, geom), vertical_slash)


def _head_inputs(q: torch.Tensor, k: torch.Tensor, sm_scale: float, est: Estimation, softcap: float | None):
    """One head's estimation inputs, full prefill of ``n`` tokens (plain torch, as the online kernels compute
    them): JS distance, column / diagonal masses ``[n]``, pooled block probabilities ``[NB, NB]`` and the
    (candidate, diagonal) block masks."""
    n = q.shape[0]
    nb = -(-n // BLOCK)
    rows = min(est.last_q, n)
    raw = Estimation(last_q=est.last_q, forced_sink=0, forced_local=0)  # unforced sums
    col, diag = exact_lastq_scores(q, k, sm_scale=sm_scale, est=raw, softcap=softcap)
    col_mass, diag_mass = col / rows, diag / rows
    true_blocks = pad_last(col_mass, nb * BLOCK).view(nb, BLOCK).sum(-1)
    pk = block_means(k)
    pooled = torch.softmax(pk @ q[n - rows:].float().mean(0) * sm_scale, dim=-1)
    geom = BatchGeometry.build([n], [n], q.device)
    candidate, diagonal = block_candidates(geom, nb)
    p = (block_means(q) @ pk.T * sm_scale)[:, None].masked_fill(~candidate, float("-inf")).softmax(-1)
    return float(js_distance(true_blocks, pooled)), col_mass, diag_mass, p, candidate, diagonal


def _selection(spec, inputs, gamma: float, est: Estimation) -> Selection:
    js, col_mass, diag_mass, p, candidate, diagonal = inputs
    n, dev = col_mass.shape[0], col_mass.device
    share = torch.tensor([gamma], device=dev)
    none = torch.zeros(0, dtype=torch.int64, device=dev)
    if js < spec.tau:
        keep = keep_by_mass(p, candidate, share, forced=diagonal,
                            min_count=torch.tensor([-(-spec.min_budget // BLOCK)], device=dev))
        return Selection(n=n, columns=none, offsets=none, blocks=keep[:, 0])
    cap, pos = min(n, max(VS_CAP, spec.min_budget)), torch.arange(n, device=dev)
    valid = torch.ones(n, dtype=torch.bool, device=dev)
    count = torch.tensor([spec.min_budget], device=dev)

    def top(mass, forced, unused, descending):
        idx = top_by_mass(mass.view(1, 1, -1), valid, share, count, forced, cap, unused, descending)[0, 0].long()
        return idx[idx != unused]

    return Selection(n=n, columns=top(col_mass, pos < est.forced_sink, SENTINEL, False),
                     offsets=top(diag_mass, pos < est.forced_local, -1, True))


def realise_flexprefill(spec, q: torch.Tensor, k: torch.Tensor, *, sm_scale: float, est: Estimation,
                        softcap: float | None) -> Selection:
    """The keys the online builder keeps for one head of ``n`` tokens (q, k: ``[n, D]``)."""
    return _selection(spec, _head_inputs(q, k, sm_scale, est, softcap), spec.gamma, est)


def fit_flexprefill(spec, q: torch.Tensor, k: torch.Tensor, budget: int, *, sm_scale: float, est: Estimation,
                    softcap: float | None, row_block: int, skip_rows: int):
    """``spec`` with the largest ``gamma`` (bisected, at least ``share_fit.MIN_SHARE``) whose selection on this
    head costs at most ``budget`` keys per row over rows ``skip_rows .. n-1``; the branch and the scores are
    computed once."""
    inputs = _head_inputs(q, k, sm_scale, est, softcap)

    def keys(gamma: float) -> float:
        return selection_keys(_selection(spec, inputs, gamma, est), row_block=row_block, skip_rows=skip_rows)

    return spec.model_copy(update={"gamma": largest_share_within(keys, budget, steps=14)})
