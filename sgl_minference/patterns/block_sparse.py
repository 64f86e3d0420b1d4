"""Block-sparse: top-k 64x64 blocks per query block, from mean-pooled queries and keys."""

from __future__ import annotations

import torch

from ..kernels.estimate import _head_slots, pool_keys, pool_queries
from ..kernels.select import select_blocks
from ..checks import check
from ..layout import BLOCK, BatchGeometry, KVSource, SparseLayout, check_tensor
from .heads import HeadSet


def build_block_sparse(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, heads: HeadSet) -> SparseLayout:
    """Block-sparse layout over ``len(heads.heads)`` heads; budget ``topk`` key blocks per query block.

    Key blocks are aligned to absolute positions (``[64 b, 64 b + 64)``); a key block is a candidate for a query
    block when it holds at least one causal key of the block's last row; the key blocks holding the block's own
    diagonal (one or two of them when the prefix is not a multiple of 64) are always kept, even past the budget;
    ties break towards lower blocks; a NaN score never ranks.

    Steps: pooled keys ``[B, Hk, NKB, D]`` and pooled queries grouped per KV head ``[slots, G, NQB, D]`` (one
    kernel each), one fp32 matmul per request over the slots (each KV head's pooled keys read in place, not once
    per query head), then one selection kernel per (query block, head) that writes the layout directly.

    Args:
        q: ``[T, Hq, D]`` fp16/bf16 chunk queries packed by ``geom.cu_seqlens_q``; kv: the requests' keys.
    """
    check_tensor(q, "q", ndim=3, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    check("topk" in heads.budgets, "heads", "needs budget topk")
    num_kv = kv.k.shape[1]
    group = q.shape[1] // num_kv
    slot_kv = sorted({h // group for h in heads.heads})  # host: the KV head of each used slot, ascending
    table = _head_slots(heads.kv_head, num_kv, group, group)[: len(slot_kv)]  # [slots, G]
    pooled_k = pool_keys(kv, geom)  # [B, Hk, NKB, D]
    pooled_q = pool_queries(q, geom, heads.q_head, table)  # [slots, G, NQB, D]
    slots, nqb, nkb = len(slot_kv), geom.num_query_blocks, pooled_k.shape[2]
    scores = torch.empty(slots, group, nqb, nkb, device=q.device, dtype=torch.float32)
    qb0 = 0
    for r, sq in enumerate(geom.seq_lens_q_cpu):  # one batched product per request; host ints only, no sync
        n = -(-sq // BLOCK)
        keys = pooled_k[r] if slot_kv == list(range(num_kv)) else pooled_k[r, slot_kv]  # [slots, NKB, D]
        if n == nqb:  # one request: write the scores in place
            torch.matmul(pooled_q.view(slots, group * n, -1), keys.transpose(1, 2),
                         out=scores.view(slots, group * n, nkb))
        else:
            part = pooled_q[:, :, qb0:qb0 + n].reshape(slots, group * n, -1)
            scores[:, :, qb0:qb0 + n] = torch.matmul(part, keys.transpose(1, 2)).view(slots, group, n, nkb)
        qb0 += n
    width = min(heads.budget_max["topk"] + 1, nkb)  # +1: a second diagonal block may ride past the budget
    block_start, block_end, block_count, full_count = select_blocks(
        scores, table, heads.budgets["topk"], geom, num_heads=len(heads.heads), width=width)
    zeros = torch.zeros(nqb, len(heads.heads), 1, dtype=torch.int32, device=q.device)
    return SparseLayout(block_start=block_start, block_end=block_end, block_count=block_count,
                        full_count=full_count, col_index=zeros, col_count=zeros[..., 0].clone())
