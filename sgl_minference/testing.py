"""Test references (the tests and the benchmark checks import them; the serving core never does): exact masked
attention in plain torch, and dense causal attention as a ``SparseLayout``.

``masked_attention(q, kv, geom, layout.to_dense(geom))`` is the oracle every kernel test compares against;
``full_layout`` is the core's dense layout for a head count, so the sparse kernel can stand in for dense attention.
"""

from __future__ import annotations

import torch

from sgl_minference.checks import check
from sgl_minference.layout import BatchGeometry, KVSource, SparseLayout
from sgl_minference.patterns import HeadSet, build_dense


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
    """The layout that visits every causal key for ``num_heads`` heads on ``device``: the serving core's dense
    builder (:func:`~sgl_minference.patterns.build_dense`), so the sparse kernel can stand in for dense
    attention."""
    return build_dense(geom, HeadSet.build(list(range(num_heads)), num_q_heads=num_heads, num_kv_heads=num_heads,
                                           device=device))
