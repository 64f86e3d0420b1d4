"""``python -m sgl_minference.tools.search MODEL --output CONFIG.json``: offline kernel-aware pattern search.

MODEL is a Hugging Face model folder, a ``.gguf`` file or a pip package shipping one (converted once with
``sgl_minference.tools.gguf_loader``). A synthetic key-value retrieval prompt of ``--length`` tokens (default:
the model's maximum context, at most 32768) is run through the model with transformers; every query head of
every full-attention layer gets the candidate (``sgl_minference.tools.search.candidates``) with the best
attention recall within the budget.

``--calibration TASK[@DEPTH] ...`` calibrates on several prompts instead (any task of
``sgl_minference.tools.prompts``, needle at DEPTH, default 0.5; all with ``--seed``, so pick one the eval does
not use): the candidates are fitted on the first and scored on all, and a candidate's recall is its lowest over
them. ``--tail-rows N`` also scores each prompt's last N rows (its question) on their own and takes the lower
recall, so a head whose question rows lose the needle fails the target even when the mean over all rows is high.

``--resume`` keeps every head's scores in ``OUTPUT.partial.jsonl`` as they come, so a run cut off (a device
call's time limit) is repeated with the same command and scores only the heads still missing.

Sliding-window layers are not searched and stay dense. Writes the config (``sgl-minference/v1``) and a report of
every candidate's recall and cost next to it.

With ``--target-recall R``, ``--density`` / ``--budget`` may be a ladder of several values: every head's
candidates are fitted and scored at every budget (the layer's Q/K captured once), and the head gets the candidate
with the fewest realised keys per row among those with recall >= R, keys within ``--slack`` x their own
budget and fewer than ``--max-key-share`` x the head's causal keys (default 1: fewer than dense, which reads as
many keys exactly); a head where none qualifies stays dense. Without it exactly one density / budget is allowed (and
``--dense-below``, the other answer to a head that misses, is refused with it).

The report lists the ladder (``budgets``, ``densities``, ascending), ``target_recall``, ``max_key_share``, the
``calibration`` prompts, ``tail_rows``, each head's ``causal_keys`` (mean per scored row) and each candidate's
``budget`` (and ``tail_recall``; with several prompts ``prompt_recall``, its score on each); ``best`` indexes the
head's candidate list (all budgets together), ``null`` where no candidate met the
target (such a head counts as recall 1.0 in ``layer_recall``: dense is exact). ``"dense": true`` marks every head
the config leaves dense (``--dense-below`` ones included); ``dense_heads`` counts them and ``key_share`` is the
mean realised keys per scored row over the searched heads as a share of the causal keys (dense heads 1.0).
``budget`` / ``density`` are the largest rung (the one budget of a one-budget run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ...cli import fail
from ...cpu_torch import allow_torchvision_import
from ..gguf_loader import check_model, resolve_model
from ..prompts import make_sample, parse_prompt
from .candidates import ADAPTIVE, SEARCHED, budget_for, candidate_space
from .capture import full_attention_layers
from .searcher import Checkpoint, ScoreSettings, search_model, to_config, write_outputs

DEFAULT_MAX_LENGTH = 32768
DEFAULT_CALIBRATION = "kv_retrieval@0.5"
PROG = "python -m sgl_minference.tools.search"


def parse_calibration(items: list[str]) -> list[tuple[str, float]]:
    """``TASK[@DEPTH]`` strings as ``(task, depth)``; exits with a one-line error naming ``--calibration``."""
    try:
        return [parse_prompt(item) for item in items]
    except ValueError as e:
        fail(PROG, f"--calibration: {e}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="HF model folder, .gguf file, or pip package holding a GGUF")
    p.add_argument("--output", "-o", required=True, help="config file to write (JSON, sgl-minference/v1)")
    p.add_argument("--length", type=int, default=None,
                   help=f"calibration prompt tokens (default: the model's maximum, at most {DEFAULT_MAX_LENGTH})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, nargs="+", default=None,
                        help="share of the causal attention each candidate computes (default 0.1); several values "
                             "(a ladder) with --target-recall")
    budget.add_argument("--budget", type=int, nargs="+", default=None,
                        help="keys per query row instead of --density; several values with --target-recall")
    p.add_argument("--target-recall", type=float, default=None,
                   help="each head gets its cheapest candidate (fewest realised keys per row, over the whole "
                        "ladder) with at least this recall, or stays dense when none reaches it")
    p.add_argument("--patterns", nargs="+", choices=SEARCHED + ADAPTIVE, default=list(SEARCHED),
                   help=f"pattern types to search (default {' '.join(SEARCHED)}; the adaptive ones are fitted to "
                        "the budget per head)")
    p.add_argument("--calibration", nargs="+", default=[DEFAULT_CALIBRATION], metavar="TASK[@DEPTH]",
                   help=f"calibration prompts (default {DEFAULT_CALIBRATION}): tasks of the eval's prompt set, the "
                        "asked needle at DEPTH (default 0.5); fitted on the first, each candidate's lowest recall "
                        "over all")
    p.add_argument("--tail-rows", type=int, default=0,
                   help="also score each prompt's last this many rows (its question) apart; the lower recall counts")
    p.add_argument("--row-block", type=int, default=1024, help="query rows per streamed softmax block")
    p.add_argument("--skip-rows", type=int, default=None,
                   help="rows left out of the recall average (default min(4096, length // 4))")
    p.add_argument("--slack", type=float, default=1.5,
                   help="a candidate may visit at most slack x budget keys per row to be chosen")
    p.add_argument("--max-key-share", type=float, default=1.0,
                   help="with --target-recall: a candidate must keep fewer than this share of the head's causal keys "
                        "per row (default 1: fewer than dense, which is exact)")
    p.add_argument("--dense-below", type=float, default=0.0,
                   help="heads whose best recall is below this stay dense (default 0: every searched head sparse)")
    p.add_argument("--min-context", type=int, default=None, help="the config's min_context (default: its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0, help="calibration prompt seed")
    p.add_argument("--cache-dir", default=None, help="where a GGUF is converted (default ~/.cache/sgl_minference)")
    p.add_argument("--report", default=None, help="report JSON (default: OUTPUT with .report.json)")
    p.add_argument("--resume", action="store_true",
                   help="append every scored head to OUTPUT with .partial.jsonl and, when that file is left from a run "
                        "with the same settings that was cut off, score only the heads it lacks (removed once done)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rungs = args.budget or args.density or [0.1]
    if args.target_recall is None and len(rungs) > 1:
        fail(PROG, f"--{'budget' if args.budget else 'density'}: {len(rungs)} values need --target-recall "
                   "(without a recall target the search takes one budget)")
    if args.target_recall is not None and args.dense_below:
        fail(PROG, "--target-recall and --dense-below both decide which heads stay dense: pass one of them")
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        fail(PROG, f"--target-recall: {args.target_recall} is not in (0, 1]")
    if not 0.0 < args.max_key_share <= 1.0:
        fail(PROG, f"--max-key-share: {args.max_key_share} is not in (0, 1]")
    if args.tail_rows < 0:
        fail(PROG, f"--tail-rows: {args.tail_rows} is negative")
    calibration = parse_calibration(args.calibration)
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
        budgets = sorted(set(args.budget or [budget_for(length, d) for d in rungs]))
        ladder = [candidate_space(b, types=args.patterns) for b in budgets]
    except ValueError as e:
        fail(PROG, f"--budget / --density: {e}")
    budget, candidates = budgets[-1], [c for cands in ladder for c in cands]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").to(args.device).eval()
    settings = ScoreSettings(row_block=args.row_block,
                             skip_rows=min(4096, length // 4) if args.skip_rows is None else args.skip_rows,
                             tail_rows=args.tail_rows)
    prompts = [torch.tensor(make_sample(task, tokenizer, length=length, depth=depth, seed=args.seed).input_ids,
                            dtype=torch.int64) for task, depth in calibration]
    target = "" if args.target_recall is None else f", target recall {args.target_recall}"
    print(f"search: {folder.name}, {length} tokens, layers {layers}, budget {'/'.join(map(str, budgets))} "
          f"keys/row{target}, {len(candidates)} candidates, calibration {' '.join(args.calibration)}"
          + (f", tail rows {args.tail_rows}" if args.tail_rows else ""), flush=True)
    out = Path(args.output)
    checkpoint = None
    if args.resume:  # what decides a head's scores; the choice (target, slack, key share) is made after them all
        try:
            checkpoint = Checkpoint(out.with_suffix(".partial.jsonl"), dict(
                model=str(args.model), length=length, budgets=budgets, patterns=args.patterns,
                calibration=args.calibration, tail_rows=args.tail_rows, seed=args.seed, dtype=args.dtype,
                skip_rows=settings.skip_rows, row_block=settings.row_block))
        except ValueError as e:
            fail(PROG, f"--resume: {e}")
    t0 = time.time()
    results = search_model(model, prompts, layers=layers, candidates=ladder, budget=budgets, settings=settings,
                           slack=args.slack, target_recall=args.target_recall, max_key_share=args.max_key_share,
                           progress=not args.no_progress, checkpoint=checkpoint)
    extra = {} if args.min_context is None else {"min_context": args.min_context}
    config = to_config(results, num_layers=text_cfg.num_hidden_layers, num_heads=text_cfg.num_attention_heads,
                       dense_below=args.dense_below, **extra)
    info = {
        "model": str(args.model), "length": length, "budget": budget, "density": budget * 2 / (length + 1),
        "budgets": budgets, "densities": [b * 2 / (length + 1) for b in budgets],
        "target_recall": args.target_recall,
        "layers": layers, "patterns": args.patterns, "dense_below": args.dense_below, "skip_rows": settings.skip_rows,
        "row_block": settings.row_block, "slack": args.slack, "tail_rows": args.tail_rows, "seed": args.seed,
        "calibration": [{"task": t, "depth": d} for t, d in calibration], "max_key_share": args.max_key_share,
        "seconds": round(time.time() - t0, 2),
    }
    report = write_outputs(results, config, out, Path(args.report) if args.report else None, info)
    if checkpoint is not None:
        checkpoint.path.unlink()
    return report


if __name__ == "__main__":
    main()
