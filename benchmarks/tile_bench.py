"""Issue 12 probe: what a 128-row query tile buys on Hopper with this stack's Triton, before the sparse kernel is
rebuilt around it.

    python -m benchmarks.tile_bench --length 32K --head-dims 64,128,256 --out benchmarks/results/tile_h200.json

Our sparse kernel runs 64-row programs with one warpgroup (4 warps) and reads K/V by per-key row pointers (the
paged pool's rows), and reaches ~300 TFLOP/s on a dense layout whatever the head size, against FA3's 500-716
(BENCHMARKS.md, H200, 2026-12-03). This benchmark times one plain causal prefill kernel (``_causal_probe_fwd``,
Sq = Sk, 32 query / 8 KV heads, bf16, no layout) in the variants a rebuilt kernel could take, side by side with
FA3 and with our kernel on the dense layout:

* ``block_m`` 64 (4 warps) or 128 (8 warps: two warpgroups share every K/V tile, twice the rows per byte);
* ``block_n`` keys per tile, ``stages`` of software pipelining, ``ws`` (``tl.range(..., warp_specialize=True)``);
* ``load``: ``ptr`` (contiguous K/V by pointers), ``gather`` (every key's row looked up in a shuffled index
  table first, like SGLang's ``req_to_token`` with page size 1: what the prefix costs) or ``tma`` (host tensor
  descriptors for Q, K, V: TMA, possible only for contiguous keys such as the chunk's own).

Each variant's output is checked against FA3's (max |difference|); one that fails to compile or to run is recorded
with its error. TFLOP/s = 4 x head_dim x causal pairs x query heads / time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.common import environment, parse_lengths
from benchmarks.timing import time_ms
from sgl_minference.kernels.constants import LOG2E

HEADS, KV_HEADS = 32, 8


@triton.jit
def _probe_tile(acc, l_i, m_i, q, K, V, k_desc, v_desc, Rows, start_n, kv_off, stride_kt, offs_n, offs_d, offs_m,
                qk_scale, MASK: tl.constexpr, LOAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the ``BLOCK_N`` keys from ``start_n`` into the softmax state (``acc`` [BLOCK_M, BLOCK_D] fp32,
    ``l_i`` / ``m_i`` [BLOCK_M] fp32, base 2); ``MASK``: the diagonal tile, causal cut ``key <= row``."""
    if LOAD == "tma":
        k = k_desc.load([start_n, kv_off]).T
        v = v_desc.load([start_n, kv_off])
    else:
        rows = start_n + offs_n
        if LOAD == "gather":
            rows = tl.load(Rows + rows)
        rows = rows.to(tl.int64)
        k = tl.load(K + kv_off + rows[None, :] * stride_kt + offs_d[:, None])
        v = tl.load(V + kv_off + rows[:, None] * stride_kt + offs_d[None, :])
    qk = tl.dot(q, k) * qk_scale
    if MASK:
        qk = tl.where((start_n + offs_n)[None, :] <= offs_m[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _causal_probe_fwd(Q, K, V, O, q_desc, k_desc, v_desc, o_desc, Rows, seq, stride_qt, stride_kt, qk_scale,
                      group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      LOAD: tl.constexpr, WS: tl.constexpr):
    """Program (m, h): query rows of block ``num_blocks - 1 - m`` (longest rows first), head ``h``. Q / O
    [seq, Hq, D], K / V [seq, Hk, D] (or their 2D descriptors [seq, H * D]); Rows [seq] int32 key rows (gather)."""
    # -- setup: rows, the query tile, the softmax state --
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_off = h * BLOCK_D
    kv_off = (h // group) * BLOCK_D
    if LOAD == "tma":
        q = q_desc.load([start_m, q_off])
    else:
        q = tl.load(Q + offs_m.to(tl.int64)[:, None] * stride_qt + q_off + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # -- phase 1: key tiles left of the block's first row, no mask --
    for start_n in tl.range(0, start_m, BLOCK_N, warp_specialize=WS):
        acc, l_i, m_i = _probe_tile(acc, l_i, m_i, q, K, V, k_desc, v_desc, Rows, start_n, kv_off, stride_kt, offs_n,
                                    offs_d, offs_m, qk_scale, MASK=False, LOAD=LOAD, BLOCK_D=BLOCK_D)
    # -- phase 2: the diagonal tiles, causal mask --
    for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N):
        acc, l_i, m_i = _probe_tile(acc, l_i, m_i, q, K, V, k_desc, v_desc, Rows, start_n, kv_off, stride_kt, offs_n,
                                    offs_d, offs_m, qk_scale, MASK=True, LOAD=LOAD, BLOCK_D=BLOCK_D)
    # -- epilogue --
    o = (acc / l_i[:, None]).to(Q.dtype.element_ty)
    if LOAD == "tma":
        o_desc.store([start_m, q_off], o)
    else:
        tl.store(O + offs_m.to(tl.int64)[:, None] * stride_qt + q_off + offs_d[None, :], o)


def probe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sm_scale: float, block_m: int,
                    block_n: int, stages: int, load: str, ws: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q`` [S, Hq, D] over ``k`` / ``v`` [S, Hk, D] (bf16/fp16, contiguous, S a multiple of
    ``block_m``); ``load="gather"`` reads key ``j`` from row ``rows[j]`` ([S] int32) of ``k`` / ``v``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    seq, heads, dim = q.shape
    if seq % block_m or block_m % block_n:
        raise ValueError(f"seq: {seq} tokens are not whole {block_m}-row blocks of {block_n}-key tiles")
    if load not in ("ptr", "gather", "tma"):
        raise ValueError(f"load: {load!r} is not ptr, gather or tma")
    if (load == "gather") != (rows is not None):
        raise ValueError("rows: needed by load='gather' and only by it")
    o = torch.empty_like(q)
    q2, k2, v2, o2 = (t.view(seq, -1) for t in (q, k, v, o))
    descs = [None] * 4
    if load == "tma":
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=q.device))
        descs = [TensorDescriptor.from_tensor(q2, [block_m, dim]), TensorDescriptor.from_tensor(k2, [block_n, dim]),
                 TensorDescriptor.from_tensor(v2, [block_n, dim]), TensorDescriptor.from_tensor(o2, [block_m, dim])]
    grid = (seq // block_m, heads)
    _causal_probe_fwd[grid](q, k, v, o, *descs, rows if rows is not None else q, seq, q2.stride(0), k2.stride(0),
                            sm_scale * LOG2E, heads // k.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=dim,
                            LOAD=load, WS=ws, num_warps=8 if block_m == 128 else 4, num_stages=stages)
    return o


def variants(head_dim: int) -> list[dict]:
    """The probe's variants for one head size: the full grid at 128, the few that fit shared memory at 256."""
    if head_dim == 256:
        grid = [(128, 64, 2), (64, 64, 2)]
    else:
        grid = [(128, 64, 3), (128, 128, 2), (128, 128, 3), (64, 64, 3)]
    out = []
    for (bm, bn, st), load, ws in itertools.product(grid, ("ptr", "gather", "tma"), (False, True)):
        if ws and (bm == 64 or load == "gather"):
            continue  # warp specialisation is meant for the producer/consumer split of 128-row tiles
        out.append(dict(block_m=bm, block_n=bn, stages=st, load=load, ws=ws))
    return out


def run(length: int, head_dim: int, reps: int, deadline: float) -> list[dict]:
    from sgl_kernel.flash_attn import flash_attn_varlen_func

    from sgl_minference.kernels.sparse_attention import sparse_attention
    from sgl_minference.layout import BatchGeometry, KVSource
    from sgl_minference.testing import full_layout

    torch.manual_seed(0)
    q = torch.randn(length, HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(length, KV_HEADS, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    scale = head_dim ** -0.5
    flops = 4 * head_dim * HEADS * length * (length + 1) / 2
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    perm = torch.randperm(length, device="cuda").to(torch.int32)  # key j lives at pool row perm[j]
    kp, vp = torch.empty_like(k), torch.empty_like(v)
    kp[perm.long()], vp[perm.long()] = k, v

    def fa3():
        return flash_attn_varlen_func(q, k, v, cu, cu, length, length, softmax_scale=scale, causal=True)

    geom = BatchGeometry.build([length], [length], "cuda")
    layout = full_layout(geom, HEADS, "cuda")
    ref = fa3()
    records = []

    def record(name, fn, **params):
        rec = {"case": name, "length": length, "head_dim": head_dim, **params}
        try:
            out = fn()
            if isinstance(out, tuple):
                out = out[0]
            rec["max_abs_diff_vs_fa3"] = (out.float() - ref.float()).abs().max().item()
            rec["ms"] = time_ms(fn, reps)
            rec["tflops"] = flops / rec["ms"] / 1e9
        except Exception as e:  # a variant this Triton cannot compile or run is a result too
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        records.append(rec)
        print(json.dumps(rec), flush=True)

    record("fa3", fa3)
    record("ours_dense", lambda: sparse_attention(q, KVSource.packed(k, v, [length]), layout, geom, sm_scale=scale))
    for var in variants(head_dim):
        if time.time() > deadline:
            records.append({"case": "probe", "length": length, "head_dim": head_dim, **var, "error": "budget"})
            continue
        rows = perm if var["load"] == "gather" else None
        kk, vv = (kp, vp) if rows is not None else (k, v)
        record("probe", lambda var=var, kk=kk, vv=vv, rows=rows: probe_attention(
            q, kk, vv, sm_scale=scale, rows=rows, **var), **var)
    return records


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tile_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--length", default="32K", help="Sq = Sk tokens (a multiple of 128)")
    p.add_argument("--head-dims", default="128,64,256")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=240, help="variants not started by then are recorded as such")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    (length,) = parse_lengths(args.length)
    deadline = time.time() + args.budget_s
    records = [r for d in map(int, args.head_dims.split(",")) for r in run(length, d, args.reps, deadline)]
    Path(args.out).write_text(json.dumps({"command": "python -m benchmarks.tile_bench " + " ".join(argv or []),
                                          "environment": environment(), "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
