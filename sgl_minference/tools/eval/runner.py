"""Dense vs sparse runs of the task suite through SGLang's offline ``Engine``, and the results they make.

Both modes get the same prompts as token ids, greedy decoding, and the first generated position's top-k
log-probabilities (for the next-token KL). The dense mode runs the dense backend that ``minference`` itself
delegates to (``EngineSettings.dense_backend``: fa3 on Hopper, else flashinfer, as the plugin resolves the
config's ``dense_backend``), so the two modes differ only by the sparse path; the sparse mode runs
``"minference"`` with the config passed through ``json_model_override_args``. The radix cache is off, so
every prompt is prefilled whole in both modes (chunked prefill stays as configured).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ...checks import check
from ...config import MInferenceConfig
from ...registry import nominal_cost, scaled
from .scoring import accuracy_table, answer_recall, first_token_top, top_logprob_kl
from ..prompts import Sample

MODES = ("dense", "sparse")
NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_retrieval")  # heatmap rows


@dataclass(kw_only=True)
class EngineSettings:
    """What the two engines are started with."""

    model_path: str
    sparse_overrides: dict  # the "minference" object of --json-model-override-args
    context_length: int  # engine context: longest prompt + its new tokens
    dense_backend: str  # the dense mode's attention backend: the one minference delegates to
    extra: dict = field(default_factory=dict)  # further sglang.Engine keyword arguments


def engine_kwargs(mode: str, settings: EngineSettings) -> dict:
    """Keyword arguments of ``sglang.Engine`` for ``mode`` (``"dense"`` or ``"sparse"``)."""
    check(mode in MODES, "mode", f"{mode!r} is not one of {MODES}")
    kwargs = dict(model_path=settings.model_path, context_length=settings.context_length,
                  disable_radix_cache=True, log_level="error", **settings.extra)
    if mode == "dense":
        kwargs["attention_backend"] = settings.dense_backend
    else:
        kwargs["attention_backend"] = "minference"
        kwargs["json_model_override_args"] = json.dumps({"minference": settings.sparse_overrides})
    return kwargs


def run_mode(engine, samples: Sequence[Sample], *, top_logprobs: int = 20, batch: int = 16,
             progress: Callable[[int], None] | None = None) -> list[dict]:
    """Greedy outputs of ``engine`` (an ``sglang.Engine`` or anything with its ``generate``) for ``samples``.

    Returns one ``{"text", "output_ids", "top"}`` per sample, ``top`` the first generated position's top-k
    ``(logprob, token_id)`` pairs.
    """
    out: list[dict] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start: start + batch]
        res = engine.generate(input_ids=[s.input_ids for s in chunk],
                              sampling_params=[{"max_new_tokens": s.max_new_tokens, "temperature": 0.0}
                                               for s in chunk],
                              return_logprob=True, top_logprobs_num=top_logprobs)
        for r in res:
            out.append({"text": r["text"], "output_ids": r.get("output_ids"), "top": first_token_top(r["meta_info"])})
        if progress is not None:
            progress(len(chunk))
    return out


def scale_config(config: MInferenceConfig, factor: float) -> MInferenceConfig:
    """``config`` with every head's budgets times ``factor`` (at least 1), by each pattern's scaling rule
    (``sgl_minference.registry``; adaptive patterns divide the attention mass they leave out by ``factor``)."""
    check(factor > 0, "factor", f"must be positive, got {factor}")
    heads = {layer: {h: scaled(spec, factor) for h, spec in per.items()} for layer, per in config.heads.items()}
    return config.model_copy(update={"default": scaled(config.default, factor), "heads": heads})


def evaluate(samples: Sequence[Sample], outputs: dict[str, list[dict]], *, min_context: int) -> dict:
    """Per-sample records and the summary tables from each mode's outputs (``outputs[mode][i]`` for sample i).

    ``min_context``: the sparse path's length gate; records note whether the sparse run was past it.
    """
    modes = [m for m in MODES if m in outputs]
    check(len(modes) > 0, "outputs", f"no outputs of any mode {MODES}")
    for m in modes:
        check(len(outputs[m]) == len(samples), "outputs", f"{m}: {len(outputs[m])} outputs for {len(samples)} samples")
    records = []
    for i, s in enumerate(samples):
        rec = {"task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed, "answers": s.answers,
               "sparse_active": s.length >= min_context}
        for m in modes:
            o = outputs[m][i]
            rec[m] = {"output": o["text"], "score": answer_recall(o["text"], s.answers)}
        if len(modes) == 2:
            d, sp = outputs["dense"][i], outputs["sparse"][i]
            rec["kl"] = top_logprob_kl(d["top"], sp["top"])
            rec["first_token_agree"] = d["top"][0][1] == sp["top"][0][1]
            rec["output_agree"] = d["text"] == sp["text"]
        records.append(rec)

    def table(mode, key, only=None):
        rows = [{**r, "score": r[mode]["score"]} for r in records if only is None or r["task"] in only]
        return accuracy_table(rows, key) if rows else {}

    summary: dict = {
        "accuracy": {m: table(m, ("task", "length")) for m in modes},
        "niah": {m: table(m, ("length", "depth"), NEEDLE_TASKS) for m in modes},
    }
    if len(modes) == 2:
        summary["kl"] = accuracy_table([{**r, "score": r["kl"]} for r in records], ("task", "length"))
        summary["first_token_agree"] = sum(r["first_token_agree"] for r in records) / len(records)
        summary["output_agree"] = sum(r["output_agree"] for r in records) / len(records)
    return {"records": records, **summary}


def nominal_density(config: MInferenceConfig, length: int, layers: Sequence[int], num_heads: int) -> float:
    """Mean share of the causal attention the config's heads of ``layers`` compute at ``length`` (nominal
    cost model of ``sgl_minference.tools.search.candidates``; dense heads, and adaptive ones whose cost depends on the
    input, count as 1: an upper bound)."""
    row = (length + 1) / 2
    shares = []
    for layer in layers:
        for h in range(num_heads):
            cost = nominal_cost(config.head_spec(layer, h))
            shares.append(1.0 if cost < 0 else min(cost, row) / row)
    return sum(shares) / len(shares) if shares else 1.0
