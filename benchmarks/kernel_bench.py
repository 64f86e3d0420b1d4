"""Kernel-level prefill attention benchmark: dense baselines against the sparse patterns, one request.

Run from the repository root on a GPU host (appends to the results file, so long sweeps can be split)::

    python -m benchmarks.kernel_bench --lengths 8K,16K,32K,64K,128K,256K --head-dims 128 --chunk 8K

Shapes are Llama-3-8B attention (32 query heads, 8 KV heads; head_dim 128 by default, 64 and 256 on
request), bf16. Each length gives a full prefill (``Sq = Sk``); ``--chunk C`` adds a chunk of ``C`` queries
at the end of an ``Sk``-token context (chunked prefill against a cached prefix).

Inputs are random with planted structure so the vertical-slash estimate has something to find
(:func:`make_inputs`): Gaussian q/k/v, plus a per-KV-head direction that a few dozen "heavy" key columns
share with every query (vertical lines, column 0 always among them), plus a RoPE-rotated vector with its
energy in the fast-rotating dimensions on both q and k, whose dot product decays with ``|i - j|`` within
about a hundred positions (a local band: slash lines near the diagonal). Both raise a score by about 3
after the ``1/sqrt(d)`` scaling.

Methods (each is skipped, with the reason stored in the run's ``unavailable``, when its library is missing):

* dense: FlashAttention-3 (``sgl_kernel.flash_attn.flash_attn_varlen_func``), PyTorch SDPA with the cuDNN
  and the flash back-ends (full prefill only: SDPA's ``is_causal`` is top-left aligned), FlashInfer
  ``single_prefill_with_kv_cache`` (causal, backend auto), and our sparse kernel on the dense layout;
* ours: every sparse pattern type of ``sgl_minference.registry`` (vertical-slash, block-sparse, A-shape,
  XAttention, FlexPrefill), built by the registry's builder as the backend builds it; index building and
  attention timed separately (index time = one layer's layout for all heads of the chunk);
* SGLang's MInference kernel (``sgl_kernel.sparse_flash_attn.sparse_attn_func`` after
  ``convert_vertical_slash_indexes``) on the very vertical/slash indices our estimate produced
  (head_dim 128 only); index time = our estimate + the conversion; and our kernel on that converter's output
  (``ours_sgl_layout``, checked against ``sgl_vs``): the converter rounds merged slash ranges to whole 64-key
  blocks, so the same indices give it a larger key set than our layout (BENCHMARKS.md);
* FlashInfer ``VariableBlockSparseAttentionWrapper``: it takes one block mask per KV head, so the
  block-sparse selections of the 4 query heads of a group are united (pattern ``block_sparse_kv_union``,
  which computes more than per-query-head block-sparse); our kernel runs the same united layout for an
  equal-work comparison. Its index time = our block-sparse estimate + union + ``plan()`` (which syncs).

Accounting per record (see ``benchmarks.common``): ``pairs`` = (query, key, query head) triples attended,
counted from the layout with the causal cut; ``tflops`` = 4 * head_dim * pairs / attention time;
``density`` = pairs / causal pairs; ``peak_mib`` = peak memory one call allocates beyond its inputs.
Outputs are cross-checked (max |difference| in ``params["check"]``): dense methods against FA3, SGLang's
kernel against ours on the same indices, FlashInfer's block-sparse against ours on the united layout.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from benchmarks.common import (KernelRecord, PairCount, TimingPlan, add_record, add_run,
                               attention_tflops, done_keys, launch_name, layout_pairs, parse_launch_list,
                               load_results, measure, median, parse_lengths, save_results)
from sgl_minference.config import DEFAULT_ESTIMATION, Estimation
from sgl_minference.kernels.sparse_attention import AttentionLaunch
from sgl_minference.layout import BLOCK, BatchGeometry, KVSource, SparseLayout, causal_pairs
from sgl_minference.registry import PATTERNS, head_budgets

# Case id -> (method, pattern), in running order: a method's reference output must exist before its check.
CASES = {
    "fa3": ("fa3", "dense"),
    "sdpa_cudnn": ("sdpa_cudnn", "dense"),
    "sdpa_flash": ("sdpa_flash", "dense"),
    "flashinfer": ("flashinfer", "dense"),
    "ours_dense": ("ours", "dense"),
    "ours_vs": ("ours", "vertical_slash"),
    "sgl_vs": ("sgl_kernel", "vertical_slash"),
    "ours_sgl_layout": ("ours", "vertical_slash_sgl_layout"),
    "ours_bs": ("ours", "block_sparse"),
    "ours_bs_union": ("ours", "block_sparse_kv_union"),
    "flashinfer_bs": ("flashinfer_vbsr", "block_sparse_kv_union"),
    "ours_ashape": ("ours", "a_shape"),
    "ours_xattn": ("ours", "xattention"),
    "ours_flex": ("ours", "flexprefill"),
}
OURS = {"ours_dense", "ours_vs", "ours_bs", "ours_ashape", "ours_xattn", "ours_flex"}  # one pattern type each
CHECK_AGAINST = {"sdpa_cudnn": "fa3", "sdpa_flash": "fa3", "flashinfer": "fa3", "ours_dense": "fa3",
                 "sgl_vs": "ours_vs", "ours_sgl_layout": "sgl_vs", "flashinfer_bs": "ours_bs_union"}
LIBRARIES = {  # case -> implementations it needs (names used by load_libraries)
    "fa3": ("fa3",), "sdpa_cudnn": ("sdpa",), "sdpa_flash": ("sdpa",), "flashinfer": ("flashinfer",),
    "ours_dense": ("ours",), "ours_vs": ("ours",), "sgl_vs": ("sgl_sparse", "ours"),
    "ours_sgl_layout": ("sgl_sparse", "ours"), "ours_bs": ("ours",),
    "ours_bs_union": ("ours",), "flashinfer_bs": ("flashinfer", "ours"), "ours_ashape": ("ours",),
    "ours_xattn": ("ours",), "ours_flex": ("ours",),
}
HEAVY_COLUMNS = 32  # planted vertical lines per KV head (column 0 included)
LOCAL_DIMS_FRACTION = 8  # the local-band vector lives in the fastest 1/8 of the rotary frequencies


@dataclass(kw_only=True)
class Budgets:
    """Sparse budgets shared by all heads (per-row key counts of similar size across patterns; the adaptive
    patterns' thresholds at their published values) and the estimation settings."""

    vertical: int = 1000
    slash: int = 6096
    block_topk: int = 111  # blocks per query block; default (vertical + slash) / 64: the same keys per row
    sink: int = 128
    local: int = 4096
    xattn_threshold: float = 0.9
    xattn_stride: int = 8
    flex_gamma: float = 0.9
    flex_tau: float = 0.1
    flex_min_budget: int = 1024
    est: Estimation = DEFAULT_ESTIMATION

    def spec(self, pattern: str):
        """The head spec of ``pattern`` (a registry type) with these budgets."""
        fields = {"dense": {}, "vertical_slash": dict(vertical=self.vertical, slash=self.slash),
                  "block_sparse": dict(topk=self.block_topk), "a_shape": dict(sink=self.sink, local=self.local),
                  "xattention": dict(threshold=self.xattn_threshold, stride=self.xattn_stride),
                  "flexprefill": dict(gamma=self.flex_gamma, tau=self.flex_tau, min_budget=self.flex_min_budget)}
        return PATTERNS[pattern].spec(**fields[pattern])

    def as_json(self) -> dict:
        return {**{k: v for k, v in vars(self).items() if k != "est"}, "estimation": self.est.model_dump()}


@dataclass(kw_only=True)
class Inputs:
    """One request's attention inputs, built once per (geometry, head_dim)."""

    q: torch.Tensor  # [Sq, Hq, D] bf16
    k: torch.Tensor  # [Sk, Hk, D] bf16
    v: torch.Tensor  # [Sk, Hk, D] bf16
    geom: BatchGeometry  # one request: Sq queries at the last Sq of Sk positions
    kv: KVSource  # contiguous view of k/v
    sm_scale: float
    launch: AttentionLaunch | None = None  # our kernel's launch (--launch; None: its default)

    @property
    def seq_q(self) -> int:
        return self.q.shape[0]

    @property
    def seq_k(self) -> int:
        return self.k.shape[0]


@dataclass(kw_only=True)
class SparseMethod:
    """A sparse case: ``build`` makes the indices (index time), ``attend(indices)`` runs attention on them."""

    build: Callable[[], object]
    attend: Callable[[object], torch.Tensor]  # returns the output [Sq, Hq, D]
    count: Callable[[object], PairCount]
    parts: dict[str, Callable[[], object]] = field(default_factory=dict)  # sub-steps of build, timed apart
    params: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def rotary(vec: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``vec`` ([H, D] fp32) to each position (half-split RoPE): returns [P, H, D] fp32."""
    d = vec.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=vec.device, dtype=torch.float32) * 2 / d)
    ang = positions.float().view(-1, 1, 1) * inv_freq.view(1, 1, -1)  # [P, 1, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = vec[None, :, : d // 2], vec[None, :, d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def make_inputs(*, seq_q: int, seq_k: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                seed: int, device: str = "cuda") -> Inputs:
    """Random bf16 q/k/v with planted heavy columns and a local band (module docstring)."""
    g = torch.Generator(device=device).manual_seed(seed)
    group = num_q_heads // num_kv_heads
    d = head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    q, k, v = randn(seq_q, num_q_heads, d), randn(seq_k, num_kv_heads, d), randn(seq_k, num_kv_heads, d)
    amp = 6.0 * (d / 128) ** 0.25  # amp**2 / sqrt(d) = 3.2 at every head_dim
    # Heavy columns: a unit direction per KV head on those keys and on every query of the group.
    heavy_dir = torch.nn.functional.normalize(torch.randn(num_kv_heads, d, generator=g, device=device), dim=-1)
    cols = torch.randint(1, seq_k, (num_kv_heads, HEAVY_COLUMNS - 1), generator=g, device=device)
    cols = torch.cat([torch.zeros(num_kv_heads, 1, dtype=cols.dtype, device=device), cols], dim=1)
    heads = torch.arange(num_kv_heads, device=device).view(-1, 1).expand_as(cols)
    k[cols.flatten(), heads.flatten()] += (amp * heavy_dir[heads.flatten()]).to(k.dtype)
    q.view(seq_q, num_kv_heads, group, d).add_((amp * heavy_dir).to(q.dtype)[None, :, None, :])
    # Local band: a vector in the fast rotary pairs, rotated to each position on both sides.
    local = torch.zeros(num_kv_heads, d, device=device)
    fast = max(1, d // 2 // LOCAL_DIMS_FRACTION)
    local[:, :fast] = torch.randn(num_kv_heads, fast, generator=g, device=device)
    local[:, d // 2: d // 2 + fast] = torch.randn(num_kv_heads, fast, generator=g, device=device)
    local = amp * torch.nn.functional.normalize(local, dim=-1)
    prefix, step = seq_k - seq_q, 16384  # slices keep the fp32 rotations small at 256K
    for lo in range(0, seq_k, step):
        pos = torch.arange(lo, min(lo + step, seq_k), device=device)
        k[lo: lo + step] += rotary(local, pos).to(k.dtype)
    for lo in range(0, seq_q, step):
        pos = torch.arange(prefix + lo, prefix + min(lo + step, seq_q), device=device)
        q[lo: lo + step].view(-1, num_kv_heads, group, d).add_(rotary(local, pos).to(q.dtype)[:, :, None, :])
    geom = BatchGeometry.build([seq_q], [seq_k], device)
    return Inputs(q=q, k=k, v=v, geom=geom, kv=KVSource.packed(k, v, [seq_k]), sm_scale=d ** -0.5)


# ----------------------------------------------------------------------------------------------------------
# Layout conversions for the per-KV-head comparison
# ----------------------------------------------------------------------------------------------------------


def block_mask_of(layout: SparseLayout, num_kv_blocks: int) -> torch.Tensor:
    """64x64 blocks a layout touches: [NQB, H, NB] bool (a range may straddle two key blocks)."""
    nqb, h, _ = layout.block_start.shape
    mask = torch.zeros(nqb, h, num_kv_blocks + 1, dtype=torch.bool, device=layout.block_start.device)
    dump = num_kv_blocks  # invalid entries land in an extra block dropped at the end
    valid_b = torch.arange(layout.block_start.shape[-1], device=mask.device) < layout.block_count.unsqueeze(-1)
    for edge in (layout.block_start, layout.block_end - 1):
        mask.scatter_(-1, torch.where(valid_b, edge.long() // BLOCK, dump), True)
    valid_c = torch.arange(layout.col_index.shape[-1], device=mask.device) < layout.col_count.unsqueeze(-1)
    mask.scatter_(-1, torch.where(valid_c, layout.col_index.long() // BLOCK, dump), True)
    return mask[..., :num_kv_blocks]


def union_over_groups(mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[NQB, Hq, NB] -> [NQB, Hk, NB]: a block is kept for a KV head when any query head of its group keeps it."""
    nqb, hq, nb = mask.shape
    return mask.view(nqb, num_kv_heads, hq // num_kv_heads, nb).any(dim=2)


def layout_from_block_mask(mask: torch.Tensor, geom: BatchGeometry, *, chunk_blocks: int = 256) -> SparseLayout:
    """A :class:`SparseLayout` visiting exactly the 64x64 blocks of ``mask`` ([NQB, H, NB] bool), one request.

    Selected blocks become ascending ranges ``[64 kb, min(64 kb + 64, Sk))``; those entirely left of the
    block's first row are full, the rest partial (full ones come first since they are the leftmost).
    """
    seq_q, seq_k = geom.seq_lens_q_cpu[0], geom.seq_lens_k_cpu[0]
    nqb, h, nb = mask.shape
    counts = mask.sum(-1, dtype=torch.int32)  # [NQB, H]
    maxb = max(int(counts.max()), 1)
    kb = torch.zeros(nqb, h, maxb + 1, dtype=torch.int32, device=mask.device)
    for lo in range(0, nqb, chunk_blocks):  # the running count is [chunk, H, NB] int32, not [NQB, H, NB]
        m = mask[lo: lo + chunk_blocks]
        slot = torch.where(m, m.cumsum(-1, dtype=torch.int32) - 1, maxb).long()
        blocks = torch.arange(nb, dtype=torch.int32, device=mask.device).expand_as(m)
        kb[lo: lo + chunk_blocks].scatter_(-1, slot, blocks)
    kb = kb[..., :maxb]
    valid = torch.arange(maxb, device=mask.device) < counts.unsqueeze(-1)
    start = torch.where(valid, kb * BLOCK, 0)
    end = torch.where(valid, (start + BLOCK).clamp(max=seq_k), 0)
    first_row = (geom.qb_row + (seq_k - seq_q)).view(-1, 1, 1)
    full = valid & (end - start == BLOCK) & (end - 1 <= first_row)
    zeros = torch.zeros(nqb, h, dtype=torch.int32, device=mask.device)
    return SparseLayout(block_start=start, block_end=end, block_count=counts,
                        full_count=full.sum(-1, dtype=torch.int32),
                        col_index=torch.zeros(nqb, h, 1, dtype=torch.int32, device=mask.device),
                        col_count=zeros)


def layout_from_sgl(converted, seq_k: int) -> SparseLayout:
    """``convert_vertical_slash_indexes``'s output as our layout: the same key set, for our kernel.

    ``converted`` = (block_count ``[1, H, NQB]``, block_offset ``[1, H, NQB, NNZ_S]``, column_count ``[1, H, NQB]``,
    column_index ``[1, H, NQB, NNZ_V]``), int32; a block at offset ``o`` is keys ``[o, o + 64)``. Every range goes
    to the masked path (``full_count`` 0), so the kernel applies the causal cut to all of them.
    """
    block_count, block_offset, column_count, column_index = (t[0].transpose(0, 1).contiguous() for t in converted)
    return SparseLayout(block_start=block_offset, block_end=(block_offset + BLOCK).clamp(max=seq_k),
                        block_count=block_count, full_count=torch.zeros_like(block_count),
                        col_index=column_index, col_count=column_count)


def sgl_layout_pairs(converted, inp: Inputs) -> PairCount:
    """Work of ``convert_vertical_slash_indexes``'s output (64-wide blocks at ``block_offset`` plus columns)."""
    return layout_pairs(layout_from_sgl(converted, inp.seq_k), inp.geom)


# ----------------------------------------------------------------------------------------------------------
# Libraries
# ----------------------------------------------------------------------------------------------------------


def load_libraries() -> tuple[dict[str, object], dict[str, str]]:
    """Import every implementation that can be imported here; the others map to the reason they cannot."""
    libs, unavailable = {}, {}

    def attempt(name, loader):
        try:
            libs[name] = loader()
        except Exception as e:  # an optional baseline: any import failure just skips it
            unavailable[name] = f"{type(e).__name__}: {e}"[:500]

    def fa3():
        from sgl_kernel import flash_attn

        if not flash_attn.is_fa3_supported():
            raise RuntimeError("sgl_kernel FA3 needs sm80-sm90 and CUDA >= 12.3")
        return flash_attn

    def sgl_sparse():
        from sgl_kernel import sparse_flash_attn

        return sparse_flash_attn

    def flashinfer():
        import flashinfer.prefill
        import flashinfer.sparse

        return flashinfer

    def sdpa():
        import torch.nn.attention

        return torch.nn.attention

    def ours():
        import sgl_minference.kernels as kernels
        import sgl_minference.patterns as patterns
        from sgl_minference.layout import SENTINEL

        return {"kernels": kernels, "patterns": patterns, "HeadSet": patterns.HeadSet, "SENTINEL": SENTINEL}

    for name, loader in (("fa3", fa3), ("sgl_sparse", sgl_sparse), ("flashinfer", flashinfer),
                         ("sdpa", sdpa), ("ours", ours)):
        attempt(name, loader)
    return libs, unavailable


# ----------------------------------------------------------------------------------------------------------
# Dense baselines: each returns a zero-argument call producing the output [Sq, Hq, D]
# ----------------------------------------------------------------------------------------------------------


def dense_fa3(inp: Inputs, libs) -> Callable[[], torch.Tensor]:
    cu_q = torch.tensor([0, inp.seq_q], dtype=torch.int32, device=inp.q.device)
    cu_k = torch.tensor([0, inp.seq_k], dtype=torch.int32, device=inp.q.device)
    return lambda: libs["fa3"].flash_attn_varlen_func(
        inp.q, inp.k, inp.v, cu_q, cu_k, max_seqlen_q=inp.seq_q, max_seqlen_k=inp.seq_k,
        softmax_scale=inp.sm_scale, causal=True)


def dense_sdpa(inp: Inputs, libs, backend_name: str, params: dict) -> Callable[[], torch.Tensor]:
    """SDPA pinned to one back-end; GQA through ``enable_gqa``, else (if refused) on repeated K/V heads."""
    if inp.seq_q != inp.seq_k:
        raise NotImplementedError("SDPA's is_causal is top-left aligned: full prefill only")
    attn = libs["sdpa"]
    backend = getattr(attn.SDPBackend, backend_name)
    q = inp.q.transpose(0, 1).unsqueeze(0)  # [1, Hq, S, D] view
    k, v = (t.transpose(0, 1).unsqueeze(0) for t in (inp.k, inp.v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def gqa():
        with attn.sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True, scale=inp.sm_scale, enable_gqa=True)[0].transpose(0, 1)

    try:
        gqa()
        params["gqa"] = "enable_gqa"
        return gqa
    except RuntimeError as e:
        params["gqa"] = f"K/V heads repeated (enable_gqa refused: {str(e)[:200]})"
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))

    def repeated():
        with attn.sdpa_kernel(backend):
            return sdpa(q, k_rep, v_rep, is_causal=True, scale=inp.sm_scale)[0].transpose(0, 1)

    return repeated


def dense_flashinfer(inp: Inputs, libs) -> Callable[[], torch.Tensor]:
    fi = libs["flashinfer"]
    return lambda: fi.prefill.single_prefill_with_kv_cache(inp.q, inp.k, inp.v, causal=True,
                                                             sm_scale=inp.sm_scale)


# ----------------------------------------------------------------------------------------------------------
# Sparse methods
# ----------------------------------------------------------------------------------------------------------


def head_set(inp: Inputs, libs, spec):
    """Every query head in one ``HeadSet``, each with the budgets of ``spec``."""
    n, hk = inp.q.shape[1], inp.k.shape[1]
    return libs["ours"]["HeadSet"].build(list(range(n)), num_q_heads=n, num_kv_heads=hk, device=inp.q.device,
                                          **head_budgets([spec] * n))


def ours_method(inp: Inputs, libs, build: Callable[[], SparseLayout], params: dict) -> SparseMethod:
    kernels = libs["ours"]["kernels"]
    return SparseMethod(
        build=build,
        attend=lambda layout: kernels.sparse_attention(inp.q, inp.kv, layout, inp.geom, sm_scale=inp.sm_scale,
                                                       launch=inp.launch)[0],
        count=lambda layout: layout_pairs(layout, inp.geom), params=params)


def pattern_build(inp: Inputs, libs, b: Budgets, pattern: str) -> Callable[[], SparseLayout]:
    """The registry's online builder of ``pattern`` over every head, as the backend calls it per layer."""
    heads = head_set(inp, libs, b.spec(pattern))
    build = PATTERNS[pattern].build
    return lambda: build(inp.q, inp.kv, inp.geom, heads, sm_scale=inp.sm_scale, est=b.est)


def sparse_method(case: str, inp: Inputs, libs, b: Budgets) -> SparseMethod:
    """The index building and attention calls of one sparse (or our dense-layout) case."""
    n, hk = inp.q.shape[1], inp.k.shape[1]
    nb = -(-inp.seq_k // BLOCK)
    if case in OURS:
        pattern = CASES[case][1]
        params = b.spec(pattern).model_dump(exclude={"type"})
        return ours_method(inp, libs, pattern_build(inp, libs, b, pattern), params)
    if case == "ours_bs_union":
        build_bs = pattern_build(inp, libs, b, "block_sparse")

        def build_union():
            united = union_over_groups(block_mask_of(build_bs(), nb), hk)
            return layout_from_block_mask(united.repeat_interleave(n // hk, dim=1), inp.geom)

        return ours_method(inp, libs, build_union, {"topk": b.block_topk})
    if case == "sgl_vs":
        return sgl_vertical_slash(inp, libs, b)
    if case == "ours_sgl_layout":
        return sgl_vertical_slash(inp, libs, b, ours_kernel=True)
    if case == "flashinfer_bs":
        return flashinfer_block_sparse(inp, libs, b)
    raise ValueError(f"case: unknown sparse case {case!r}")


def sgl_vertical_slash(inp: Inputs, libs, b: Budgets, *, ours_kernel: bool = False) -> SparseMethod:
    """SGLang's MInference kernel on our estimate's vertical/slash indices (index time = estimate + conversion);
    with ``ours_kernel``, our kernel on the same converted indices."""
    if inp.q.shape[-1] != 128:
        raise NotImplementedError("sgl_kernel sparse_attn_func supports head_dim 128 only")
    sk, patterns = libs["sgl_sparse"], libs["ours"]["patterns"]
    heads = head_set(inp, libs, b.spec("vertical_slash"))
    opts = dict(sm_scale=inp.sm_scale, last_q=b.est.last_q, forced_sink=b.est.forced_sink,
                forced_local=b.est.forced_local)
    dev = inp.q.device
    q_lens = torch.tensor([inp.seq_q], dtype=torch.int32, device=dev)
    k_lens = torch.tensor([inp.seq_k], dtype=torch.int32, device=dev)

    def estimate():
        # columns [1, Hq, V] ascending, offsets [1, Hq, S] descending: the order the converter wants;
        # unused entries (SENTINEL columns, -1 offsets) sit at the end of each head's list.
        return patterns.estimate_vertical_slash(inp.q, inp.kv, inp.geom, heads, **opts)

    columns, offsets = est = estimate()
    v_count = (columns != libs["ours"]["SENTINEL"]).sum(-1, dtype=torch.int32)[0]  # [Hq]
    s_count = (offsets >= 0).sum(-1, dtype=torch.int32)[0]
    uniform = bool((v_count == columns.shape[-1]).all()) and bool((s_count == offsets.shape[-1]).all())

    def convert(indices):
        v, s = indices
        if uniform:
            return sk.convert_vertical_slash_indexes(q_lens, k_lens, v, s, inp.seq_q, BLOCK, BLOCK, True)
        return sk.convert_vertical_slash_indexes_mergehead(q_lens, k_lens, v, s, v_count, s_count, inp.seq_q,
                                                           BLOCK, BLOCK, True)

    if ours_kernel:
        # Our kernel over the converter's key set: tells a kernel difference from a key-set difference.
        return ours_method(inp, libs, lambda: layout_from_sgl(convert(estimate()), inp.seq_k),
                           {"vertical": b.vertical, "slash": b.slash, "layout": "convert_vertical_slash_indexes"})
    q, k, v = inp.q[None], inp.k[None], inp.v[None]
    return SparseMethod(
        build=lambda: convert(estimate()),
        attend=lambda c: sk.sparse_attn_func(q, k, v, *c, softmax_scale=inp.sm_scale, causal=True)[0],  # batch 0
        count=lambda c: sgl_layout_pairs(c, inp),
        parts={"estimate_ms": estimate, "convert_ms": lambda: convert(est)},
        params={"vertical": b.vertical, "slash": b.slash, "converter": "uniform" if uniform else "mergehead"},
    )


def flashinfer_block_sparse(inp: Inputs, libs, b: Budgets) -> SparseMethod:
    """FlashInfer's per-KV-head variable block-sparse wrapper on the group-united block-sparse selection."""
    if inp.seq_q % BLOCK or inp.seq_k % BLOCK:
        raise NotImplementedError("square 64-blocks ending on the diagonal need lengths that are multiples of 64")
    fi = libs["flashinfer"]
    n, hk, d = inp.q.shape[1], inp.k.shape[1], inp.q.shape[2]
    nqb, nb = inp.seq_q // BLOCK, inp.seq_k // BLOCK
    dev = inp.q.device
    build_bs = pattern_build(inp, libs, b, "block_sparse")
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=dev)
    wrapper = fi.sparse.VariableBlockSparseAttentionWrapper(workspace)
    row_sz = torch.full((hk, nqb), BLOCK, dtype=torch.int32, device=dev)
    col_sz = torch.full((hk, nb), BLOCK, dtype=torch.int32, device=dev)
    # HND copies made once; the wrapper's run() re-packs them per call (part of its measured time).
    qh, kh, vh = (t.transpose(0, 1).contiguous() for t in (inp.q, inp.k, inp.v))

    def united_mask():
        return union_over_groups(block_mask_of(build_bs(), nb), hk).permute(1, 0, 2).contiguous()

    def plan(mask):
        wrapper.plan(mask, row_sz, col_sz, n, hk, d, causal=True, sm_scale=inp.sm_scale,
                     q_data_type=inp.q.dtype, kv_data_type=inp.k.dtype)
        return mask

    mask = united_mask()

    def count(m):
        layout = layout_from_block_mask(m.permute(1, 0, 2).repeat_interleave(n // hk, dim=1), inp.geom)
        return layout_pairs(layout, inp.geom)

    return SparseMethod(
        build=lambda: plan(united_mask()),
        attend=lambda m: wrapper.run(qh, kh, vh).transpose(0, 1),
        count=count,
        parts={"estimate_ms": build_bs, "plan_ms": lambda: plan(mask)},
        params={"topk": b.block_topk, "workspace_mib": 128},
    )


# ----------------------------------------------------------------------------------------------------------
# Running the cases
# ----------------------------------------------------------------------------------------------------------


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over [S, H, D] outputs, one head at a time to bound the fp32 temporary."""
    return max(float((a[:, h].float() - b[:, h].float()).abs().max()) for h in range(a.shape[1]))


def run_case(case: str, inp: Inputs, libs, b: Budgets, plan: TimingPlan, refs: dict) -> dict:
    """Measure one case; returns the record fields beyond its identity (raises on failure)."""
    heads, d = inp.q.shape[1], inp.q.shape[2]
    total = causal_pairs(inp.seq_q, inp.seq_k, heads)
    params: dict = {}
    index, parts = None, {}
    if case in ("fa3", "sdpa_cudnn", "sdpa_flash", "flashinfer"):
        fn = {"fa3": lambda: dense_fa3(inp, libs),
              "sdpa_cudnn": lambda: dense_sdpa(inp, libs, "CUDNN_ATTENTION", params),
              "sdpa_flash": lambda: dense_sdpa(inp, libs, "FLASH_ATTENTION", params),
              "flashinfer": lambda: dense_flashinfer(inp, libs)}[case]()
        m = measure(fn, plan)
        out, pairs, visited = m.result, total, total
    else:
        method = sparse_method(case, inp, libs, b)
        params |= method.params
        index = measure(method.build, plan)
        indices = index.result
        parts = {name: median(measure(fn, plan).times_ms) for name, fn in method.parts.items()}
        m = measure(lambda: method.attend(indices), plan)
        out = m.result
        counted = method.count(indices)
        pairs, visited = counted.attended, counted.visited
    ref = CHECK_AGAINST.get(case)
    if ref in refs:
        params["check"] = {"against": ref, "max_abs_diff": max_abs_diff(out, refs[ref])}
    if case in CHECK_AGAINST.values():
        refs[case] = out
    attn_ms = median(m.times_ms)
    return dict(
        attn_ms=attn_ms, attn_ms_all=m.times_ms, pairs=pairs, visited_pairs=visited, density=pairs / total,
        tflops=attention_tflops(pairs, d, attn_ms), peak_mib=m.peak_mib, params=params,
        index_ms=None if index is None else median(index.times_ms),
        index_detail=parts,
        index_peak_mib=None if index is None else index.peak_mib,
    )


def geometries(lengths: list[int], chunk: int) -> list[tuple[int, int]]:
    """(Sq, Sk) pairs: a full prefill per length, plus a ``chunk``-query chunk at the end of longer contexts."""
    out = [(n, n) for n in lengths]
    if chunk:
        out += [(chunk, n) for n in lengths if n > chunk]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8K,16K,32K,64K,128K,256K", help="context lengths, e.g. 8K,32K,131072")
    ap.add_argument("--head-dims", default="128", help="comma list of head dims (64,128,256)")
    ap.add_argument("--chunk", default="0", help="also time a chunk of this many queries against each longer "
                                                  "context (e.g. 8K); 0 = full prefills only")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list from {','.join(CASES)}")
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--vertical", type=int, default=1000)
    ap.add_argument("--slash", type=int, default=6096)
    ap.add_argument("--block-topk", type=int, default=None, help="default (vertical + slash) / 64")
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--local", type=int, default=4096)
    ap.add_argument("--xattn-threshold", type=float, default=0.9, help="xattention: cumulative block share kept")
    ap.add_argument("--xattn-stride", type=int, default=8, help="xattention: antidiagonal stride (4, 8, 16)")
    ap.add_argument("--flex-gamma", type=float, default=0.9, help="flexprefill: cumulative attention mass kept")
    ap.add_argument("--flex-tau", type=float, default=0.1,
                    help="flexprefill: JS distance below which a head uses blocks")
    ap.add_argument("--flex-min-budget", type=int, default=1024, help="flexprefill: fewest keys per row")
    ap.add_argument("--launch", default="", help="our kernel's launch for every head_dim, spelled as chunk_bench's "
                                                  "--launches (e.g. 64x4x3d); default: the kernel's own per head_dim")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions: at most 3 timed calls per case (300 ms budget)")
    ap.add_argument("--resume", action="store_true", help="skip cases the results file already has as ok")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new case after this many seconds (finish later with --resume)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/kernel.json", help="results file (appended to)")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget_s

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"--cases: unknown case {c!r}; known: {', '.join(CASES)}")
    cases = [c for c in CASES if c in cases]  # references run before the cases checked against them
    budgets = Budgets(vertical=args.vertical, slash=args.slash, sink=args.sink, local=args.local,
                      block_topk=args.block_topk or round((args.vertical + args.slash) / BLOCK),
                      xattn_threshold=args.xattn_threshold, xattn_stride=args.xattn_stride,
                      flex_gamma=args.flex_gamma, flex_tau=args.flex_tau, flex_min_budget=args.flex_min_budget)
    plan = TimingPlan(min_reps=1, max_reps=3, budget_ms=300.0) if args.quick else TimingPlan(budget_ms=1000.0)
    head_dims = [int(x) for x in args.head_dims.split(",")]
    chunk = parse_lengths(args.chunk)[0] if args.chunk not in ("0", "") else 0
    try:
        launch = parse_launch_list(args.launch)
    except ValueError as e:
        raise SystemExit(f"--launch: {e}") from None
    if len(launch) > 1:
        raise SystemExit(f"--launch: one launch, got {args.launch!r}")
    launch = launch[0] if launch else None
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA device")

    libs, unavailable = load_libraries()
    results = load_results(args.out, "kernel")
    done = done_keys(results) if args.resume else set()
    run = add_run(results, unavailable=unavailable, settings={
        "cases": cases, "head_dims": head_dims, "lengths": parse_lengths(args.lengths), "chunk": chunk,
        "budgets": budgets.as_json(), "timing": vars(plan), "seed": args.seed,
        "num_q_heads": args.num_q_heads, "num_kv_heads": args.num_kv_heads, "dtype": "bfloat16",
        "launch": launch_name(launch) if launch else "default"})
    for name, why in unavailable.items():
        print(f"[unavailable] {name}: {why}")

    for d in head_dims:
        for seq_q, seq_k in geometries(parse_lengths(args.lengths), chunk):
            todo = [c for c in cases if (*CASES[c], seq_q, seq_k, d, args.num_q_heads, args.num_kv_heads,
                                         "bfloat16") not in done]
            if not todo:
                continue
            inp = make_inputs(seq_q=seq_q, seq_k=seq_k, num_q_heads=args.num_q_heads,
                              num_kv_heads=args.num_kv_heads, head_dim=d, seed=args.seed)
            inp.launch = launch
            refs: dict = {}
            for case in todo:
                if time.monotonic() > deadline:
                    print(f"budget of {args.budget_s:.0f} s spent: stopping before D={d} Sq={seq_q} Sk={seq_k} "
                          f"{case}; rerun the same command with --resume to finish", flush=True)
                    return
                method, pattern = CASES[case]
                rec = KernelRecord(run=run, method=method, pattern=pattern, seq_q=seq_q, seq_k=seq_k, head_dim=d,
                                   num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads,
                                   dtype="bfloat16", status="ok")
                missing = [lib for lib in LIBRARIES[case] if lib not in libs]
                if missing:
                    rec.status, rec.reason = "skipped", f"unavailable: {', '.join(missing)}"
                else:
                    try:
                        for k, val in run_case(case, inp, libs, budgets, plan, refs).items():
                            setattr(rec, k, val)
                    except torch.OutOfMemoryError as e:
                        rec.status, rec.reason = "oom", str(e).split("\n")[0][:500]
                    except NotImplementedError as e:
                        rec.status, rec.reason = "skipped", str(e)
                    except Exception as e:  # one failing method must not lose the others' numbers
                        rec.status, rec.reason = "error", f"{type(e).__name__}: {e}"[:1000]
                    torch.cuda.empty_cache()
                add_record(results, rec)
                save_results(args.out, results)
                print(format_line(rec), flush=True)
            del inp, refs
            torch.cuda.empty_cache()


def format_line(r: KernelRecord) -> str:
    head = f"D={r.head_dim} Sq={r.seq_q} Sk={r.seq_k} {r.method}/{r.pattern}"
    if r.status != "ok":
        return f"{head}: {r.status} ({r.reason})"
    index = "" if r.index_ms is None else f" index {r.index_ms:.2f} ms"
    return (f"{head}: attn {r.attn_ms:.2f} ms{index} density {r.density:.3f} {r.tflops:.0f} TFLOP/s "
            f"peak {r.peak_mib:.0f} MiB" + (f" check {r.params['check']}" if "check" in r.params else ""))


if __name__ == "__main__":
    main()
