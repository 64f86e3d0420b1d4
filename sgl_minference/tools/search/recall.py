"""Attention recall of sparse patterns: the share of each query row's softmax mass a pattern keeps.

Patterns are first realised for one head on one sequence (``sgl_minference.patterns.selection.realise``, by the
registry): the keys they keep, as a :class:`~sgl_minference.patterns.selection.Selection`. Realised selections
are scored here by :func:`head_recall`, which streams query rows in blocks (exact softmax of a row block over
its causal keys), so no ``N x N`` matrix is ever held: memory is ``O(row_block x N)`` per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...checks import check
from ...layout import BLOCK, check_tensor
from ...patterns.selection import Selection, block_row_keys, blocks_only, logits


def head_recall(q: torch.Tensor, k: torch.Tensor, selections: list[Selection], *, sm_scale: float,
                row_block: int = 1024, skip_rows: int = 0,
                softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and cost of each selection on one head, averaged over query rows ``skip_rows .. n-1``.

    Query rows are processed ``row_block`` at a time: exact fp32 softmax of the block over its causal keys,
    then each selection's kept mass. Never holds more than ``row_block x n`` scores. Selections made only of
    64x64 blocks are scored from the probabilities summed per key block (one pass for all of them) and the
    closed-form key count of ``patterns.selection.block_row_keys``, not from a row mask each.

    Args:
        q, k: ``[n, D]`` the head's queries and keys (after RoPE); selections realised on this sequence.
    Returns:
        ``recall [C]`` float64 (mean kept softmax mass per row, 1.0 = lossless) and ``keys [C]`` float64 (mean
        causal keys kept per row: the work the sparse kernel does for the row).
    """
    check_tensor(q, "q", ndim=2)
    check_tensor(k, "k", ndim=2)
    n = q.shape[0]
    check(k.shape == q.shape, "k", f"shape {tuple(k.shape)} != q {tuple(q.shape)}")
    check(0 <= skip_rows < n, "skip_rows", f"{skip_rows} leaves no row of {n} to score")
    check(row_block > 0, "row_block", f"must be positive, got {row_block}")
    for i, sel in enumerate(selections):
        check(sel.n == n, "selections", f"entry {i} was realised for {sel.n} tokens, not {n}")
    recall = torch.zeros(len(selections), dtype=torch.float64, device=q.device)
    keys = torch.zeros_like(recall)
    by_block = [c for c, sel in enumerate(selections) if blocks_only(sel)]
    for r0 in range(skip_rows, n, row_block):
        r1 = min(r0 + row_block, n)
        causal = torch.arange(r1, device=q.device).view(1, -1) <= torch.arange(r0, r1, device=q.device).view(-1, 1)
        p = torch.softmax(logits(q[r0:r1], k[:r1], sm_scale, softcap).masked_fill(~causal, float("-inf")), dim=-1)
        if by_block:
            nb = -(-r1 // BLOCK)
            per_block = F.pad(p, (0, nb * BLOCK - r1)).view(r1 - r0, nb, BLOCK).sum(-1)  # [rows, NB] mass
            qb = torch.arange(r0, r1, device=q.device) // BLOCK
        for c, sel in enumerate(selections):
            if c in by_block:
                recall[c] += (per_block * sel.blocks[qb, :nb]).sum(dtype=torch.float64)
                keys[c] += block_row_keys(sel.blocks, r0, r1).sum(dtype=torch.float64)
                continue
            kept = sel.row_mask(r0, r1) & causal
            recall[c] += (p * kept).sum(dtype=torch.float64)
            keys[c] += kept.sum(dtype=torch.float64)
    rows = n - skip_rows
    return recall / rows, keys / rows
