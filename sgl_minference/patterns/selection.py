"""What a pattern keeps on one head of one sequence, offline: the realisations the search scores.

A pattern is *realised* for one head on one sequence (:func:`realise`, by its registry entry's ``realise``): the
keys it keeps, exactly as the online path would pick them and the kernels would visit them, as a
:class:`Selection`. The search (``sgl_minference.tools.search``) scores selections by attention recall; the
adaptive patterns' realisations and fits (``patterns/xattention.py``, ``patterns/flexprefill.py``) build on the
pieces here, so this module is core, not a tool.

Kept keys (the kernel layout's semantics, per 64-row query block starting at row ``r0``; see
``sgl_minference.patterns``): every key column in ``columns``; for each diagonal offset ``o`` in ``offsets``
the 64 keys ``[r0 - o, r0 - o + 64)`` (so a row late in a block sees up to 63 diagonals past ``o``, as the
kernel computes them); every 64x64 block set in ``blocks``; always cut to the causal keys ``j <= i``.
A-shape ``(sink, local)`` is columns ``0..sink-1`` plus offsets ``0..local-1``, as the online builder writes it.

The realisations of the original four pattern types and vertical-slash's fit (:func:`fit_slash`) are here;
the others live in their pattern modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check
from ..config import DEFAULT_ESTIMATION, Estimation, VerticalSlashSpec
from ..layout import BLOCK
from ..registry import pattern_of


@dataclass(kw_only=True)
class Selection:
    """The keys one head's pattern keeps on one sequence of ``n`` tokens (see the module docstring)."""

    n: int  # sequence length
    columns: torch.Tensor  # [C] int64 key columns kept by every row (C may be 0)
    offsets: torch.Tensor  # [S] int64 diagonal offsets i - j, each widened to a 64-key range per query block
    blocks: torch.Tensor | None = None  # [ceil(n/64), ceil(n/64)] bool kept 64x64 blocks (block-sparse)
    dense: bool = False  # every causal key

    def row_mask(self, r0: int, r1: int) -> torch.Tensor:
        """``[r1 - r0, r1]`` bool: kept keys ``0 <= j < r1`` of query rows ``r0 <= i < r1`` (causal cut not applied)."""
        dev = self.columns.device
        rows = torch.arange(r0, r1, device=dev)
        if self.dense:
            return torch.ones(r1 - r0, r1, dtype=torch.bool, device=dev)
        mask = torch.zeros(r1 - r0, r1, dtype=torch.bool, device=dev)
        cols = self.columns[self.columns < r1]
        mask[:, cols] = True
        if self.offsets.numel():
            qb0, qb1 = r0 // BLOCK, (r1 - 1) // BLOCK + 1
            block_row = BLOCK * torch.arange(qb0, qb1, device=dev).view(-1, 1)
            starts = (block_row - self.offsets.view(1, -1)).clamp(0, r1)  # [nqb, S]
            ends = (block_row - self.offsets.view(1, -1) + BLOCK).clamp(0, r1)
            # +1 at each range start, -1 at its end: a running sum > 0 marks covered keys
            diff = torch.zeros(qb1 - qb0, r1 + 1, dtype=torch.int32, device=dev)
            diff.scatter_add_(1, starts, torch.ones_like(starts, dtype=torch.int32))
            diff.scatter_add_(1, ends, torch.full_like(ends, -1, dtype=torch.int32))
            covered = diff.cumsum(1)[:, :r1] > 0
            mask |= covered[rows // BLOCK - qb0]
        if self.blocks is not None:
            mask |= self.blocks[rows // BLOCK].repeat_interleave(BLOCK, dim=1)[:, :r1]
        return mask


def logits(q: torch.Tensor, k: torch.Tensor, sm_scale: float, softcap: float | None) -> torch.Tensor:
    """fp32 attention logits ``q @ k^T * sm_scale``, soft-capped as the model does (``cap * tanh(s / cap)``)."""
    s = (q.float() @ k.float().T) * sm_scale
    return s if not softcap else softcap * torch.tanh(s / softcap)


def lastq_scores(q: torch.Tensor, k: torch.Tensor, *, sm_scale: float, est: Estimation = DEFAULT_ESTIMATION,
                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores of one head as the online vertical-slash estimation computes them.

    The last ``min(est.last_q, n)`` queries' causal softmax (fp32) summed per key column and per diagonal offset
    ``i - j``; the first ``est.forced_sink`` columns and the ``est.forced_local`` nearest diagonals score ``inf``
    (always taken, inside the budget).

    Args:
        q, k: ``[n, D]`` one head's queries and keys (after RoPE), any float dtype.
    Returns:
        ``col [n]`` and ``diag [n]`` float32.
    """
    n = q.shape[0]
    rows = min(est.last_q, n)
    pos = torch.arange(n - rows, n, device=q.device).view(-1, 1)
    keys = torch.arange(n, device=q.device).view(1, -1)
    s = logits(q[n - rows:], k, sm_scale, softcap).masked_fill(keys > pos, float("-inf"))
    p = torch.softmax(s, dim=-1)  # [rows, n]
    col = p.sum(0)
    offset = (pos - keys).clamp(min=0)  # masked entries have p == 0, so clamping them to 0 adds nothing
    diag = torch.zeros(n, dtype=torch.float32, device=q.device).scatter_add_(0, offset.flatten(), p.flatten())
    col[:est.forced_sink] = float("inf")
    diag[:est.forced_local] = float("inf")
    return col, diag


def lastq_indices(q: torch.Tensor, k: torch.Tensor, *, sm_scale: float, vertical: int, slash: int,
                  est: Estimation = DEFAULT_ESTIMATION,
                  softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical-slash indices of one head as the online method picks them (top of :func:`lastq_scores`).

    Returns ``columns [min(vertical, n)]`` int64 ascending and ``offsets [min(slash, n)]`` int64 descending.
    """
    col, diag = lastq_scores(q, k, sm_scale=sm_scale, est=est, softcap=softcap)
    n = q.shape[0]
    columns = col.topk(min(vertical, n)).indices.sort().values
    offsets = diag.topk(min(slash, n)).indices.sort(descending=True).values
    return columns, offsets


def block_means(x: torch.Tensor) -> torch.Tensor:
    """``[ceil(n/64), D]`` fp32 mean of each 64-row block of ``x [n, D]`` (the last block over its valid rows)."""
    n, d = x.shape
    nb = -(-n // BLOCK)
    padded = torch.zeros(nb * BLOCK, d, dtype=torch.float32, device=x.device)
    padded[:n] = x.float()
    counts = torch.full((nb, 1), float(BLOCK), device=x.device)
    counts[-1] = n - (nb - 1) * BLOCK
    return padded.view(nb, BLOCK, d).sum(1) / counts


def block_topk(q: torch.Tensor, k: torch.Tensor, *, topk: int) -> torch.Tensor:
    """Block-sparse selection of one head as the online method picks it: ``[NB, NB]`` bool kept blocks.

    Scores of mean-pooled 64-row query and key blocks; a key block is a candidate when it holds a causal key of
    the query block's last row; the diagonal block is always kept and counts inside ``topk``.
    q, k: ``[n, D]`` one head's queries and keys.
    """
    s = block_means(q) @ block_means(k).T  # [NB, NB]
    nb = s.shape[0]
    qb = torch.arange(nb, device=q.device).view(-1, 1)
    kb = torch.arange(nb, device=q.device).view(1, -1)
    s = s.masked_fill(kb > qb, float("-inf")).masked_fill(kb == qb, float("inf"))
    vals, picked = s.topk(min(topk, nb), dim=-1)
    kept = torch.zeros(nb, nb, dtype=torch.bool, device=q.device)
    kept.scatter_(1, picked, vals > float("-inf"))
    return kept


def realise(spec, q: torch.Tensor, k: torch.Tensor, *, sm_scale: float, est: Estimation = DEFAULT_ESTIMATION,
            softcap: float | None = None) -> Selection:
    """The keys ``spec`` (a config head spec) keeps for one head, by its registry entry's realisation.

    q, k: ``[n, D]`` one head's queries and keys (after RoPE); budgets clamped to ``n``.
    """
    return pattern_of(spec).realise(spec, q, k, sm_scale=sm_scale, est=est, softcap=softcap)


def _none(q: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64, device=q.device)


def realise_dense(spec, q, k, *, sm_scale, est, softcap) -> Selection:
    return Selection(n=q.shape[0], columns=_none(q), offsets=_none(q), dense=True)


def realise_a_shape(spec, q, k, *, sm_scale, est, softcap) -> Selection:
    n = q.shape[0]
    return Selection(n=n, columns=torch.arange(min(spec.sink, n), device=q.device),
                     offsets=torch.arange(min(spec.local, n), device=q.device).flip(0))


def realise_vertical_slash(spec, q, k, *, sm_scale, est, softcap) -> Selection:
    columns, offsets = lastq_indices(q, k, sm_scale=sm_scale, vertical=spec.vertical, slash=spec.slash, est=est,
                                     softcap=softcap)
    return Selection(n=q.shape[0], columns=columns, offsets=offsets)


def realise_block_sparse(spec, q, k, *, sm_scale, est, softcap) -> Selection:
    return Selection(n=q.shape[0], columns=_none(q), offsets=_none(q), blocks=block_topk(q, k, topk=spec.topk))


def blocks_only(sel: Selection) -> bool:
    """Whether ``sel`` is made only of 64x64 blocks (its cost and recall then have closed forms per block)."""
    return sel.blocks is not None and not sel.dense and sel.columns.numel() == 0 and sel.offsets.numel() == 0


def block_row_keys(blocks: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """``[r1 - r0]`` causal keys of rows ``r0 .. r1-1`` under kept blocks ``[NB, NB]``: a kept block left of the
    diagonal gives a row 64 keys, the diagonal block ``i - 64 qb + 1`` (blocks right of it none)."""
    rows = torch.arange(r0, r1, device=blocks.device)
    qb = rows // BLOCK
    return BLOCK * blocks.tril(-1).sum(1)[qb] + blocks.diagonal()[qb] * (rows - BLOCK * qb + 1)


def block_keys(blocks: torch.Tensor, n: int, skip_rows: int = 0) -> float:
    """Mean causal keys per row over rows ``skip_rows .. n-1`` of kept 64x64 blocks ``[NB, NB]`` bool (closed form:
    a kept block left of the diagonal gives a row 64 keys, the diagonal block ``i - 64 qb + 1``)."""
    check(0 <= skip_rows < n, "skip_rows", f"{skip_rows} leaves no row of {n} to count")
    return float(block_row_keys(blocks, skip_rows, n).sum(dtype=torch.float64)) / (n - skip_rows)


def selection_keys(sel: Selection, *, row_block: int = 1024, skip_rows: int = 0) -> float:
    """Mean causal keys ``sel`` keeps per query row over rows ``skip_rows .. n-1`` (no scores needed)."""
    check(0 <= skip_rows < sel.n, "skip_rows", f"{skip_rows} leaves no row of {sel.n} to count")
    if blocks_only(sel):
        return block_keys(sel.blocks, sel.n, skip_rows)
    total = 0
    for r0 in range(skip_rows, sel.n, row_block):
        r1 = min(r0 + row_block, sel.n)
        dev = sel.columns.device
        causal = torch.arange(r1, device=dev).view(1, -1) <= torch.arange(r0, r1, device=dev).view(-1, 1)
        total += int((sel.row_mask(r0, r1) & causal).sum())
    return total / (sel.n - skip_rows)


def fit_slash(spec: VerticalSlashSpec, q: torch.Tensor, k: torch.Tensor, budget: int, *, sm_scale: float,
              est: Estimation = DEFAULT_ESTIMATION, softcap: float | None = None, row_block: int = 1024,
              skip_rows: int = 0) -> VerticalSlashSpec:
    """``spec`` with the largest slash count (at most ``max(spec.slash, budget)``) whose realised keys per row on
    this head (rows ``skip_rows..n-1``) are at most ``budget``; never below ``est.forced_local`` (the diagonals
    always kept). The count grows past the nominal one when the columns leave budget unused.

    q, k: ``[n, D]`` the head's queries and keys. Bisects over prefixes of the online ranking of diagonals
    (realised keys grow with the slash count); each step counts kept keys without computing softmax.
    """
    n = q.shape[0]
    col, diag = lastq_scores(q, k, sm_scale=sm_scale, est=est, softcap=softcap)
    columns = col.topk(min(spec.vertical, n)).indices.sort().values
    ranked = diag.topk(min(max(spec.slash, budget), n)).indices  # best first: a prefix is the online top-S

    def keys(slash: int) -> float:
        sel = Selection(n=n, columns=columns, offsets=ranked[:slash])
        return selection_keys(sel, row_block=row_block, skip_rows=skip_rows)

    lo, hi = min(max(est.forced_local, 1), ranked.numel()), ranked.numel()
    if keys(hi) <= budget:
        return spec.model_copy(update={"slash": hi})
    if keys(lo) > budget:
        return spec.model_copy(update={"slash": lo})
    while hi - lo > 1:  # invariant: keys(lo) <= budget < keys(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if keys(mid) <= budget else (lo, mid)
    return spec.model_copy(update={"slash": lo})
