"""Block-level selection shared by the adaptive patterns (XAttention, FlexPrefill): which 64x64 key blocks are
candidates for each query block, keeping entries by cumulative mass, and the block layout.

Key blocks are aligned to absolute positions (``[64 b, 64 b + 64)``). For a query block whose first row sits at
position ``r0`` and last valid row at ``p_last`` (bottom-right causal: the chunk's queries are the last ``Sq``
positions), a key block is a *candidate* when it holds a causal key of the last row (``64 b <= p_last``) and a
*diagonal* block when it holds the block's own diagonal (``r0 // 64 <= b <= p_last // 64``: one or two blocks,
two when the prefix is not a multiple of 64). All on the device, sized by host bounds (no sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import BLOCK, SENTINEL, BatchGeometry, SparseLayout


@dataclass(frozen=True)
class BlockGrid:
    """The (query block, key block) geometry of a batch for ``NKB`` key blocks, built once per batch (:func:`grid`).

    Shapes ``[NQB, 1, ...]`` broadcast over heads; ``NQB = geom.num_query_blocks``.
    """

    r0: torch.Tensor  # [NQB, 1, 1] int32: position of each query block's first row
    p_last: torch.Tensor  # [NQB, 1, 1] int32: position of its last valid row
    candidate: torch.Tensor  # [NQB, 1, NKB] bool: key blocks holding a causal key of the last row
    not_candidate: torch.Tensor  # [NQB, 1, NKB] bool: ~candidate (a masked_fill mask)
    diagonal: torch.Tensor  # [NQB, 1, NKB] bool: key blocks holding the block's own diagonal
    start: torch.Tensor  # [1, 1, NKB] int32: 64 b
    end: torch.Tensor  # [NQB, 1, NKB] int32: min(64 b + 64, Sk_r)
    full: torch.Tensor  # [NQB, 1, NKB] bool: the range [start, end) is 64 keys at or left of r0 (no mask needed)
    rank: torch.Tensor  # [NQB, 1, NKB] int64: layout order of a kept block (full ones first, each ascending)
    lanes: torch.Tensor  # [NKB] int64: 0 .. NKB-1
    qb_request: torch.Tensor  # [NQB] int64: geom.qb_request, as an index


def _grid(geom: BatchGeometry, num_key_blocks: int) -> BlockGrid:
    req = geom.qb_request.long()
    r0 = (geom.prefix_lens[req] + geom.qb_row).view(-1, 1, 1)
    sq = (geom.cu_seqlens_q[req + 1] - geom.cu_seqlens_q[req]).view(-1, 1, 1)
    p_last = r0 + torch.clamp(sq - geom.qb_row.view(-1, 1, 1), max=BLOCK) - 1
    kb = torch.arange(num_key_blocks, device=r0.device, dtype=torch.int32).view(1, 1, -1)
    candidate = kb * BLOCK <= p_last
    start = kb * BLOCK
    end = torch.minimum(start + BLOCK, geom.seq_lens_k[req].view(-1, 1, 1))
    full = (end - start == BLOCK) & (end - 1 <= r0)
    return BlockGrid(r0=r0, p_last=p_last, candidate=candidate, not_candidate=~candidate,
                     diagonal=(kb >= r0 // BLOCK) & (kb <= p_last // BLOCK), start=start, end=end, full=full,
                     rank=torch.where(full, 0, num_key_blocks) + kb, lanes=kb.view(-1).long(), qb_request=req)


def grid(geom: BatchGeometry, num_key_blocks: int) -> BlockGrid:
    """The batch's :class:`BlockGrid` over ``num_key_blocks`` key blocks (built on first use, then shared)."""
    return geom.derived(("grid", num_key_blocks), lambda: _grid(geom, num_key_blocks))


