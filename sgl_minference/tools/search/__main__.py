"""``python -m sgl_minference.tools.search MODEL --output CONFIG.json``: offline kernel-aware pattern search.

MODEL is a Hugging Face model folder, a ``.gguf`` file or a pip package shipping one (converted once with
``sgl_minference.tools.gguf_loader``). A synthetic key-value retrieval prompt of ``--length`` tokens (default:
the model's maximum context, at most 32768) is run through the model with transformers; every query head of
every full-attention layer gets the candidate (``sgl_minference.tools.search.candidates``) with the best
attention recall within the budget. Sliding-window layers are not searched and stay dense. Writes the config
(``sgl-minference/v1``) and a report of every candidate's recall and cost next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ...cli import fail
from ...cpu_torch import allow_torchvision_import
from ..gguf_loader import check_model, resolve_model
from ..prompts import make_sample
from .candidates import ADAPTIVE, SEARCHED, budget_for, candidate_space
from .capture import full_attention_layers
from .searcher import ScoreSettings, layer_summary, search_model, to_config

DEFAULT_MAX_LENGTH = 32768
PROG = "python -m sgl_minference.tools.search"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="HF model folder, .gguf file, or pip package holding a GGUF")
    p.add_argument("--output", "-o", required=True, help="config file to write (JSON, sgl-minference/v1)")
    p.add_argument("--length", type=int, default=None,
                   help=f"calibration prompt tokens (default: the model's maximum, at most {DEFAULT_MAX_LENGTH})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, default=0.1,
                        help="share of the causal attention each candidate computes (default 0.1)")
    budget.add_argument("--budget", type=int, default=None, help="keys per query row instead of --density")
    p.add_argument("--patterns", nargs="+", choices=SEARCHED + ADAPTIVE, default=list(SEARCHED),
                   help=f"pattern types to search (default {' '.join(SEARCHED)}; the adaptive ones are fitted to "
                        "the budget per head)")
    p.add_argument("--row-block", type=int, default=1024, help="query rows per streamed softmax block")
    p.add_argument("--skip-rows", type=int, default=None,
                   help="rows left out of the recall average (default min(4096, length // 4))")
    p.add_argument("--slack", type=float, default=1.5,
                   help="a candidate may visit at most slack x budget keys per row to be chosen")
    p.add_argument("--dense-below", type=float, default=0.0,
                   help="heads whose best recall is below this stay dense (default 0: every searched head sparse)")
    p.add_argument("--min-context", type=int, default=None, help="the config's min_context (default: its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0, help="calibration prompt seed")
    p.add_argument("--cache-dir", default=None, help="where a GGUF is converted (default ~/.cache/sgl_minference)")
    p.add_argument("--report", default=None, help="report JSON (default: OUTPUT with .report.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_model(PROG, args.model)
    allow_torchvision_import()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(args.model, args.cache_dir)
    hf_config = AutoConfig.from_pretrained(folder)  # the search's shape first: a bad budget stops before the weights
    text_cfg = hf_config.get_text_config()
    max_len = getattr(text_cfg, "max_position_embeddings", DEFAULT_MAX_LENGTH)
    length = args.length or min(max_len, DEFAULT_MAX_LENGTH)
    layers = full_attention_layers(hf_config)
    if not layers:
        fail(PROG, f"model: {folder} has no full-attention layer to search")
    try:
        budget = args.budget or budget_for(length, args.density)
        candidates = candidate_space(budget, types=args.patterns)
    except ValueError as e:
        fail(PROG, f"--budget / --density: {e}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(args.device).eval()
    settings = ScoreSettings(row_block=args.row_block,
                             skip_rows=min(4096, length // 4) if args.skip_rows is None else args.skip_rows)
    sample = make_sample("kv_retrieval", tokenizer, length=length, depth=0.5, seed=args.seed)
    ids = torch.tensor(sample.input_ids, dtype=torch.int64)
    print(f"search: {folder.name}, {length} tokens, layers {layers}, budget {budget} keys/row, "
          f"{len(candidates)} candidates", flush=True)
    t0 = time.time()
    results = search_model(model, ids, layers=layers, candidates=candidates, budget=budget, settings=settings,
                           slack=args.slack, progress=not args.no_progress)
    extra = {} if args.min_context is None else {"min_context": args.min_context}
    config = to_config(results, num_layers=text_cfg.num_hidden_layers, num_heads=text_cfg.num_attention_heads,
                       dense_below=args.dense_below, **extra)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    config.save(out)
    report = {
        "model": str(args.model), "length": length, "budget": budget, "density": budget * 2 / (length + 1),
        "layers": layers, "patterns": args.patterns, "dense_below": args.dense_below, "skip_rows": settings.skip_rows, "row_block": settings.row_block, "slack": args.slack,
        "seconds": round(time.time() - t0, 2), "layer_recall": layer_summary(results),
        "heads": [r.as_dict() for r in results],
    }
    report_path = Path(args.report) if args.report else out.with_suffix(".report.json")
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    chosen: dict[str, int] = {}
    for per_head in config.heads.values():
        for spec in per_head.values():
            chosen[spec.type] = chosen.get(spec.type, 0) + 1
    print(f"wrote {out} ({chosen}) and {report_path}; mean recall per layer "
          + ", ".join(f"{k}: {v:.3f}" for k, v in report["layer_recall"].items()), flush=True)
    return report


if __name__ == "__main__":
    main()
