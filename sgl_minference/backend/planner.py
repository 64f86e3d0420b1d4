"""What the ``minference`` backend decides outside the layer loop: head groups per layer, the sparse plan per batch.

* At startup, :func:`layer_heads` groups one layer's (tensor-parallel-local) query heads by pattern type into
  :class:`~sgl_minference.patterns.HeadSet` s, budgets already on the device.
* Once per extend batch, :func:`plan_batch` reads the host lengths SGLang keeps (no device sync) and decides
  whether the batch runs sparse at all. A request is *sparse* when its context reaches ``min_context`` and its
  chunk has at least ``min_chunk`` new tokens. If no request is sparse the dense backend runs the whole batch;
  otherwise the sparse kernel runs every request of the batch, and the requests that are not sparse get exact
  dense layouts (:func:`~sgl_minference.patterns.build_dense`), so their output equals dense attention.
* Per layer, :mod:`.layer_layout` builds the layout from what is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check
from ..config import MInferenceConfig
from ..layout import BLOCK, BatchGeometry, KVSource, SparseLayout, check_tensor, pool_run_starts
from ..patterns import HeadSet, build_dense
from ..registry import group_key, head_budgets


@dataclass(kw_only=True)
class HeadGroup:
    """The query heads of one layer that share a pattern type (and its ``group_by`` fields, see the registry)."""

    kind: str  # a key of registry.PATTERNS
    heads: HeadSet  # local query heads (indices into q's head dimension) with their budgets


@dataclass(kw_only=True)
class LayerHeads:
    """One layer's query heads on this rank, grouped by pattern type (built once at startup)."""

    layer_id: int
    num_q_heads: int  # query heads on this rank (SGLang's ``layer.tp_q_head_num``)
    groups: list[HeadGroup]  # together they cover local heads 0 .. num_q_heads-1 exactly once

    @property
    def all_dense(self) -> bool:
        """Every head is ``dense``: the layer never needs the sparse kernel."""
        return all(g.kind == "dense" for g in self.groups)


def layer_heads(config: MInferenceConfig, *, layer_id: int, head_start: int, num_q_heads: int, num_kv_heads: int,
                device) -> LayerHeads:
    """Group query heads ``head_start .. head_start + num_q_heads - 1`` (global numbers) of ``layer_id``.

    ``head_start`` is ``attn_tp_rank * num_q_heads`` under tensor parallelism; the groups hold local indices.
    """
    specs = config.layer_specs(layer_id, head_start, num_q_heads)
    members: dict[tuple, list[int]] = {}
    for local, spec in enumerate(specs):
        members.setdefault(group_key(spec), []).append(local)
    shape = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, device=device)
    groups = []
    for key, heads in members.items():
        budgets = head_budgets([specs[h] for h in heads])
        groups.append(HeadGroup(kind=key[0], heads=HeadSet.build(heads, **shape, **budgets)))
    return LayerHeads(layer_id=layer_id, num_q_heads=num_q_heads, groups=groups)


@dataclass(kw_only=True)
class SparsePlan:
    """Per-batch metadata of a batch that runs through the sparse kernel, shared by every layer."""

    geom: BatchGeometry  # all B requests of the batch
    req_to_token: torch.Tensor  # [pool_size, max_context] int32: SGLang's token slots per request
    req_pool_indices: torch.Tensor  # [B] int64/int32: each request's row of req_to_token
    run_start: torch.Tensor  # [B] int32: slot of key 0 of a request whose slots are consecutive, else -1
    sparse_requests: list[bool]  # B host flags: the request passed both gates (others run dense layouts)
    dense_blocks: torch.Tensor | None  # [NQB_dense] int64: the non-sparse requests' query blocks in geom
    dense_layout: SparseLayout | None  # [NQB_dense, Hq, ...]: their exact dense layout, the same in every layer

    def kv_source(self, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> KVSource:
        """The paged KV source of one layer: ``k_buffer``/``v_buffer`` are the pool's ``[slots, Hk, D]``."""
        return KVSource(k=k_buffer, v=v_buffer, req_to_token=self.req_to_token,
                        req_pool_indices=self.req_pool_indices, run_start=self.run_start)


def sparse_requests(config: MInferenceConfig, seq_lens_q: list[int], seq_lens_k: list[int]) -> list[bool]:
    """Which requests pass the gates: context ``>= min_context`` and chunk ``>= min_chunk`` new tokens."""
    return [sk >= config.min_context and sq >= config.min_chunk for sq, sk in zip(seq_lens_q, seq_lens_k)]


def plan_batch(config: MInferenceConfig, *, seq_lens_q: list[int], seq_lens_k: list[int], req_to_token: torch.Tensor,
               req_pool_indices: torch.Tensor, all_heads: HeadSet) -> SparsePlan | None:
    """The sparse plan of an extend batch, or None when no request is sparse (the dense backend runs it).

    ``seq_lens_q``: B chunk lengths (SGLang's ``extend_seq_lens_cpu``); ``seq_lens_k``: B context lengths
    (``seq_lens_cpu``, prefix + chunk); host lists, so planning never waits for the device.
    ``req_to_token``: ``[pool_size, max_context]`` int32; ``req_pool_indices``: ``[B]`` on the same device;
    ``all_heads``: every query head on this rank (the dense layout of the non-sparse requests covers them all).
    """
    check(len(seq_lens_q) == len(seq_lens_k), "seq_lens_q", f"{len(seq_lens_q)} chunks for {len(seq_lens_k)} contexts")
    check_tensor(req_to_token, "req_to_token", ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor(req_pool_indices, "req_pool_indices", ndim=1, dtypes=(torch.int32, torch.int64))
    check(req_pool_indices.shape[0] == len(seq_lens_q), "req_pool_indices",
          f"{req_pool_indices.shape[0]} entries for {len(seq_lens_q)} requests")
    flags = sparse_requests(config, seq_lens_q, seq_lens_k)
    if not any(flags):
        return None
    device = req_to_token.device
    geom = BatchGeometry.build(seq_lens_q, seq_lens_k, device)
    dense = [r for r, sparse in enumerate(flags) if not sparse]
    dense_blocks = dense_layout = None
    if dense:
        dense_geom = BatchGeometry.build([seq_lens_q[r] for r in dense], [seq_lens_k[r] for r in dense], device)
        dense_layout = build_dense(dense_geom, all_heads)
        first_block = [0]
        for sq in seq_lens_q:
            first_block.append(first_block[-1] + -(-sq // BLOCK))
        blocks = [b for r in dense for b in range(first_block[r], first_block[r + 1])]
        dense_blocks = torch.tensor(blocks, dtype=torch.int64, device=device)
    return SparsePlan(geom=geom, req_to_token=req_to_token, req_pool_indices=req_pool_indices,
                      run_start=pool_run_starts(req_to_token, req_pool_indices, geom), sparse_requests=flags,
                      dense_blocks=dense_blocks, dense_layout=dense_layout)