def block_candidates(geom: BatchGeometry, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(candidate, diagonal)`` masks, each ``[NQB, 1, num_key_blocks]`` bool (see the module docstring; shared
    by every layer of the batch: not to be modified)."""
    g = grid(geom, num_key_blocks)
    return g.candidate, g.diagonal


def keep_ranked(mass: torch.Tensor, prio: torch.Tensor, share: torch.Tensor, *, forced: bool = False,
                lanes: torch.Tensor | None = None, min_lanes: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`keep_by_mass` from a precomputed priority; returns ``[..., N]`` bool.

    ``prio [..., N]`` float32: ``-1`` on invalid entries, ``2 + mass`` on forced ones (when ``forced``), else
    ``mass``. The entries ranked ``i`` with ``lanes[i] < min_lanes`` (per row) are kept too: ``lanes`` ``[N]`` int64
    ascending, ``min_lanes`` broadcastable to ``mass[..., 0]`` (``lanes = arange(N)``, ``min_lanes = min_count``
    is :func:`keep_by_mass`'s minimum count; a scaled ``lanes`` saves a division of the budget).
    """
    prio, order = prio.sort(dim=-1, descending=True)
    ok = prio >= 0
    m = torch.where(ok, mass.gather(-1, order), 0.0)
    keep = m.cumsum(-1).sub_(m) < share.unsqueeze(-1)  # mass of the entries ranked above
    if forced:
        keep |= prio >= 2.0
    if min_lanes is not None:
        keep |= lanes < min_lanes.unsqueeze(-1)
    keep &= ok
    return torch.empty_like(keep).scatter_(-1, order, keep)  # order is a permutation: every entry written


def keep_by_mass(mass: torch.Tensor, valid: torch.Tensor, share: torch.Tensor, *, forced: torch.Tensor | None = None,
                 min_count: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``mass``, the smallest set of valid entries, largest first, whose mass reaches ``share``.

    Forced entries come first (their mass counts towards the share); at least ``min_count`` entries are kept
    (as many as are valid). Broadcasting: ``mass [..., N]`` float32 (non-negative, normalised over the valid
    entries), ``valid`` / ``forced`` bool broadcastable to it, ``share`` / ``min_count`` float / int tensors
    broadcastable to ``mass[..., 0]`` (one per row). Returns ``[..., N]`` bool.
    """
    if forced is None:
        prio = torch.where(valid, mass, -1.0)
    else:
        prio = torch.where(valid, mass + 2.0 * forced, -1.0)  # forced: above any mass share (<= 1)
    lanes = None if min_count is None else torch.arange(mass.shape[-1], device=mass.device)
    return keep_ranked(mass, prio, share, forced=forced is not None, lanes=lanes, min_lanes=min_count)


def block_ranges(keep: torch.Tensor, geom: BatchGeometry) -> tuple[torch.Tensor, ...]:
    """``(block_start, block_end, block_count, full_count)`` of the kept key blocks, ``keep [NQB, H, NKB]`` bool:
    ``[NQB, H, NKB]`` and ``[NQB, H]`` int32 (:func:`layout_from_blocks`)."""
    nqb, h, nkb = keep.shape
    g = grid(geom, nkb)
    order = torch.where(keep, g.rank, 2 * nkb).argsort(dim=-1)
    return (g.start.expand(nqb, h, -1).gather(-1, order), g.end.expand(nqb, h, -1).gather(-1, order),
            keep.sum(-1, dtype=torch.int32), (keep & g.full).sum(-1, dtype=torch.int32))


def layout_from_blocks(keep: torch.Tensor, geom: BatchGeometry) -> SparseLayout:
    """The layout visiting the kept key blocks: ``keep [NQB, H, NKB]`` bool -> ``SparseLayout`` with ``MAXB = NKB``.

    Each kept block is the range ``[64 b, min(64 b + 64, Sk_r))``; full ranges (entirely left of the block's first
    row) first, partial ones after, each ascending. Kept blocks must be candidates (``block_candidates``).
    """
    nqb, h, _ = keep.shape
    block_start, block_end, block_count, full_count = block_ranges(keep, geom)
    none = torch.full((nqb, h, 1), SENTINEL, dtype=torch.int32, device=keep.device)
    return SparseLayout(block_start=block_start, block_end=block_end, block_count=block_count,
                        full_count=full_count, col_index=none, col_count=torch.zeros_like(block_count))


def row_span(start: torch.Tensor, end: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """The packed rows ``start[i] .. start[i] + width - 1`` cut at ``end[i]`` (``start``, ``end`` ``[N]`` int32), as
    :func:`mean_rows` reads them: ``(tok [N, width, 1]`` int64, 0 where cut; ``valid [N, width, 1, 1]`` bool;
    ``count [N, 1, 1]`` int64)."""
    tok = start.view(-1, 1) + torch.arange(width, device=start.device, dtype=torch.int32)
    valid = tok < end.view(-1, 1)
    return torch.where(valid, tok, 0).long().unsqueeze(-1), valid.view(*valid.shape, 1, 1), valid.sum(1).view(-1, 1, 1)


def mean_rows(q: torch.Tensor, span: tuple[torch.Tensor, ...], q_head: torch.Tensor) -> torch.Tensor:
    """Mean over each :func:`row_span` entry's valid rows of ``q [T, Hq, D]``, heads ``q_head [Hs]`` int64:
    ``[N, Hs, D]`` float32."""
    tok, valid, count = span
    rows = q[tok, q_head].float()  # [N, width, Hs, D]: one gather of the rows and heads
    return (rows * valid).sum(1) / count


def pooled_query_blocks(q: torch.Tensor, geom: BatchGeometry, q_head: torch.Tensor) -> torch.Tensor:
    """Mean of each query block's valid rows: ``[NQB, Hs, D]`` float32 (padding rows excluded).

    q: ``[T, Hq, D]`` packed by ``geom.cu_seqlens_q``; q_head: ``[Hs]`` int64 heads to pool (``HeadSet.q_index``).
    """
    req = geom.qb_request.long()
    span = geom.derived(("pool_rows",), lambda: row_span(geom.cu_seqlens_q[req] + geom.qb_row,
                                                         geom.cu_seqlens_q[req + 1], BLOCK))
    return mean_rows(q, span, q_head)


def pad_last(t: torch.Tensor, size: int, value: int = 0) -> torch.Tensor:
    """``t`` padded with ``value`` along its last dimension to ``size`` entries."""
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]), value=value)


def select_heads(pick: torch.Tensor, a: SparseLayout, b: SparseLayout) -> SparseLayout:
    """Per (query block, head), layout ``a`` where ``pick [NQB, H]`` is true, else ``b``.

    ``b`` is consumed: its tensors are overwritten in place and returned (one launch per field, no copies), padded
    first only where ``a`` holds more ranges or columns; entries past ``a``'s capacities keep ``b``'s values,
    past the picked heads' counts, where kernels never read.
    """
    maxb = max(a.block_start.shape[2], b.block_start.shape[2])
    maxc = max(a.col_index.shape[2], b.col_index.shape[2])
    out = SparseLayout(block_start=pad_last(b.block_start, maxb), block_end=pad_last(b.block_end, maxb),
                       block_count=b.block_count, full_count=b.full_count,
                       col_index=pad_last(b.col_index, maxc, SENTINEL), col_count=b.col_count)
    p3 = pick.unsqueeze(-1)
    for name, src in (("block_start", a.block_start), ("block_end", a.block_end), ("col_index", a.col_index)):
        part = getattr(out, name)[..., :src.shape[2]]
        torch.where(p3, src, part, out=part)
    for name in ("block_count", "full_count", "col_count"):
        torch.where(pick, getattr(a, name), getattr(out, name), out=getattr(out, name))
    return out
