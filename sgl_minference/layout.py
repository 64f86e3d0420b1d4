"""The one index structure every sparse pattern emits and every kernel reads.

Like FlexAttention's ``BlockMask``, a :class:`SparseLayout` says, for each (64-row query block, query head),
which keys to visit: a list of key *ranges* (each at most 64 keys wide) plus a list of individually
gathered key *columns*. Ranges come first as "full" ranges (no mask needed at all) and then "partial"
ranges (which need the causal / bounds / range-end mask). Kernels never see pattern names.

Geometry of a batch (:class:`BatchGeometry`): several requests, each with a chunk of ``Sq_r`` new queries
at the *last* ``Sq_r`` positions of a context of ``Sk_r = prefix_r + Sq_r`` keys (bottom-right causal).
All key positions in a layout are request-local absolute positions ``0 <= j < Sk_r``.
Query row ``i`` of request ``r`` (chunk row, position ``p = prefix_r + i``) in query block ``qb`` and head
``h`` attends exactly the keys ``j`` with ``0 <= j <= p`` and ``j`` in
``union_b [block_start[qb,h,b], block_end[qb,h,b]) for b < block_count[qb,h]``
``union {col_index[qb,h,c] for c < col_count[qb,h]}``.
Invariants kept by every builder: ranges are disjoint and non-empty with ``end - start <= 64``; columns
are unique, ascending, ``< Sk_r`` and lie in no range; entries ``[0, full_count)`` are full ranges
(``end - start == 64``, ``start >= 0`` and ``end - 1 <=`` the position of the block's first row), the rest
are partial; each group is ascending.

Validation: every kernel wrapper checks its arguments up front with host metadata only (shapes, dtypes,
devices, and the row bounds the host lengths imply), so a bad call raises a ``ValueError`` naming the tensor
and nothing syncs. What only the device knows (pool indices, slot table entries, layout entries) is checked
too in *checked mode*: set ``SGL_MINFERENCE_CHECKED=1`` (read once, at import) to validate every index before
every launch, with device syncs; an out-of-range index then raises instead of reading out of bounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .checks import check

BLOCK = 64  # rows per query block and keys per range; the kernels' BLOCK_M / BLOCK_N
# "No entry" in column lists (padding after a head's columns): right of every key position, and a block's first
# row position + SENTINEL still fits int32. registry.MAX_BUDGET is the same number (that module has no torch).
SENTINEL = 1 << 29
CHECKED_ENV = "SGL_MINFERENCE_CHECKED"


def env_flag(value: str | None) -> bool:
    """An environment switch: ``1``, ``true``, ``yes`` or ``on`` (any case) turn it on."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


