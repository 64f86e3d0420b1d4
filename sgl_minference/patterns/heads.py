"""Which query heads a builder works on, with their KV heads and per-head budgets, prepared once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..checks import check
from ..layout import SparseLayout


@dataclass(kw_only=True)
class HeadSet:
    """A group of query heads sharing one pattern type; built at startup, reused by every forward.

    Budgets live on the device *and* as host maxima so builders size their outputs without a host sync. Counts
    (int lists) must be positive and are stored int32; shares and thresholds (float lists) are stored float32.
    """

    heads: list[int]  # query head indices within q's head dimension
    q_head: torch.Tensor  # [Hs] int32: the same indices on the device
    kv_head: torch.Tensor  # [Hs] int32: KV head read by each query head (GQA: head // group)
    # [Hs] int64: q_head for torch's advanced indexing, which converts an int32 index with one more launch per use
    # (index_select takes int32 as it is)
    q_index: torch.Tensor
    budgets: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [Hs] int32 / float32 per head
    budget_max: dict[str, int | float] = field(default_factory=dict)  # name -> host max of that budget

    @classmethod
    def build(cls, heads: list[int], *, num_q_heads: int, num_kv_heads: int, device, **budgets: list[int]):
        """``HeadSet.build([0, 1, 5], num_q_heads=8, num_kv_heads=2, device="cuda", vertical=[...], slash=[...])``."""
        check(len(heads) > 0, "heads", "empty head list")
        check(num_q_heads % num_kv_heads == 0, "num_kv_heads", f"{num_q_heads} query heads not a multiple of {num_kv_heads}")
        check(all(0 <= h < num_q_heads for h in heads), "heads", f"{heads} out of range [0, {num_q_heads})")
        group = num_q_heads // num_kv_heads
        dev = {}
        for name, values in budgets.items():
            check(len(values) == len(heads), name, f"{len(values)} budgets for {len(heads)} heads")
            if all(isinstance(v, float) for v in values):
                check(all(math.isfinite(v) and v >= 0 for v in values), name, f"must be finite and >= 0: {values}")
                dev[name] = torch.tensor(values, dtype=torch.float32, device=device)
                continue
            check(all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values), name,
                  f"budgets must be positive ints (or all floats): {values}")
            dev[name] = torch.tensor(values, dtype=torch.int32, device=device)

        def i32(x):
            return torch.tensor(x, dtype=torch.int32, device=device)

        return cls(heads=list(heads), q_head=i32(heads), kv_head=i32([h // group for h in heads]),
                   q_index=torch.tensor(heads, dtype=torch.int64, device=device), budgets=dev,
                   budget_max={k: max(v) for k, v in budgets.items()})


def concat_heads(parts: list[SparseLayout], heads: list[list[int]], num_heads: int, *,
                 index: list[torch.Tensor] | None = None) -> SparseLayout:
    """Put per-group layouts back at their head positions: one ``SparseLayout`` over ``num_heads`` heads.

    ``parts[i]`` covers the query heads ``heads[i]`` (in that order); capacities are padded to the largest.
    ``index[i]``: the same heads as an int64 tensor on the layouts' device (:attr:`HeadSet.q_index`), so the
    per-layer call copies nothing from the host; made from ``heads`` when not given.
    """
    check(len(parts) == len(heads) and parts, "parts", "one head list per layout needed")
    check(sorted(h for hs in heads for h in hs) == list(range(num_heads)), "heads",
          f"must cover each of the {num_heads} heads exactly once")
    if len(parts) == 1 and heads[0] == list(range(num_heads)):
        return parts[0]
    nqb = parts[0].block_count.shape[0]
    maxb = max(p.block_start.shape[2] for p in parts)
    maxc = max(p.col_index.shape[2] for p in parts)
    dev = parts[0].block_count.device

    def empty(cap):
        return torch.zeros(nqb, num_heads, cap, dtype=torch.int32, device=dev)

    out = SparseLayout(block_start=empty(maxb), block_end=empty(maxb), col_index=empty(maxc),
                       block_count=empty(1)[..., 0], full_count=empty(1)[..., 0], col_count=empty(1)[..., 0])
    if index is None:
        index = [torch.tensor(hs, device=dev) for hs in heads]
    check(len(index) == len(heads) and all(i.shape == (len(hs),) for i, hs in zip(index, heads)), "index",
          "one device index per head list, of its length")
    for p, idx in zip(parts, index):
        nb, nc = p.block_start.shape[2], p.col_index.shape[2]
        out.block_start[:, idx, :nb] = p.block_start
        out.block_end[:, idx, :nb] = p.block_end
        out.col_index[:, idx, :nc] = p.col_index
        out.block_count[:, idx] = p.block_count
        out.full_count[:, idx] = p.full_count
        out.col_count[:, idx] = p.col_count
    return out
