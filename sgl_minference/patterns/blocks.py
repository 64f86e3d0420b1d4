"""Block-level selection shared by the adaptive patterns (XAttention, FlexPrefill): which 64x64 key blocks are
candidates for each query block, keeping entries by cumulative mass, and the block layout.

Key blocks are aligned to absolute positions (``[64 b, 64 b + 64)``). For a query block whose first row sits at
position ``r0`` and last valid row at ``p_last`` (bottom-right causal: the chunk's queries are the last ``Sq``
positions), a key block is a *candidate* when it holds a causal key of the last row (``64 b <= p_last``) and a
*diagonal* block when it holds the block's own diagonal (``r0 // 64 <= b <= p_last // 64``: one or two blocks,
two when the prefix is not a multiple of 64). All on the device, sized by host bounds (no sync).
"""

from __future__ import annotations

import torch

from ..layout import BLOCK, SENTINEL, BatchGeometry, SparseLayout


def block_rows(geom: BatchGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r0, p_last)``, each ``[NQB, 1, 1]`` int32: first and last valid row position of every query block."""
    req = geom.qb_request.long()
    r0 = (geom.prefix_lens[req] + geom.qb_row).view(-1, 1, 1)
    sq = (geom.cu_seqlens_q[req + 1] - geom.cu_seqlens_q[req]).view(-1, 1, 1)
    p_last = r0 + torch.clamp(sq - geom.qb_row.view(-1, 1, 1), max=BLOCK) - 1
    return r0, p_last


def block_candidates(geom: BatchGeometry, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(candidate, diagonal)`` masks, each ``[NQB, 1, num_key_blocks]`` bool (see the module docstring)."""
    r0, p_last = block_rows(geom)
    kb = torch.arange(num_key_blocks, device=r0.device, dtype=torch.int32).view(1, 1, -1)
    return kb * BLOCK <= p_last, (kb >= r0 // BLOCK) & (kb <= p_last // BLOCK)


def keep_by_mass(mass: torch.Tensor, valid: torch.Tensor, share: torch.Tensor, *, forced: torch.Tensor | None = None,
                 min_count: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``mass``, the smallest set of valid entries, largest first, whose mass reaches ``share``.

    Forced entries come first (their mass counts towards the share); at least ``min_count`` entries are kept
    (as many as are valid). Broadcasting: ``mass [..., N]`` float32 (non-negative, normalised over the valid
    entries), ``valid`` / ``forced`` bool broadcastable to it, ``share`` / ``min_count`` float / int tensors
    broadcastable to ``mass[..., 0]`` (one per row). Returns ``[..., N]`` bool.
    """
    valid = valid.expand_as(mass)
    prio = torch.where(valid, mass, -1.0)
    if forced is not None:
        prio = torch.where(forced & valid, 2.0 + mass, prio)  # above any mass share (<= 1)
    prio, order = prio.sort(dim=-1, descending=True)
    m = torch.where(prio >= 0, mass.gather(-1, order), 0.0)
    before = m.cumsum(-1) - m  # mass of the entries ranked above
    keep = before < share.unsqueeze(-1)
    if forced is not None:
        keep |= prio >= 2.0
    if min_count is not None:
        keep |= torch.arange(mass.shape[-1], device=mass.device) < min_count.unsqueeze(-1)
    keep &= prio >= 0
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def layout_from_blocks(keep: torch.Tensor, geom: BatchGeometry) -> SparseLayout:
    """The layout visiting the kept key blocks: ``keep [NQB, H, NKB]`` bool -> ``SparseLayout`` with ``MAXB = NKB``.

    Each kept block is the range ``[64 b, min(64 b + 64, Sk_r))``; full ranges (entirely left of the block's first
    row) first, partial ones after, each ascending. Kept blocks must be candidates (``block_candidates``).
    """
    nqb, h, nkb = keep.shape
    dev = keep.device
    r0, _ = block_rows(geom)
    kb = torch.arange(nkb, device=dev, dtype=torch.int32).view(1, 1, -1)
    start = (kb * BLOCK).expand(nqb, h, -1)
    end = torch.minimum(start + BLOCK, geom.seq_lens_k[geom.qb_request.long()].view(-1, 1, 1))
    full = keep & (end - start == BLOCK) & (end - 1 <= r0)
    order = torch.where(keep, torch.where(full, 0, nkb) + kb, 2 * nkb).argsort(dim=-1)
    none = torch.full((nqb, h, 1), SENTINEL, dtype=torch.int32, device=dev)
    return SparseLayout(block_start=start.gather(-1, order), block_end=end.gather(-1, order),
                        block_count=keep.sum(-1, dtype=torch.int32), full_count=full.sum(-1, dtype=torch.int32),
                        col_index=none, col_count=torch.zeros(nqb, h, dtype=torch.int32, device=dev))


def pooled_query_blocks(q: torch.Tensor, geom: BatchGeometry, q_head: torch.Tensor) -> torch.Tensor:
    """Mean of each query block's valid rows: ``[NQB, Hs, D]`` float32 (padding rows excluded).

    q: ``[T, Hq, D]`` packed by ``geom.cu_seqlens_q``; q_head: ``[Hs]`` int32 heads to pool.
    """
    start = geom.cu_seqlens_q[geom.qb_request.long()] + geom.qb_row
    end = geom.cu_seqlens_q[geom.qb_request.long() + 1]
    tok = start.view(-1, 1) + torch.arange(BLOCK, device=q.device, dtype=torch.int32)
    valid = tok < end.view(-1, 1)
    rows = q[torch.where(valid, tok, 0).long()][:, :, q_head.long()].float()  # [NQB, 64, Hs, D]
    return (rows * valid.view(*valid.shape, 1, 1)).sum(1) / valid.sum(1).view(-1, 1, 1)


def pad_last(t: torch.Tensor, size: int, value: int = 0) -> torch.Tensor:
    """``t`` padded with ``value`` along its last dimension to ``size`` entries."""
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]), value=value)


def select_heads(pick: torch.Tensor, a: SparseLayout, b: SparseLayout) -> SparseLayout:
    """Per (query block, head), layout ``a`` where ``pick [NQB, H]`` is true, else ``b`` (capacities padded)."""
    maxb = max(a.block_start.shape[2], b.block_start.shape[2])
    maxc = max(a.col_index.shape[2], b.col_index.shape[2])
    p3 = pick.unsqueeze(-1)

    def ranges(name):
        return torch.where(p3, pad_last(getattr(a, name), maxb), pad_last(getattr(b, name), maxb))

    return SparseLayout(block_start=ranges("block_start"), block_end=ranges("block_end"),
                        block_count=torch.where(pick, a.block_count, b.block_count),
                        full_count=torch.where(pick, a.full_count, b.full_count),
                        col_index=torch.where(p3, pad_last(a.col_index, maxc, SENTINEL),
                                              pad_last(b.col_index, maxc, SENTINEL)),
                        col_count=torch.where(pick, a.col_count, b.col_count))