# Checked mode (see the module docstring): a debugging aid, each check costs a device sync per kernel call.
CHECKED = env_flag(os.environ.get(CHECKED_ENV))


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=None, device=None) -> None:
    """Validate one tensor argument up front (rank, dtype, device); raises ``ValueError`` naming it."""
    check(isinstance(t, torch.Tensor), name, f"expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        check(t.dim() == ndim, name, f"expected {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        check(t.dtype in dtypes, name, f"dtype {t.dtype} not in {tuple(dtypes)}")
    if device is not None:
        check(t.device.type == torch.device(device).type, name, f"on {t.device}, expected {device}")


def _require(bad: torch.Tensor, name: str, describe) -> None:
    """Checked mode: raise a ``ValueError`` naming ``name`` at the first true entry of the bool tensor ``bad``
    (``describe(*index)`` says what is wrong there). One device sync."""
    hit = bad.nonzero()
    if hit.shape[0]:
        raise ValueError(f"{name}: {describe(*hit[0].tolist())}")


@dataclass(kw_only=True)
class BatchGeometry:
    """Per-batch shape metadata, built once per forward batch (plan), shared by every layer.

    Device tensors are int32 on the queries' device; host lists are the same numbers, known at plan time
    (SGLang has them as ``extend_seq_lens_cpu`` / ``seq_lens_cpu``), so nothing here syncs per layer.
    """

    cu_seqlens_q: torch.Tensor  # [B+1] int32: packed query offsets (q is [T, Hq, D], T = cu_seqlens_q[-1])
    seq_lens_k: torch.Tensor  # [B] int32: keys per request, prefix + chunk
    prefix_lens: torch.Tensor  # [B] int32: seq_lens_k - chunk length
    qb_request: torch.Tensor  # [NQB] int32: request of each query block
    qb_row: torch.Tensor  # [NQB] int32: first chunk row of each query block (a multiple of 64)
    seq_lens_q_cpu: list[int]  # B chunk lengths
    seq_lens_k_cpu: list[int]  # B context lengths
    # tensors derived from the geometry alone, made by the first layer that needs them (:meth:`derived`)
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key`` and kept on this batch: tensors that depend only on the geometry
        (and the host constants in ``key``), which every layer's index build would otherwise remake with a dozen
        launches. The geometry lives for one forward batch, so nothing outlives it; the results are shared by
        every layer: callers must not modify them."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_q_cpu)

    @property
    def num_query_blocks(self) -> int:
        return int(self.qb_request.shape[0])

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens_q_cpu)

    @property
    def max_seqlen_k(self) -> int:
        return max(self.seq_lens_k_cpu)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.seq_lens_q_cpu)

    def validate(self, device: torch.device) -> None:
        """Host checks (no sync): each tensor int32, 1-D, on ``device`` and sized by the host lists; in checked mode
        also that the tensors hold the numbers the host lists give (one sync)."""
        B = self.num_requests
        check(B > 0 and len(self.seq_lens_k_cpu) == B, "seq_lens_k_cpu",
              f"{len(self.seq_lens_k_cpu)} context lengths for {B} chunk lengths")
        nqb = sum(-(-sq // BLOCK) for sq in self.seq_lens_q_cpu)
        sizes = {"cu_seqlens_q": B + 1, "seq_lens_k": B, "prefix_lens": B, "qb_request": nqb, "qb_row": nqb}
        for name, size in sizes.items():
            t = getattr(self, name)
            check_tensor(t, name, ndim=1, dtypes=(torch.int32,))
            check(t.device == device, name, f"on {t.device}, the keys on {device}")
            check(t.shape[0] == size, name, f"{t.shape[0]} entries, the host lengths give {size}")
        if CHECKED:
            host = BatchGeometry.build(self.seq_lens_q_cpu, self.seq_lens_k_cpu, "cpu")
            for name in sizes:
                check(torch.equal(getattr(self, name).cpu(), getattr(host, name)), name,
                      "disagrees with the host lengths seq_lens_q_cpu / seq_lens_k_cpu")

    @classmethod
    def build(cls, seq_lens_q: list[int], seq_lens_k: list[int], device) -> "BatchGeometry":
        """Build from host lengths: ``seq_lens_q[r]`` new queries against ``seq_lens_k[r]`` keys."""
        check(len(seq_lens_q) == len(seq_lens_k) and len(seq_lens_q) > 0, "seq_lens_q",
              f"need one chunk length per request ({len(seq_lens_q)} vs {len(seq_lens_k)} context lengths)")
        for r, (sq, sk) in enumerate(zip(seq_lens_q, seq_lens_k)):
            check(0 < sq <= sk, "seq_lens_q", f"request {r}: chunk length {sq} must be in [1, {sk}]")
        qb_request, qb_row = [], []
        for r, sq in enumerate(seq_lens_q):
            n = -(-sq // BLOCK)
            qb_request += [r] * n
            qb_row += [BLOCK * b for b in range(n)]
        cu = [0]
        for sq in seq_lens_q:
            cu.append(cu[-1] + sq)

        def i32(x):
            return torch.tensor(x, dtype=torch.int32, device=device)

        return cls(
            cu_seqlens_q=i32(cu),
            seq_lens_k=i32(list(seq_lens_k)),
            prefix_lens=i32([sk - sq for sq, sk in zip(seq_lens_q, seq_lens_k)]),
            qb_request=i32(qb_request),
            qb_row=i32(qb_row),
            seq_lens_q_cpu=list(seq_lens_q),
            seq_lens_k_cpu=list(seq_lens_k),
        )


@dataclass(kw_only=True)
class KVSource:
    """Where the kernels read keys and values of request ``r``'s key position ``j``.

    Contiguous: row ``kv_start[r] + j`` of ``k``/``v``. Paged (SGLang's pool, page size 1): row
    ``req_to_token[req_pool_indices[r], j]``, so a cached prefix is read in place, never copied. A paged source
    may carry ``run_start`` (:func:`pool_run_starts`): for a request whose slots are consecutive in the pool
    (``req_to_token[req_pool_indices[r], j] == run_start[r] + j`` for every ``j < Sk_r``), the kernel reads it by
    row arithmetic as in the contiguous case, without the per-key table lookup.
    """

    k: torch.Tensor  # [rows, Hk, D] fp16/bf16 (a packed tensor, or SGLang's k_buffer)
    v: torch.Tensor  # [rows, Hk, D] same dtype and shape as k
    kv_start: torch.Tensor | None = None  # [B] int32: first row of each request (contiguous mode)
    kv_start_cpu: list[int] | None = None  # the same starts on the host, where known: row bounds checked, no sync
    req_to_token: torch.Tensor | None = None  # [pool_size, max_context] int32 (paged mode)
    req_pool_indices: torch.Tensor | None = None  # [B] int32/int64 (paged mode)
    run_start: torch.Tensor | None = None  # [B] int32 (paged mode, optional): slot of key 0 where consecutive, else -1

    @property
    def paged(self) -> bool:
        return self.req_to_token is not None

    def validate(self, geom: BatchGeometry) -> None:
        """Check this source before a kernel reads it for ``geom``'s requests; ``ValueError`` names the tensor.

        Always, from host metadata (no sync): ranks, dtypes (``v``'s and the index tables'; which K dtypes a kernel
        reads is the kernel's check, ``kernels.sparse_attention.check_kv``), devices (everything on ``k``'s), one
        entry per request, and the bounds the host lengths imply: paged, ``req_to_token`` holds ``max Sk`` slots
        per row; contiguous, request ``r``'s rows ``[kv_start_cpu[r], kv_start_cpu[r] + Sk_r)`` lie in ``k``
        (without host starts: ``max Sk <= rows``). In checked mode also the index contents (:meth:`check_contents`).
        """
        check_tensor(self.k, "k", ndim=3)
        check_tensor(self.v, "v", ndim=3, dtypes=(self.k.dtype,))
        check(self.v.shape == self.k.shape, "v", f"shape {tuple(self.v.shape)} != k {tuple(self.k.shape)}")
        device = self.k.device
        check(self.v.device == device, "v", f"on {self.v.device}, k on {device}")
        geom.validate(device)
        B, rows, max_sk = geom.num_requests, self.k.shape[0], geom.max_seqlen_k
        if self.paged:
            check_tensor(self.req_to_token, "req_to_token", ndim=2, dtypes=(torch.int32, torch.int64))
            check_tensor(self.req_pool_indices, "req_pool_indices", ndim=1, dtypes=(torch.int32, torch.int64))
            for name in ("req_to_token", "req_pool_indices"):
                t = getattr(self, name)
                check(t.device == device, name, f"on {t.device}, k on {device}")
            check(self.req_pool_indices.shape[0] == B, "req_pool_indices",
                  f"{self.req_pool_indices.shape[0]} entries for {B} requests")
            check(self.req_to_token.shape[1] >= max_sk, "req_to_token",
                  f"{self.req_to_token.shape[1]} slots per request, but a request has {max_sk} keys")
            if self.run_start is not None:
                check_tensor(self.run_start, "run_start", ndim=1, dtypes=(torch.int32,), device=device)
                check(self.run_start.shape[0] == B, "run_start", f"{self.run_start.shape[0]} entries for {B} requests")
        else:
            check(self.run_start is None, "run_start", "only a paged source has pool runs")
            check_tensor(self.kv_start, "kv_start", ndim=1, dtypes=(torch.int32, torch.int64))
            check(self.kv_start.device == device, "kv_start", f"on {self.kv_start.device}, k on {device}")
            check(self.kv_start.shape[0] == B, "kv_start", f"{self.kv_start.shape[0]} entries for {B} requests")
            if self.kv_start_cpu is None:
                check(max_sk <= rows, "k", f"{rows} rows, but a request has {max_sk} keys")
            else:
                check(len(self.kv_start_cpu) == B, "kv_start_cpu", f"{len(self.kv_start_cpu)} entries for {B} requests")
                for r, (start, sk) in enumerate(zip(self.kv_start_cpu, geom.seq_lens_k_cpu)):
                    check(0 <= start and start + sk <= rows, "k",
                          f"{rows} rows, but request {r} reads rows [{start}, {start + sk})")
        if CHECKED:
            self.check_contents(geom)

    def check_contents(self, geom: BatchGeometry) -> None:
        """Checked mode: every key position ``j < Sk_r`` of every request maps to a row of ``k``/``v``, through
        in-range pool indices and slots (paged) or starts (contiguous). Syncs with the device."""
        rows, sk = self.k.shape[0], geom.seq_lens_k.long()
        if self.paged:
            pool, idx = self.req_to_token.shape[0], self.req_pool_indices.long()
            _require((idx < 0) | (idx >= pool), "req_pool_indices",
                     lambda r: f"request {r}: pool row {int(idx[r])} outside the {pool} rows of req_to_token")
            slots = self.req_to_token[idx, :geom.max_seqlen_k]
            used = torch.arange(slots.shape[1], device=slots.device) < sk.view(-1, 1)
            _require(used & ((slots < 0) | (slots >= rows)), "req_to_token",
                     lambda r, j: f"request {r} (pool row {int(idx[r])}), key {j}: slot {int(slots[r, j])} outside "
                                  f"the {rows} rows of k")
            if self.run_start is not None:
                run = self.run_start.long().view(-1, 1)
                j = torch.arange(slots.shape[1], device=slots.device)
                _require((run >= 0) & used & (slots != run + j), "run_start",
                         lambda r, j: f"request {r}: run from slot {int(run[r])} but key {j} is at slot "
                                      f"{int(slots[r, j])}")
        else:
            start = self.kv_start.long()
            _require((start < 0) | (start + sk > rows), "kv_start",
                     lambda r: f"request {r} reads rows [{int(start[r])}, {int(start[r] + sk[r])}), k has {rows}")
            if self.kv_start_cpu is not None:
                check(self.kv_start.tolist() == list(self.kv_start_cpu), "kv_start", "disagrees with kv_start_cpu")

    @classmethod
    def packed(cls, k: torch.Tensor, v: torch.Tensor, seq_lens_k: list[int]) -> "KVSource":
        """Contiguous source for ``k``/``v`` packed request after request (``[sum Sk_r, Hk, D]``)."""
        starts = [0]
        for sk in seq_lens_k[:-1]:
            starts.append(starts[-1] + sk)
        return cls(k=k, v=v, kv_start=torch.tensor(starts, dtype=torch.int32, device=k.device), kv_start_cpu=starts)

    def gather(self, r: int, seq_len_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Request ``r``'s full K and V, ``[Sk, Hk, D]`` each (a copy: for references and tests only)."""
        if self.paged:
            rows = self.req_to_token[self.req_pool_indices[r], :seq_len_k].long()
        else:
            start = int(self.kv_start[r])
            rows = torch.arange(start, start + seq_len_k, device=self.k.device)
        return self.k[rows], self.v[rows]


def pool_run_starts(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, geom: BatchGeometry) -> torch.Tensor:
    """``[B]`` int32: per request, the pool slot of its key 0 when its ``Sk_r`` slots are consecutive
    (``req_to_token[req_pool_indices[r], j] == slot + j`` for every ``j < Sk_r``), else -1.

    One pass over the batch's ``[B, max Sk]`` slots on their device, no host sync; once per batch, shared by every
    layer. SGLang 0.5.17's page-size-1 allocator (``mem_cache/allocator/token.py``) hands out the head of its free
    list (an ``arange`` at start, sorted again when it runs dry), a batch's slots as one slice of it. So a prompt
    prefilled alone on a fresh server is one run. A request whose chunks were allocated with other
    requests' slots in between (decode steps, other prefills: any concurrent load) is not, and is read through
    the table, as before. Runs per key tile instead of per request would cover it; not built.
    """
    slots = req_to_token[req_pool_indices.long(), :geom.max_seqlen_k].long()
    j = torch.arange(slots.shape[1], device=slots.device)
    used = j < geom.seq_lens_k.to(slots.device).long().view(-1, 1)
    run = (slots == slots[:, :1] + j) | ~used
    return torch.where(run.all(dim=1), slots[:, 0], -1).to(torch.int32)


@dataclass(kw_only=True)
class SparseLayout:
    """Per (query block, query head) key ranges and gathered columns; see the module docstring."""

    block_start: torch.Tensor  # [NQB, Hq, MAXB] int32: first key of each range (request-local)
    block_end: torch.Tensor  # [NQB, Hq, MAXB] int32: one past the last key, end - start in [1, 64]
    block_count: torch.Tensor  # [NQB, Hq] int32: valid ranges
    full_count: torch.Tensor  # [NQB, Hq] int32: ranges [0, full_count) need no mask
    col_index: torch.Tensor  # [NQB, Hq, MAXC] int32: gathered key columns, ascending
    col_count: torch.Tensor  # [NQB, Hq] int32: valid columns

    @property
    def num_heads(self) -> int:
        return int(self.block_count.shape[1])

    def validate(self, geom: BatchGeometry, num_heads: int, device: torch.device) -> None:
        """Host checks (no sync): int32 tensors on ``device`` shaped ``[NQB, num_heads, ...]`` for ``geom``; in
        checked mode also the invariants of the module docstring that keep the kernels' reads in bounds."""
        nqb = geom.num_query_blocks
        for name in ("block_start", "block_end", "block_count", "full_count", "col_index", "col_count"):
            t = getattr(self, name)
            check_tensor(t, name, ndim=2 if name.endswith("count") else 3, dtypes=(torch.int32,))
            check(tuple(t.shape[:2]) == (nqb, num_heads), name,
                  f"shape {tuple(t.shape)} does not start with (query blocks {nqb}, Hq {num_heads})")
            check(t.device == device, name, f"on {t.device}, q on {device}")
        check(self.block_end.shape == self.block_start.shape, "block_end",
              f"shape {tuple(self.block_end.shape)} != block_start {tuple(self.block_start.shape)}")
        if CHECKED:
            self.check_contents(geom)

    def check_contents(self, geom: BatchGeometry) -> None:
        """Checked mode: counts within capacities; each range 1..64 keys overlapping its request's context (full
        ranges: 64 keys in ``[0, first row's position]``); each group ascending and disjoint; columns strictly
        ascending and inside the context. Syncs with the device."""
        bs, be, bc, fc, ci, cc = (self.block_start, self.block_end, self.block_count, self.full_count,
                                  self.col_index, self.col_count)
        maxb, maxc = bs.shape[2], ci.shape[2]
        req = geom.qb_request.long()
        sk = geom.seq_lens_k[req].view(-1, 1, 1)  # keys of each query block's request
        r0 = (geom.prefix_lens[req] + geom.qb_row).view(-1, 1, 1)  # position of each block's first row

        def at(qb, h):
            return f"query block {qb}, head {h}"

        def rng(qb, h, i):
            return f"range {i} [{int(bs[qb, h, i])}, {int(be[qb, h, i])})"

        _require((bc < 0) | (bc > maxb), "block_count",
                 lambda qb, h: f"{at(qb, h)}: {int(bc[qb, h])} ranges, capacity {maxb}")
        _require((fc < 0) | (fc > bc), "full_count",
                 lambda qb, h: f"{at(qb, h)}: {int(fc[qb, h])} full of {int(bc[qb, h])} ranges")
        _require((cc < 0) | (cc > maxc), "col_count",
                 lambda qb, h: f"{at(qb, h)}: {int(cc[qb, h])} columns, capacity {maxc}")
        b = torch.arange(maxb, device=bs.device)
        used, full = b < bc.unsqueeze(-1), b < fc.unsqueeze(-1)
        # Partial ranges may start left of key 0 (the kernel clips them); full ones are read without any mask.
        _require(used & ((be <= bs) | (be > bs + BLOCK) | (be <= 0) | (bs >= sk)), "block_start",
                 lambda qb, h, i: f"{at(qb, h)}: {rng(qb, h, i)} is not 1..{BLOCK} keys overlapping the "
                                  f"{int(sk[qb])} keys of its request")
        _require(full & ((bs < 0) | (be - bs != BLOCK) | (be - 1 > r0)), "full_count",
                 lambda qb, h, i: f"{at(qb, h)}: {rng(qb, h, i)} counted full, but not {BLOCK} keys left of the "
                                  f"block's first row (position {int(r0[qb])})")
        same_group = used[..., 1:] & (full[..., 1:] == full[..., :-1])
        _require(same_group & (bs[..., 1:] < be[..., :-1]), "block_start",
                 lambda qb, h, i: f"{at(qb, h)}: {rng(qb, h, i)} and {rng(qb, h, i + 1)} overlap or are out of order")
        c = torch.arange(maxc, device=ci.device)
        cols_used = c < cc.unsqueeze(-1)
        _require(cols_used & ((ci < 0) | (ci >= sk)), "col_index",
                 lambda qb, h, i: f"{at(qb, h)}: column {i} is key {int(ci[qb, h, i])}, outside the {int(sk[qb])} "
                                  "keys of its request")
        _require(cols_used[..., 1:] & (ci[..., 1:] <= ci[..., :-1]), "col_index",
                 lambda qb, h, i: f"{at(qb, h)}: columns {i} and {i + 1} (keys {int(ci[qb, h, i])}, "
                                  f"{int(ci[qb, h, i + 1])}) not strictly ascending")

    def same_as(self, other: "SparseLayout") -> bool:
        """Equal counts and equal entries below them (slots past the counts are never read and may hold anything);
        syncs, for tests and checks."""
        if not all(torch.equal(getattr(self, n), getattr(other, n)) for n in ("block_count", "full_count",
                                                                               "col_count")):
            return False
        for names, count in ((("block_start", "block_end"), self.block_count), (("col_index",), self.col_count)):
            for name in names:
                a, b = getattr(self, name), getattr(other, name)
                width = min(a.shape[2], b.shape[2])
                used = torch.arange(width, device=a.device) < count.unsqueeze(-1)
                if int(count.max()) > width or not torch.equal(a[..., :width][used], b[..., :width][used]):
                    return False
        return True

    def to_dense(self, geom: BatchGeometry) -> list[torch.Tensor]:
        """Exact attended-key mask per request: a list of ``[Hq, Sq_r, Sk_r]`` bool tensors (tests/debugging).

        Includes the causal cut ``j <= prefix + i``; loops on the host, so keep shapes small.
        """
        bs, be = self.block_start.cpu(), self.block_end.cpu()
        bc, ci, cc = self.block_count.cpu(), self.col_index.cpu(), self.col_count.cpu()
        masks = []
        for sq, sk in zip(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu):
            masks.append(torch.zeros(self.num_heads, sq, sk, dtype=torch.bool))
        for qb, (r, row) in enumerate(zip(geom.qb_request.tolist(), geom.qb_row.tolist())):
            m = masks[r]
            rows = slice(row, min(row + BLOCK, m.shape[1]))
            for h in range(self.num_heads):
                for b in range(int(bc[qb, h])):
                    m[h, rows, max(int(bs[qb, h, b]), 0): max(int(be[qb, h, b]), 0)] = True
                cols = ci[qb, h, : int(cc[qb, h])].long()
                m[h, rows, cols] = True
        for m, sq, sk in zip(masks, geom.seq_lens_q_cpu, geom.seq_lens_k_cpu):
            pos = torch.arange(sk - sq, sk).view(-1, 1)
            m &= torch.arange(sk).view(1, -1) <= pos
        return masks

    def pairs(self, geom: BatchGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attended, visited)`` (query, key) pairs per (query block, head), ``[NQB, Hq]`` int64 on the layout's
        device, no host sync: :func:`_range_column_pairs` of the layout's ranges and columns over ``geom``. Exact
        for a layout that keeps the invariants (a key in two entries would count twice)."""
        req = geom.qb_request.long()
        row = geom.qb_row.long()
        seq_q = (geom.cu_seqlens_q[1:] - geom.cu_seqlens_q[:-1]).long()[req]  # device-side: no host copy per layer
        return _range_column_pairs(starts=self.block_start, ends=self.block_end, counts=self.block_count,
                                   cols=self.col_index, col_counts=self.col_count,
                                   row_pos=row + geom.prefix_lens.long()[req], rows=(seq_q - row).clamp(max=BLOCK),
                                   seq_k=geom.seq_lens_k.long()[req])

    def sparsity(self, geom: BatchGeometry) -> float:
        """Share of causal (query, key) pairs the layout skips, over the whole batch (1.0 = all skipped); syncs."""
        total = sum(causal_pairs(sq, sk, self.num_heads) for sq, sk in zip(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu))
        return 1.0 - int(self.pairs(geom)[0].sum()) / total


# ---- pair counting: closed form per key range, so 256K-token layouts are counted without expanding them ----


def causal_pairs(seq_q: int, seq_k: int, heads: int) -> int:
    """(query, key, head) triples of bottom-right causal attention: chunk rows at the last ``seq_q`` positions."""
    prefix = seq_k - seq_q
    return heads * (seq_q * prefix + seq_q * (seq_q + 1) // 2)


def _clamped_ramp_sum(m: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``sum_{t=0}^{m-1} clamp(t, 0, length)`` for ``m >= 0`` (elementwise, int64)."""
    inside = m * (m - 1) // 2
    beyond = length * (length + 1) // 2 + (m - length - 1) * length
    return torch.where(m <= length + 1, inside, beyond)


def _range_column_pairs(*, starts: torch.Tensor, ends: torch.Tensor, counts: torch.Tensor, cols: torch.Tensor,
                        col_counts: torch.Tensor, row_pos: torch.Tensor, rows: torch.Tensor,
                        seq_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attended and visited (query, key) pairs of key ranges plus gathered columns, per (query block, head).

    starts, ends: [NQB, H, MAXB] int   key range [start, end) of each entry (ends clamped to ``seq_k``)
    counts:       [NQB, H] int         valid ranges
    cols:         [NQB, H, MAXC] int   gathered key columns
    col_counts:   [NQB, H] int         valid columns
    row_pos:      [NQB] int            absolute position of each block's first query row
    rows:         [NQB] int            valid query rows of each block (64, less in the last)
    seq_k:        [NQB] int            keys of each block's request

    Returns ``(attended, visited)``, ``[NQB, H]`` int64 on the inputs' device (no host sync): a row at position
    ``p`` attends range key ``j`` when ``j <= p``, summed in closed form per range; visited = rows x (range
    lengths + columns), the causal cut not applied.
    """
    starts, ends, cols = starts.long(), ends.long(), cols.long()
    p0 = row_pos.long().view(-1, 1, 1)
    n = rows.long().view(-1, 1, 1)
    sk = seq_k.long().view(-1, 1, 1)
    valid_b = torch.arange(starts.shape[-1], device=starts.device) < counts.long().unsqueeze(-1)
    s = starts.clamp(min=0).minimum(sk)
    length = ends.minimum(sk).maximum(s) - s
    length = torch.where(valid_b, length, torch.zeros_like(length))
    # Row p sees clamp(p + 1 - s, 0, length) keys of the range; rows p0 .. p0+n-1 give a clamped ramp.
    a = p0 + 1 - s
    ramp = _clamped_ramp_sum((a + n).clamp(min=0), length) - _clamped_ramp_sum(a.clamp(min=0), length)
    valid_c = torch.arange(cols.shape[-1], device=cols.device) < col_counts.long().unsqueeze(-1)
    col_rows = (p0 + n - cols).clamp(min=0).minimum(n)  # rows at or after the column's position
    attended = ramp.sum(-1) + torch.where(valid_c, col_rows, 0).sum(-1)
    visited = (length * n).sum(-1) + (valid_c.long() * n).sum(-1)
    return attended, visited
