"""Index-building benchmark: where the vertical-slash and block-sparse estimates spend their time, per kernel.

One 8K-query chunk (``--chunk``) at the end of each context (``--contexts``), Llama-3-8B attention shapes (32
query / 8 KV heads, head_dim 128) and Llama-3.2-1B ones (32 / 8, head_dim 64), bf16, default budgets vertical
1000 / slash 6096 / block top-k 111, planted inputs of ``benchmarks.kernel_bench.make_inputs``. Per case:

* ``ms``: median CUDA-event time of each public step: ``lastq_scores``, ``estimate_vertical_slash`` (last-q sums +
  selection), ``indices_to_layout``, ``build_vertical_slash`` (all of it), ``build_block_sparse``, and the sparse
  attention on each layout; ``bound_k_read_ms``: one read of the keys (``k.amax()``), the memory bound of a pass;
* ``kernels_vs`` / ``kernels_bs``: device time per kernel name (torch.profiler) of one build, whatever the
  implementation (the old and the new code name their kernels differently);
* ``ratio_vs`` / ``ratio_bs``: index time / sparse attention time of that chunk;
* ``checks``: the last-q sums against plain fp32 torch (up to ``--check-max`` keys); the selection against the
  sums it came from (no unselected score above a selected one, forced entries aside); with ``--check FILE`` the
  selections and layouts against another implementation's ``--dump`` (layouts of the same indices must be
  identical; selections may differ on near-ties of differently rounded sums, so agreement is reported).

Old vs new on one GPU: run the old checkout's package through ``--src`` and dump, then the new one and check::

    python -m benchmarks.estimate_bench --src /path/to/old --label before --dump /tmp/before.pt --out before.json
    python -m benchmarks.estimate_bench --label after --check /tmp/before.pt --out after.json
    python -m benchmarks.estimate_bench --compare before.json after.json

``--sweep`` also times ``lastq_scores`` over launch variants (new code only) at ``--sweep-contexts``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from benchmarks.timing import kernel_times, time_ms

SCHEMA = "sgl-minference-estimate-bench/1"
MODELS = {  # name -> (query heads, KV heads, head_dim)
    "8b": (32, 8, 128),
    "1b": (32, 8, 64),
    "tiny": (4, 2, 64),  # CPU plumbing test only
}


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def reference_sums(q, k, seq_k: int, group: int, sm_scale: float, heads: list[int]) -> tuple[torch.Tensor, ...]:
    """Plain fp32 torch column / diagonal sums of the last 64 queries, one head at a time: ([H, Sk], [H, Sk])."""
    n = min(64, q.shape[0])
    pos = torch.arange(seq_k - n, seq_k, device=q.device).view(-1, 1)
    keys = torch.arange(seq_k, device=q.device).view(1, -1)
    off = (pos - keys).clamp(min=0)
    cols, diags = [], []
    for h in heads:
        s = (q[-n:, h].float() @ k[:, h // group].float().T) * sm_scale
        p = s.masked_fill(keys > pos, float("-inf")).softmax(-1)
        cols.append(p.sum(0))
        diags.append(torch.zeros(seq_k, device=q.device).index_add_(0, off.flatten(), p.flatten()))
    return torch.stack(cols), torch.stack(diags)


def selection_is_top(scores: torch.Tensor, chosen: torch.Tensor, forced: int) -> bool:
    """No unselected entry scores above a selected one (``scores``/``chosen`` ``[H, N]``; forced ones aside)."""
    n = scores.shape[-1]
    free = torch.arange(n, device=scores.device) >= forced
    valid = scores >= 0
    low = torch.where(chosen & free, scores, float("inf")).amin(-1)
    high = torch.where(~chosen & free & valid, scores, float("-inf")).amax(-1)
    return bool((low >= high).all())


def positions_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[H, W] int positions (out-of-range = unused) -> [H, n] bool."""
    m = torch.zeros(idx.shape[0], n + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(1, torch.where((idx >= 0) & (idx < n), idx, n).long(), True)
    return m[:, :n]


def layout_digest(layout) -> torch.Tensor:
    """Per (query block, head): counts and two polynomial hashes of its valid ranges and columns, int64
    ``[NQB, H, 6]``: equal digests <=> (up to hash collisions) the same ranges in the same order."""
    def hashes(values: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = torch.arange(values.shape[-1], device=values.device) < count.unsqueeze(-1)
        v = torch.where(valid, values.long(), 0)
        i = torch.arange(values.shape[-1], device=values.device, dtype=torch.int64)
        return (v * (i * 2654435761 % 1000003 + 1)).sum(-1), (v * v % 999983 * (i + 7)).sum(-1)

    a, b = hashes(layout.block_start, layout.block_count)
    c, _ = hashes(layout.block_end, layout.block_count)
    d, _ = hashes(layout.col_index, layout.col_count)
    return torch.stack([layout.block_count.long(), layout.full_count.long(), a, b, c + 31 * d], -1)


# ----------------------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------------------


def load_package(src: str | None):
    """``sgl_minference`` (from ``src`` when given: another checkout, e.g. the code before a change)."""
    if src:
        sys.path.insert(0, str(Path(src).resolve()))
    pkg = importlib.import_module("sgl_minference")
    if src and not Path(pkg.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"--src: sgl_minference imported from {pkg.__file__}, not from {src}")
    return pkg


def make_case(model: str, seq_q: int, seq_k: int, seed: int, device: str):
    from benchmarks.kernel_bench import make_inputs
    from sgl_minference.layout import KVSource

    hq, hk, d = MODELS[model]
    inp = make_inputs(seq_q=seq_q, seq_k=seq_k, num_q_heads=hq, num_kv_heads=hk, head_dim=d, seed=seed,
                      device=device)
    if device == "cpu":  # the Triton interpreter computes bf16 dots wrongly: fp32 off the GPU
        inp.q, inp.k, inp.v = inp.q.float(), inp.k.float(), inp.v.float()
        inp.kv = KVSource.packed(inp.k, inp.v, [seq_k])
    return inp


def run_case(args, model: str, seq_q: int, seq_k: int, reference: dict | None, dump: dict | None) -> dict:
    from sgl_minference import patterns
    from sgl_minference.kernels import sparse_attention
    from sgl_minference.kernels.estimate import lastq_scores
    from sgl_minference.patterns.convert import indices_to_layout

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hk, d = MODELS[model]
    inp = make_case(model, seq_q, seq_k, args.seed, dev)
    hs_vs = patterns.HeadSet.build(list(range(hq)), num_q_heads=hq, num_kv_heads=hk, device=dev,
                                   vertical=[args.vertical] * hq, slash=[args.slash] * hq)
    hs_bs = patterns.HeadSet.build(list(range(hq)), num_q_heads=hq, num_kv_heads=hk, device=dev,
                                   topk=[args.block_topk] * hq)
    opts = dict(sm_scale=inp.sm_scale, last_q=64, forced_sink=args.forced_sink, forced_local=args.forced_local)
    q, kv, geom = inp.q, inp.kv, inp.geom

    def lastq():
        return lastq_scores(q, kv, geom, hs_vs.q_head, hs_vs.kv_head, sm_scale=inp.sm_scale)

    def estimate():
        return patterns.estimate_vertical_slash(q, kv, geom, hs_vs, **opts)

    columns, offsets = estimate()

    def layout_vs():
        return indices_to_layout(columns, offsets, geom)

    def build_vs():
        return patterns.build_vertical_slash(q, kv, geom, hs_vs, **opts)

    def build_bs():
        return patterns.build_block_sparse(q, kv, geom, hs_bs)

    lay_vs, lay_bs = layout_vs(), build_bs()
    reps = args.reps
    ms = {"lastq_scores": time_ms(lastq, reps), "estimate_vertical_slash": time_ms(estimate, reps),
          "indices_to_layout": time_ms(layout_vs, reps), "build_vertical_slash": time_ms(build_vs, reps),
          "build_block_sparse": time_ms(build_bs, reps)}
    ms["attention_vs"] = time_ms(lambda: sparse_attention(q, kv, lay_vs, geom, sm_scale=inp.sm_scale), reps)
    ms["attention_bs"] = time_ms(lambda: sparse_attention(q, kv, lay_bs, geom, sm_scale=inp.sm_scale), reps)
    rec = {"model": model, "num_q_heads": hq, "num_kv_heads": hk, "head_dim": d, "seq_q": seq_q, "seq_k": seq_k,
           "label": args.label, "ms": ms, "bound_k_read_ms": time_ms(lambda: inp.k.amax(), reps),
           "ratio_vs": ms["build_vertical_slash"] / ms["attention_vs"],
           "ratio_bs": ms["build_block_sparse"] / ms["attention_bs"]}
    if torch.cuda.is_available() and not args.no_profile:
        rec["kernels_vs"] = kernel_times(build_vs, 3)[0]
        rec["kernels_bs"] = kernel_times(build_bs, 3)[0]

    # -- checks
    checks: dict = {}
    col, diag = lastq()
    if seq_k <= args.check_max:
        ref_col, ref_diag = reference_sums(q, inp.k, seq_k, hq // hk, inp.sm_scale, list(range(hq)))
        checks["lastq_max_abs_diff"] = max(float((col[0] - ref_col).abs().max()),
                                           float((diag[0] - ref_diag).abs().max()))
    checks["columns_are_top"] = selection_is_top(col[0], positions_mask(columns[0], seq_k), args.forced_sink)
    checks["offsets_are_top"] = selection_is_top(diag[0], positions_mask(offsets[0], seq_k), args.forced_local)
    key = f"{model}/{seq_q}/{seq_k}"
    mine = {"columns": columns[0].cpu(), "offsets": offsets[0].cpu(), "digest_vs": layout_digest(lay_vs).cpu(),
            "digest_bs": layout_digest(lay_bs).cpu()}
    if dump is not None:
        dump[key] = mine
    if reference is not None and key in reference:
        other = reference[key]
        same_c = positions_mask(other["columns"].to(dev), seq_k) == positions_mask(columns[0], seq_k)
        same_o = positions_mask(other["offsets"].to(dev), seq_k) == positions_mask(offsets[0], seq_k)
        checks["heads_same_columns"] = float(same_c.all(-1).float().mean())
        checks["heads_same_offsets"] = float(same_o.all(-1).float().mean())
        checks["positions_differing"] = int((~same_c).sum() + (~same_o).sum())
        their = indices_to_layout(other["columns"][None].to(dev), other["offsets"][None].to(dev), geom)
        checks["layout_of_their_indices_identical"] = bool(torch.equal(layout_digest(their).cpu(),
                                                                       other["digest_vs"]))
        checks["block_sparse_blocks_identical"] = float((mine["digest_bs"] == other["digest_bs"]).all(-1)
                                                        .float().mean())
    rec["checks"] = checks
    return rec


# ----------------------------------------------------------------------------------------------------------
# Launch sweep (new code only)
# ----------------------------------------------------------------------------------------------------------


def sweep(args, model: str, seq_q: int, seq_k: int) -> list[dict]:
    from sgl_minference.kernels.estimate import LastqLaunch, lastq_launch, lastq_scores
    from sgl_minference.patterns import HeadSet

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hq, hk, d = MODELS[model]
    inp = make_case(model, seq_q, seq_k, args.seed, dev)
    hs = HeadSet.build(list(range(hq)), num_q_heads=hq, num_kv_heads=hk, device=dev)
    base = lastq_launch(hq // hk, hq, d)
    ref = lastq_scores(inp.q, inp.kv, inp.geom, hs.q_head, hs.kv_head, sm_scale=inp.sm_scale, launch=base)
    variants = [base] + [LastqLaunch(lse_heads=lh, lse_warps=lw, scores_heads=sh, scores_warps=sw, num_stages=st,
                                     waves=wv)
                         for lh, lw in ((2, 8), (4, 8), (4, 16)) for sh, sw in ((1, 4), (2, 8), (4, 8), (4, 16))
                         for st in ((2, 3) if d <= 128 else (2,)) for wv in (1, 2, 4)
                         if (lh, lw, sh, sw) != (base.lse_heads, base.lse_warps, base.scores_heads, base.scores_warps)
                         or (st, wv) != (base.num_stages, base.waves)]
    out = []
    for launch in variants[: args.sweep_max]:
        row = {"model": model, "seq_q": seq_q, "seq_k": seq_k, "launch": vars(launch).copy()}
        try:
            got = lastq_scores(inp.q, inp.kv, inp.geom, hs.q_head, hs.kv_head, sm_scale=inp.sm_scale, launch=launch)
            row["max_abs_diff_vs_default"] = max(float((got[0] - ref[0]).abs().max()),
                                                 float((got[1] - ref[1]).abs().max()))
            row["ms"] = time_ms(lambda: lastq_scores(inp.q, inp.kv, inp.geom, hs.q_head, hs.kv_head,
                                                     sm_scale=inp.sm_scale, launch=launch), args.reps)
        except Exception as e:  # e.g. OutOfResources for a stack too big for shared memory
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------
# Comparison table
# ----------------------------------------------------------------------------------------------------------

COLUMNS = [("lastq", "lastq_scores"), ("estimate", "estimate_vertical_slash"), ("layout", "indices_to_layout"),
           ("vs total", "build_vertical_slash"), ("vs attn", "attention_vs"), ("bs total", "build_block_sparse"),
           ("bs attn", "attention_bs")]


def compare(paths: list[str]) -> str:
    """Markdown table: per (model, Sk), each file's step times in ms (files in the order given)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    lines = []
    for f, p in zip(files, paths):
        run = f["run"]
        lines.append(f"- `{p}`: {run['device']}, {run['date']}: `{run['command']}`")
    head = "| model | Sk | file | " + " | ".join(c for c, _ in COLUMNS) + " | vs/attn | bs/attn | k read |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    keys = sorted({(r["model"], r["seq_k"]) for f in files for r in f["records"]}, key=lambda x: (x[0], x[1]))
    for model, sk in keys:
        for f, p in zip(files, paths):
            for r in f["records"]:
                if (r["model"], r["seq_k"]) == (model, sk) and "ms" in r:
                    cells = " | ".join(f"{r['ms'][k]:.3f}" for _, k in COLUMNS)
                    lines.append(f"| {model} | {sk} | {r['label'] or Path(p).stem} | {cells} | "
                                 f"{r['ratio_vs']:.3f} | {r['ratio_bs']:.3f} | {r['bound_k_read_ms']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------


def parse_lengths(text: str) -> list[int]:
    from benchmarks.common import parse_lengths as parse

    return parse(text)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="8b,1b", help=f"comma list of {','.join(MODELS)}")
    ap.add_argument("--contexts", default="32K,64K,128K,256K,512K,1M", help="keys per request (prefix + chunk)")
    ap.add_argument("--chunk", default="8K", help="queries of the chunk")
    ap.add_argument("--vertical", type=int, default=1000)
    ap.add_argument("--slash", type=int, default=6096)
    ap.add_argument("--block-topk", type=int, default=111)
    ap.add_argument("--forced-sink", type=int, default=30)
    ap.add_argument("--forced-local", type=int, default=100)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="", help="name of this implementation in the comparison table")
    ap.add_argument("--src", default=None, help="import sgl_minference from this checkout (e.g. the old code)")
    ap.add_argument("--dump", default=None, help="save selections and layout digests here (torch.save)")
    ap.add_argument("--check", default=None, help="compare against another run's --dump")
    ap.add_argument("--check-max", default="256K", help="check the last-q sums against torch up to this Sk")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile")
    ap.add_argument("--sweep", action="store_true", help="also sweep lastq_scores launch variants (new code)")
    ap.add_argument("--sweep-contexts", default="256K")
    ap.add_argument("--sweep-max", type=int, default=40, help="variants per sweep case at most")
    ap.add_argument("--compare", nargs="+", default=None, help="print the table of these result files and exit")
    ap.add_argument("--out", default=None, help="results JSON (required unless --compare)")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return None
    if not args.out:
        raise SystemExit("--out is required")
    load_package(args.src)
    from benchmarks.common import environment

    args.check_max = parse_lengths(args.check_max)[0]
    seq_q = parse_lengths(args.chunk)[0]
    reference = torch.load(args.check) if args.check else None
    dump: dict | None = {} if args.dump else None
    results = {"schema": SCHEMA, "run": environment(), "settings": {k: v for k, v in vars(args).items()},
               "records": [], "sweep": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model in args.models.split(","):
        for seq_k in parse_lengths(args.contexts):
            try:
                rec = run_case(args, model, min(seq_q, seq_k), seq_k, reference, dump)
            except torch.OutOfMemoryError as e:
                rec = {"model": model, "seq_q": min(seq_q, seq_k), "seq_k": seq_k, "error": str(e)[:300]}
            results["records"].append(rec)
            print(json.dumps({k: rec.get(k) for k in ("model", "seq_k", "ms", "ratio_vs", "ratio_bs", "checks")}),
                  flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
            if dump is not None:  # after every case: a run cut short still leaves a usable dump
                torch.save(dump, args.dump)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if args.sweep:
            for seq_k in parse_lengths(args.sweep_contexts):
                results["sweep"] += sweep(args, model, min(seq_q, seq_k), seq_k)
                out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
