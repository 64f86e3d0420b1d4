"""Block-sparse: top-k 64x64 blocks per query block, from mean-pooled queries and keys."""

from __future__ import annotations

import torch

from ..kernels.estimate import pool_keys
from ..layout import BLOCK, BatchGeometry, KVSource, SparseLayout, check, check_tensor
from .heads import HeadSet


def _pooled_queries(q: torch.Tensor, geom: BatchGeometry, q_head: torch.Tensor) -> torch.Tensor:
    """Mean of each query block's valid rows: ``[NQB, Hs, D]`` float32 (padding rows excluded)."""
    start = geom.cu_seqlens_q[geom.qb_request.long()] + geom.qb_row
    end = geom.cu_seqlens_q[geom.qb_request.long() + 1]
    tok = start.view(-1, 1) + torch.arange(BLOCK, device=q.device, dtype=torch.int32)
    valid = tok < end.view(-1, 1)
    rows = q[torch.where(valid, tok, 0).long()][:, :, q_head.long()].float()  # [NQB, 64, Hs, D]
    rows = rows * valid.view(*valid.shape, 1, 1)
    return rows.sum(1) / valid.sum(1).view(-1, 1, 1)


def build_block_sparse(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet) -> SparseLayout:
    """Block-sparse layout over ``len(heads.heads)`` heads; budget ``topk`` key blocks per query block.

    Key blocks are aligned to absolute positions (``[64 b, 64 b + 64)``); a key block is a candidate for a query
    block when it holds at least one causal key of the block's last row; the key blocks holding the block's own
    diagonal (one or two of them when the prefix is not a multiple of 64) are always kept, even past the budget.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 chunk queries packed by ``geom.cu_seqlens_q``; kv: the requests' keys.
    """
    check_tensor(q, "q", ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check("topk" in heads.budgets, "heads", "needs budget topk")
    dev = q.device
    pooled_k = pool_keys(kv, geom)  # [B, Hk, NKB, D]
    pooled_q = _pooled_queries(q, geom, heads.q_head)  # [NQB, Hs, D]
    nkb = pooled_k.shape[2]
    scores = torch.empty(geom.num_query_blocks, len(heads.heads), nkb, device=dev, dtype=torch.float32)
    qb0 = 0
    for r, sq in enumerate(geom.seq_lens_q_cpu):  # one batched product per request; host ints only, no sync
        n = -(-sq // BLOCK)
        keys = pooled_k[r].index_select(0, heads.kv_head.long())  # [Hs, NKB, D]
        scores[qb0:qb0 + n] = torch.einsum("nhd,hkd->nhk", pooled_q[qb0:qb0 + n], keys)
        qb0 += n

    req = geom.qb_request.long()
    r0 = (geom.prefix_lens[req] + geom.qb_row).view(-1, 1, 1)
    sq = (geom.cu_seqlens_q[req + 1] - geom.cu_seqlens_q[req]).view(-1, 1, 1)
    p_last = r0 + torch.clamp(sq - geom.qb_row.view(-1, 1, 1), max=BLOCK) - 1
    kb = torch.arange(nkb, device=dev, dtype=torch.int32).view(1, 1, -1)
    scores = torch.where(kb * BLOCK <= p_last, scores, float("-inf"))
    scores = torch.where((kb >= r0 // BLOCK) & (kb <= p_last // BLOCK), float("inf"), scores)

    k = min(heads.budget_max["topk"] + 1, nkb)  # +1: a second diagonal block may ride past the budget
    vals, picked = scores.topk(k, dim=-1)
    rank = torch.arange(k, device=dev).view(1, 1, -1)
    keep = (vals > float("-inf")) & ((rank < heads.budgets["topk"].view(1, -1, 1)) | (vals == float("inf")))
    start = picked.to(torch.int32) * BLOCK
    end = torch.minimum(start + BLOCK, geom.seq_lens_k[req].view(-1, 1, 1))
    full = keep & (end - start == BLOCK) & (end - 1 <= r0)
    order = torch.where(keep, torch.where(full, 0, nkb) + picked, 2 * nkb).argsort(dim=-1)
    zeros = torch.zeros(*scores.shape[:2], 1, dtype=torch.int32, device=dev)
    return SparseLayout(block_start=start.gather(-1, order), block_end=end.gather(-1, order),
                        block_count=keep.sum(-1, dtype=torch.int32), full_count=full.sum(-1, dtype=torch.int32),
                        col_index=zeros, col_count=zeros[..., 0].clone())
