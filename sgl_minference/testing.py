"""Test references (only the tests import them; the serving core never does): exact masked attention in plain
torch, and dense causal attention as a ``SparseLayout``.

``masked_attention(q, kv, geom, layout.to_dense(geom))`` is the oracle every kernel test compares against;
``full_layout`` expresses dense causal attention as a ``SparseLayout`` so the sparse kernel can stand in for it.
It is built here in plain torch, on purpose not by the core's dense builder (``patterns.build_dense``, which goes
through the conversion kernel and tiles keys differently): the kernel tests then do not depend on the conversion
kernel, and the broken-layout tests corrupt its known entries.
"""

from __future__ import annotations

import torch

from sgl_minference.checks import check
from sgl_minference.layout import BLOCK, BatchGeometry, KVSource, SparseLayout


def causal_masks(geom: BatchGeometry, num_heads: int) -> list[torch.Tensor]:
    """Bottom-right causal masks: per request a ``[Hq, Sq_r, Sk_r]`` bool tensor, ``key j <= prefix_r + i``.

    On the geometry's device.
    """
    device = geom.cu_seqlens_q.device
    masks = []
    for sq, sk in zip(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu):
        pos = torch.arange(sk - sq, sk, device=device).view(-1, 1)
        mask = torch.arange(sk, device=device).view(1, -1) <= pos
        masks.append(mask.expand(num_heads, sq, sk))
    return masks


def masked_attention(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, masks: list[torch.Tensor], *,
                     sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention where query row ``i`` of request ``r`` and head ``h`` attends exactly ``masks[r][h, i]``.

    q: ``[T, Hq, D]``; kv: ``[rows, Hk, D]`` with ``Hq % Hk == 0`` (GQA); masks: per request ``[Hq, Sq_r, Sk_r]``
    bool. Computed in fp32. Returns ``o`` ``[T, Hq, D]`` (``q.dtype``) and ``lse`` ``[T, Hq]`` float32
    (natural log of the scaled scores' sum of exponentials); a row with no key gets ``o = 0``, ``lse = -inf``.
    """
    num_heads = q.shape[1]
    check(num_heads % kv.k.shape[1] == 0, "k", f"{kv.k.shape[1]} KV heads do not divide {num_heads} query heads")
    check(len(masks) == geom.num_requests, "masks", f"{len(masks)} masks for {geom.num_requests} requests")
    group = num_heads // kv.k.shape[1]
    outs, lses = [], []
    start = 0
    for r, (sq, sk) in enumerate(zip(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu)):
        check(tuple(masks[r].shape) == (num_heads, sq, sk), "masks",
              f"request {r}: shape {tuple(masks[r].shape)} != {(num_heads, sq, sk)}")
        k, v = kv.gather(r, sk)
        k = k.float().repeat_interleave(group, dim=1)  # [Sk, Hq, D]
        v = v.float().repeat_interleave(group, dim=1)
        qr = q[start: start + sq].float()  # [Sq, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qr, k) * sm_scale
        scores = scores.masked_fill(~masks[r].to(scores.device), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [Hq, Sq]
        p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        lses.append(lse.transpose(0, 1))
        start += sq
    return torch.cat(outs).to(q.dtype), torch.cat(lses).contiguous()


def dense_attention(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, *,
                    sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bottom-right causal attention; same shapes and contract as :func:`masked_attention`."""
    return masked_attention(q, kv, geom, causal_masks(geom, q.shape[1]), sm_scale=sm_scale)


def full_layout(geom: BatchGeometry, num_heads: int, device) -> SparseLayout:
    """The layout that visits every causal key: dense causal attention through the sparse kernel.

    Each query block's keys ``[0, p_last]`` (``p_last`` the position of its last row) are tiled by 64-wide
    ranges aligned to end at ``p_last + 1``; the leftmost may start below 0. A range is full when it lies
    entirely left of the block's first row, else partial (at most the diagonal one and the leftmost one).
    Vectorised on ``device``; the range capacity comes from host lengths. ``num_heads`` copies of it,
    no columns (``col_index`` is ``[NQB, Hq, 0]``).
    """
    qb_request = geom.qb_request.to(device).long()
    cu = geom.cu_seqlens_q.to(device).long()
    seq_q = (cu[1:] - cu[:-1])[qb_request]
    row = geom.qb_row.to(device).long()
    first = geom.prefix_lens.to(device).long()[qb_request] + row  # [NQB] position of the block's first row
    last = first + torch.clamp(seq_q - row, max=BLOCK) - 1  # [NQB] position of its last valid row
    max_ranges = -(-geom.max_seqlen_k // BLOCK)
    k = torch.arange(max_ranges, device=device)
    end = last[:, None] + 1 - BLOCK * k[None, :]  # [NQB, MAXB] descending from the diagonal
    start = end - BLOCK
    exists = end > 0
    full = exists & (start >= 0) & (end - 1 <= first[:, None])
    # Order: full ranges ascending, then partial ranges ascending, then unused slots.
    big = geom.max_seqlen_k + 2 * BLOCK
    key = torch.where(full, start, start + big)
    key = torch.where(exists, key, 3 * big)
    order = torch.argsort(key, dim=1)
    start = torch.gather(start, 1, order)
    end = torch.gather(end, 1, order)
    nqb = geom.num_query_blocks

    def per_head(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32).unsqueeze(1).expand(nqb, num_heads, *t.shape[1:]).contiguous()

    return SparseLayout(
        block_start=per_head(start),
        block_end=per_head(end),
        block_count=per_head(exists.sum(1)),
        full_count=per_head(full.sum(1)),
        col_index=torch.zeros(nqb, num_heads, 0, dtype=torch.int32, device=device),
        col_count=torch.zeros(nqb, num_heads, dtype=torch.int32, device=device),
    )
