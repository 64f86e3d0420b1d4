"""Shared test helpers: Triton interpreter setup on CPU, random batch geometries and K/V sources.

Imported by pytest before any test module, so ``TRITON_INTERPRET`` is set before triton is first imported; the
interpreter's own fixes live in the package (``sgl_minference.kernels.interpreter``), applied on import.
Test modules may ``from conftest import ...`` the builders below.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sgl_minference.layout import BatchGeometry, KVSource, pool_run_starts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_geometry(seq_lens_q: list[int], prefix_lens: list[int], device=DEVICE) -> BatchGeometry:
    """Batch geometry of chunks of ``seq_lens_q[r]`` queries after ``prefix_lens[r]`` cached keys."""
    return BatchGeometry.build(seq_lens_q, [p + s for p, s in zip(prefix_lens, seq_lens_q)], device)


def make_qkv(geom: BatchGeometry, num_heads: int, num_kv_heads: int, head_dim: int, dtype, *, seed: int = 0,
             device=DEVICE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed q ``[T, Hq, D]`` and k, v ``[sum Sk_r, Hk, D]`` (request after request), N(0, 1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    tokens, keys = sum(geom.seq_lens_q_cpu), sum(geom.seq_lens_k_cpu)
    q = torch.randn(tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(keys, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(keys, num_kv_heads, head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def paged_kv(k: torch.Tensor, v: torch.Tensor, seq_lens_k: list[int], *, seed: int = 0,
             spare_slots: int = 7) -> KVSource:
    """The packed ``k``/``v`` scattered into a shuffled page-size-1 pool, SGLang style.

    Pool rows are a random permutation (plus ``spare_slots`` garbage rows), ``req_to_token`` has a few more
    request slots and columns than needed (filled with -1 past each request's length, so a stray read
    shows up), and ``req_pool_indices`` maps requests to slots out of order.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keys, num_requests = k.shape[0], len(seq_lens_k)
    slots = keys + spare_slots
    rows = torch.randperm(slots, generator=gen)[:keys]  # pool row of each packed key
    pool_k = torch.full((slots, *k.shape[1:]), float("nan"), dtype=k.dtype, device=k.device)
    pool_v = torch.full_like(pool_k, float("nan"))
    pool_k[rows.to(k.device)] = k
    pool_v[rows.to(k.device)] = v
    pool_size = num_requests + 3
    req_pool_indices = torch.randperm(pool_size, generator=gen)[:num_requests]
    req_to_token = torch.full((pool_size, max(seq_lens_k) + 5), -1, dtype=torch.int32)
    start = 0
    for r, sk in enumerate(seq_lens_k):
        req_to_token[req_pool_indices[r], :sk] = rows[start: start + sk].to(torch.int32)
        start += sk
    return KVSource(k=pool_k, v=pool_v, req_to_token=req_to_token.to(k.device),
                    req_pool_indices=req_pool_indices.to(device=k.device, dtype=torch.int64))


def consecutive_pool(kv: KVSource, geom: BatchGeometry, runs: list[bool]) -> KVSource:
    """``kv`` (a paged source) with the requests ``runs`` marks moved to consecutive slots of a larger pool,
    each at its own offset, and ``run_start`` computed; the others keep their shuffled slots."""
    k, v, table = kv.k, kv.v, kv.req_to_token.clone()
    extra = sum(sk for sk, run in zip(geom.seq_lens_k_cpu, runs) if run)
    pool_k = torch.cat([k, torch.full((extra + 3, *k.shape[1:]), float("nan"), dtype=k.dtype, device=k.device)])
    pool_v = torch.cat([v, torch.full_like(pool_k[k.shape[0]:], float("nan"))])
    slot = k.shape[0] + 3  # not 0: a run start that was ignored would read the wrong rows
    for r, (sk, run) in enumerate(zip(geom.seq_lens_k_cpu, runs)):
        if run:
            old = table[kv.req_pool_indices[r], :sk].long()
            pool_k[slot:slot + sk], pool_v[slot:slot + sk] = k[old], v[old]
            table[kv.req_pool_indices[r], :sk] = torch.arange(slot, slot + sk, dtype=table.dtype)
            slot += sk
    return KVSource(k=pool_k, v=pool_v, req_to_token=table, req_pool_indices=kv.req_pool_indices,
                    run_start=pool_run_starts(table, kv.req_pool_indices, geom))
