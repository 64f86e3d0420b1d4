"""``python -m sgl_minference.tools.eval MODEL --config CONFIG.json``: dense vs sparse accuracy on RULER-style
tasks (``sgl_minference.tools.prompts``).

Generates the task suite offline (exact token lengths, needle depths spread 0-100%), runs it through SGLang's
Engine twice (dense on the backend ``minference`` delegates to, fa3 on Hopper else flashinfer; then ``minference``
sparse with CONFIG), greedy, and writes one results JSON:
accuracy per task x length for each mode, next-token KL(dense || sparse) from top log-probabilities, agreement
rates, the nominal density per length, and the attention recall per full-attention layer of the sparse config
(measured with transformers on a fresh key-value prompt). Also a NIAH heatmap PNG (length x depth, dense and
sparse side by side).

Needs a CUDA GPU (checked before anything is loaded). Results go to ``--out`` (default
``~/.cache/sgl_minference/eval/eval_<model>[_quick].json``, printed at the start; nothing is written into the
working directory unless ``--out`` names it).

``--quick``: passkey / niah_single / niah_multikey at two lengths and three depths. To exercise the sparse path
where a small model still works, lower the gate and the budgets, e.g. ``--min-context 4096 --budget-scale 0.25``
(the results list the resulting nominal density per length).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

from ...cli import fail
from ...config import ConfigError, MInferenceConfig
from ...cpu_torch import allow_torchvision_import
from .checkpoint import OutputStore, digest
from .runner import MODES, EngineSettings, engine_kwargs, evaluate, nominal_density, run_mode, scale_config
from ..gguf_loader import check_model, resolve_model
from ..prompts import DEPTHLESS, TASKS, depth_grid, make_sample, make_suite

PROG = "python -m sgl_minference.tools.eval"
RULER_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
QUICK_TASKS = ("passkey", "niah_single", "niah_multikey")
RESULTS_DIR = Path.home() / ".cache" / "sgl_minference" / "eval"  # default for --out: not the working directory
HEADROOM = 256  # context tokens kept free for generated tokens


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="HF model folder, .gguf file, or pip package holding a GGUF")
    p.add_argument("--config", default=None, help="sparse config (any format sgl_minference.config reads); "
                   "default: the backend's own resolution (model folder, defaults)")
    p.add_argument("--min-context", type=int, default=None, help="sparse length gate (config's min_context)")
    p.add_argument("--routing", action="store_true",
                   help="keep the config's per-layer dense routing (default: off, so every layer past the gate runs "
                        "the sparse path and the accuracy is that of the patterns, not of the speed heuristic)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget of the config")
    p.add_argument("--quick", action="store_true", help="3 needle tasks, 2 lengths, 3 depths, 1 sample")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None)
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="prompt tokens (default: powers of two from 4K to the model's maximum)")
    p.add_argument("--depths", type=int, default=None, help="needle depths spread over 0..1 (default 5, quick 3)")
    p.add_argument("--samples", type=int, default=None,
                   help="prompts per task x length x depth (default 2, quick 1); a depthless task gets samples x "
                        "depths prompts per length, so every task x length cell has the same count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--top-logprobs", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="prompts per Engine.generate call")
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument("--dense-backend", default=None,
                   help="the dense mode's SGLang attention backend (default: the one minference delegates to, "
                        "from the config's dense_backend: fa3 on Hopper, else flashinfer)")
    p.add_argument("--engine-args", default="{}", help="further sglang.Engine keyword arguments as JSON")
    p.add_argument("--no-recall", action="store_true", help="skip the per-layer attention recall")
    p.add_argument("--recall-length", type=int, default=None, help="recall prompt tokens (default: longest length)")
    p.add_argument("--resume", action="store_true",
                   help="keep the outputs an earlier run with the same settings stored beside --out (the file "
                        "<out>.outputs.jsonl) and generate only the prompts still missing")
    p.add_argument("--out", default=None, help="results JSON (default ~/.cache/sgl_minference/eval/eval_<model>[_quick].json)")
    p.add_argument("--heatmap", default=None, help="NIAH heatmap PNG (default: the results path with .png)")
    return p.parse_args(argv)


def default_lengths(max_len: int, quick: bool) -> list[int]:
    top = max_len - HEADROOM
    powers = [n for n in (4096, 8192, 16384, 32768, 65536, 131072) if n <= top]
    lengths = powers + ([top] if not powers or top > powers[-1] * 1.5 else [])
    return [lengths[0], lengths[-1]] if quick and len(lengths) > 1 else lengths


def layer_recall(folder: Path, config: MInferenceConfig, tokenizer, length: int, seed: int) -> dict:
    """Attention recall of ``config`` per full-attention layer on a fresh key-value retrieval prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..search.capture import full_attention_layers
    from ..search.searcher import ScoreSettings, config_recall, layer_summary

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(device).eval()
    layers = full_attention_layers(model.config)
    sample = make_sample("kv_retrieval", tokenizer, length=length, depth=0.5, seed=seed + 1)
    settings = ScoreSettings(skip_rows=min(4096, length // 4), est=config.estimation)
    results = config_recall(model, torch.tensor(sample.input_ids), config, layers=layers, settings=settings)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"length": length, "per_layer": layer_summary(results),
            "per_head": [{"layer": r.layer, "head": r.head, "spec": r.specs[0].model_dump(), "recall": r.recall[0],
                          "keys": r.keys[0]} for r in results]}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sglang", "torch", "transformers", "flashinfer-python", "sglang-kernel", "triton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def gpu_problem() -> str | None:
    """Why this machine cannot run the engines (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU for SGLang's engines (torch.cuda.is_available() is False); nothing was loaded"
    return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    # the arguments first, then the machine, and only then anything heavy (tokenizer, GGUF conversion, engines)
    try:
        base = MInferenceConfig.load(args.config) if args.config else MInferenceConfig()
    except ConfigError as e:
        fail(PROG, f"--config: {e}")
    try:
        extra = json.loads(args.engine_args)
    except json.JSONDecodeError as e:
        fail(PROG, f"--engine-args: not JSON ({e})")
    check_model(PROG, args.model)
    problem = gpu_problem()
    if problem:
        fail(PROG, problem)
    allow_torchvision_import()
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from ..search.capture import full_attention_layers

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_config = AutoConfig.from_pretrained(folder)
    text_cfg = hf_config.get_text_config()
    max_len = text_cfg.max_position_embeddings
    tasks = args.tasks or list(QUICK_TASKS if args.quick else RULER_TASKS)
    lengths = sorted(args.lengths or default_lengths(max_len, args.quick))
    depths = depth_grid(args.depths or (3 if args.quick else 5))
    samples = make_suite(tokenizer, tasks=tasks, lengths=lengths, depths=depths,
                         samples=args.samples or (1 if args.quick else 2), seed=args.seed)

    config = scale_config(base, args.budget_scale)
    if args.min_context is not None:
        config = config.model_copy(update={"min_context": args.min_context})
    if not args.routing:  # routing sends a layer dense from earlier batches' figures: the eval would then mix both
        config = config.model_copy(update={"dense_routing": False})
    stem = f"eval_{folder.name}" + ("_quick" if args.quick else "")
    out = Path(args.out) if args.out else RESULTS_DIR / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"results will be written to {out}", flush=True)
    config_path = out.with_suffix(".sparse_config.json")
    config.save(config_path)

    for key in ("mem_fraction_static", "chunked_prefill_size"):
        if getattr(args, key) is not None:
            extra[key] = getattr(args, key)
    from ...plugin import resolve_dense_backend

    settings = EngineSettings(model_path=str(folder), sparse_overrides={"config_path": str(config_path.resolve())},
                              context_length=min(max_len, max(lengths) + HEADROOM),
                              dense_backend=args.dense_backend or resolve_dense_backend(config.dense_backend),
                              extra=extra)
    common = {"model": folder.name, "context_length": settings.context_length, "extra": extra,
              "top_logprobs": args.top_logprobs}
    store = OutputStore(out.with_suffix(".outputs.jsonl"), {
        mode: digest({**common, "mode": mode, **({"config": json.loads(config_path.read_text())}
                                                   if mode == "sparse" else {"backend": settings.dense_backend})})
        for mode in args.modes},
        resume=args.resume)
    outputs, seconds = {}, {}
    import sglang

    for mode in args.modes:
        todo = store.missing(mode, samples)
        t0 = time.time()
        if todo:
            print(f"{mode}: {len(samples) - len(todo)} of {len(samples)} prompts already answered in "
                  f"{store.path}" if len(todo) < len(samples) else f"{mode}: {len(todo)} prompts", flush=True)
            engine = sglang.Engine(**engine_kwargs(mode, settings))
            try:
                with tqdm(total=len(todo), desc=f"{mode} prompts") as bar:
                    for start in range(0, len(todo), args.batch):  # stored batch by batch: a cut-off run resumes
                        part = todo[start: start + args.batch]
                        store.add(mode, part, run_mode(engine, part, top_logprobs=args.top_logprobs,
                                                       batch=args.batch, progress=bar.update))
            finally:
                engine.shutdown()
        outputs[mode] = store.outputs(mode, samples)
        seconds[mode] = round(time.time() - t0, 1)

    results = evaluate(samples, outputs, min_context=config.min_context)
    layers = full_attention_layers(hf_config)
    results.update({
        "schema": "sgl-minference-eval/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model), "model_folder": folder.name, "host": platform.node(), "versions": versions(),
        "tasks": tasks, "lengths": lengths, "depths": depths, "depthless_tasks": sorted(DEPTHLESS & set(tasks)),
        "seconds": seconds, "dense_backend": settings.dense_backend, "config_source": args.config,
        "budget_scale": args.budget_scale,
        "config": json.loads(config_path.read_text()),
        "nominal_density": {n: nominal_density(config, n, layers, text_cfg.num_attention_heads) for n in lengths},
    })
    if not args.no_recall and "sparse" in args.modes:
        results["attention_recall"] = layer_recall(folder, config, tokenizer, args.recall_length or max(lengths),
                                                   args.seed)
    out.write_text(json.dumps(results, indent=1) + "\n")
    heatmap = Path(args.heatmap) if args.heatmap else out.with_suffix(".png")
    if any(results["niah"].values()):
        from .plots import niah_heatmap

        niah_heatmap(results["niah"], heatmap, title=f"{folder.name}: needle retrieval, dense vs sparse")
    print(f"wrote {out}" + (f" and {heatmap}" if heatmap.exists() else ""))
    for mode in args.modes:
        print(mode, json.dumps(results["accuracy"][mode]))
    if "kl" in results:
        print(f"first-token agreement {results['first_token_agree']:.3f}, output agreement {results['output_agree']:.3f}")
    return results


if __name__ == "__main__":
    main()
