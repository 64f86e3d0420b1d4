"""Bad kernel input on a real device: checked mode catches out-of-range indices before the launch, changes no
output, and what it costs; A-shape budgets far beyond the context cost what the context costs.

    python -m benchmarks.bad_input_check --out bad_input.json [--context 32K] [--chunk 8K]

One request of ``--chunk`` new queries at the end of a ``--context``-key context, Llama-3-8B attention shapes
(32 query heads, 8 KV heads, head_dim 128, bf16 on a GPU; fp32 in the CPU interpreter), K/V in a shuffled
page-size-1 pool as SGLang keeps it. Cases (each a record with ``status`` "ok" or "fail" and what was seen):

* ``checked_rejects_<what>``: with ``SGL_MINFERENCE_CHECKED`` on, a pool index one past ``req_to_token``'s rows, a
  slot one past the K/V rows, and a layout column past the context each raise ``ValueError`` naming the tensor.
  These inputs are never run unchecked: on a GPU that is an illegal memory access, which ends the process.
* ``checked_output``: vertical-slash (1000 / 6096) layout plus attention, checked and unchecked: equal outputs.
* ``checked_cost``: median time of that layout + attention, unchecked and checked.
* ``a_shape_huge_budgets``: ``sink`` 1e5 / ``local`` 1e6 against ``sink = local = context``: time of each build
  and whether the layouts agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import TimingPlan, environment, measure, median, parse_lengths
from sgl_minference import layout as layout_mod
from sgl_minference.kernels import sparse_attention
from sgl_minference.layout import BatchGeometry, KVSource, SparseLayout
from sgl_minference.patterns import HeadSet, build_a_shape, build_vertical_slash

HQ, HK, D = 32, 8, 128  # Llama-3-8B attention


def paged_inputs(context: int, chunk: int, device, dtype, *, hq: int, hk: int, d: int, seed: int = 0):
    """q ``[chunk, hq, d]`` and a paged KVSource over a shuffled pool (2 spare pool rows, 64 spare slots)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    geom = BatchGeometry.build([chunk], [context], device)
    q = torch.randn(chunk, hq, d, generator=gen).to(device, dtype)
    slots = context + 64
    k = torch.randn(slots, hk, d, generator=gen).to(device, dtype)
    v = torch.randn(slots, hk, d, generator=gen).to(device, dtype)
    req_to_token = torch.zeros(3, context, dtype=torch.int32)
    req_to_token[1] = torch.randperm(slots, generator=gen)[:context].to(torch.int32)
    kv = KVSource(k=k, v=v, req_to_token=req_to_token.to(device),
                  req_pool_indices=torch.tensor([1], dtype=torch.int64, device=device))
    return geom, q, kv


def _timed(fn, device) -> tuple[float, object]:
    """(median ms, first result): CUDA events on a GPU, one wall-clock call elsewhere (the interpreter)."""
    if device.type == "cuda":
        m = measure(fn, TimingPlan(warmup=1, min_reps=3, max_reps=10, budget_ms=1000.0))
        return median(m.times_ms), m.result
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def _rejected(name: str, call, expect: str) -> dict:
    layout_mod.CHECKED = True
    try:
        call()
        return {"case": name, "status": "fail", "seen": "no error"}
    except ValueError as e:
        ok = str(e).startswith(f"{expect}: ")
        return {"case": name, "status": "ok" if ok else "fail", "seen": str(e)}
    finally:
        layout_mod.CHECKED = False


def run(context: int, chunk: int, device, *, hq: int = HQ, hk: int = HK, d: int = D) -> list[dict]:
    """The cases of the module docstring, as records; ``hq``/``hk`` query/KV heads, head_dim ``d``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    geom, q, kv = paged_inputs(context, chunk, device, dtype, hq=hq, hk=hk, d=d)
    shape = dict(num_q_heads=hq, num_kv_heads=hk, device=device)
    heads = HeadSet.build(list(range(hq)), **shape, vertical=[1000] * hq, slash=[6096] * hq)
    scale = d ** -0.5

    def forward(kv_source=kv):
        layout = build_vertical_slash(q, kv_source, geom, heads, sm_scale=scale)
        return sparse_attention(q, kv_source, layout, geom, sm_scale=scale)

    records = []
    pool_oob = KVSource(k=kv.k, v=kv.v, req_to_token=kv.req_to_token,
                        req_pool_indices=torch.tensor([kv.req_to_token.shape[0]], device=device))
    records.append(_rejected("checked_rejects_pool_index", lambda: forward(pool_oob), "req_pool_indices"))
    table = kv.req_to_token.clone()
    table[1, context // 2] = kv.k.shape[0]
    slot_oob = KVSource(k=kv.k, v=kv.v, req_to_token=table, req_pool_indices=kv.req_pool_indices)
    records.append(_rejected("checked_rejects_slot", lambda: forward(slot_oob), "req_to_token"))
    layout = build_vertical_slash(q, kv, geom, heads, sm_scale=scale)
    bad = SparseLayout(**{n: t.clone() for n, t in vars(layout).items()})
    bad.col_index[0, 0, 0], bad.col_count[0, 0] = context, max(int(bad.col_count[0, 0]), 1)
    records.append(_rejected("checked_rejects_layout_column",
                             lambda: sparse_attention(q, kv, bad, geom, sm_scale=scale), "col_index"))

    plain_ms, (o, lse) = _timed(forward, device)
    layout_mod.CHECKED = True
    try:
        checked_ms, (o_checked, lse_checked) = _timed(forward, device)
    finally:
        layout_mod.CHECKED = False
    equal = torch.equal(o, o_checked) and torch.equal(lse, lse_checked)
    records.append({"case": "checked_output", "status": "ok" if equal else "fail", "equal": equal})
    records.append({"case": "checked_cost", "status": "ok", "unchecked_ms": plain_ms, "checked_ms": checked_ms})

    huge_budgets = HeadSet.build(list(range(hq)), **shape, sink=[10**5] * hq, local=[10**6] * hq)
    at_context = HeadSet.build(list(range(hq)), **shape, sink=[context] * hq, local=[context] * hq)
    huge_ms, huge = _timed(lambda: build_a_shape(geom, huge_budgets), device)
    context_ms, exact = _timed(lambda: build_a_shape(geom, at_context), device)
    same = huge.same_as(exact)
    records.append({"case": "a_shape_huge_budgets", "status": "ok" if same else "fail", "same_layout": same,
                    "huge_budgets_ms": huge_ms, "context_budgets_ms": context_ms})
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--context", default="32K", help="keys of the request's context (K = 1024)")
    parser.add_argument("--chunk", default="8K", help="new queries at its end")
    args = parser.parse_args(argv)
    context, chunk = parse_lengths(args.context)[0], parse_lengths(args.chunk)[0]
    if not 0 < chunk <= context:
        parser.error(f"--chunk {chunk} must be in [1, --context {context}]")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = run(context, chunk, device)
    result = {**environment(), "settings": {"context": context, "chunk": chunk, "heads": [HQ, HK], "head_dim": D},
              "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [r["case"] for r in records if r["status"] != "ok"]
    print(json.dumps(records, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
