"""Kernel-aware pattern search over a model's full-attention heads, and the config it produces.

For every query head of every searched layer, each candidate spec is realised on the calibration sequence
(dynamic indices estimated as online), scored by streamed attention recall, and one is kept. With one budget,
the best recall within the cost budget (:func:`~sgl_minference.tools.search.candidates.choose`). With a recall target
and a ladder of budgets (``search_model(budget=[...], target_recall=R)``), the candidates of every budget are
fitted to their own budget and scored together on the layer's Q/K (captured once), and the head gets the one
with the fewest realised keys per row among those whose recall is at least ``R`` and whose keys are within
``slack`` times their budget and below the head's causal keys
(:func:`~sgl_minference.tools.search.candidates.cheapest_meeting`); where none qualifies the head stays dense
(``HeadResult.best`` ``None``; counted as recall 1.0, it is exact). The same scoring
measures the recall of a given config's specs (:func:`config_recall`), which the eval reports per layer.

Calibration on several prompts (``search_model(prompts=[...])``): the candidates are fitted on the first prompt's
Q/K, then those fitted specs are realised and scored on every prompt (dynamic indices estimated on each, as online);
a candidate's recall is its lowest over the prompts and its keys per row their mean. With
``ScoreSettings.tail_rows`` the last rows of each prompt (its question) are also scored on their own
(``HeadResult.tail_recall``) and the choice takes the lower of the two (:meth:`HeadResult.score`): a head whose
question rows lose the needle fails the target even when the average over all rows does not.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...checks import check
from ...config import DEFAULT_ESTIMATION, DenseSpec, Estimation, MInferenceConfig
from ...patterns.selection import realise
from ...registry import HeadSpec
from .candidates import cheapest_meeting, choose, fit, nominal_cost
from .capture import LayerQK, capture_qk
from .recall import head_recall


@dataclass(kw_only=True)
class ScoreSettings:
    """How heads are scored; ``est`` is the config's estimation settings (``MInferenceConfig.estimation``)."""

    row_block: int = 1024  # query rows per streamed softmax block
    skip_rows: int = 0  # rows before this one are not averaged (short rows are nearly dense anyway)
    est: Estimation = DEFAULT_ESTIMATION
    tail_rows: int = 0  # > 0: the last this many rows (a prompt's question) are also scored on their own


@dataclass(kw_only=True)
class HeadResult:
    """Every candidate's score on one (layer, query head)."""

    layer: int
    head: int
    specs: list  # candidate head specs (config classes)
    recall: list[float]  # mean kept softmax mass per scored row, per candidate (the lowest over the prompts)
    keys: list[float]  # mean causal keys visited per scored row, per candidate (mean over the prompts)
    best: int | None = 0  # index of the chosen candidate; None: the head stays dense (no candidate met the target)
    budgets: list[int] | None = None  # per candidate, the budget (keys per row) it was fitted to, when fitted
    causal_keys: float | None = None  # mean causal keys per scored row: what a dense head visits
    tail_recall: list[float] | None = None  # with tail_rows: the last rows' recall, per candidate (lowest over prompts)
    prompt_recall: list[list[float]] | None = None  # with several prompts: per candidate, its score on each prompt

    def score(self) -> list[float]:
        """What the choice compares, per candidate: ``recall``, or the lower of it and ``tail_recall``."""
        if self.tail_recall is None:
            return list(self.recall)
        return [min(r, t) for r, t in zip(self.recall, self.tail_recall)]

    def as_dict(self) -> dict:
        n = len(self.specs)
        budgets = self.budgets or [None] * n
        tails = self.tail_recall or [None] * n
        by_prompt = self.prompt_recall or [None] * n
        return {"layer": self.layer, "head": self.head, "best": self.best, "dense": self.best is None,
                "causal_keys": self.causal_keys,
                "candidates": [{"spec": s.model_dump(), "nominal_keys": nominal_cost(s), "recall": r, "keys": k,
                                **({} if b is None else {"budget": b}), **({} if t is None else {"tail_recall": t}),
                                **({} if pr is None else {"prompt_recall": pr})}
                               for s, r, k, b, t, pr in zip(self.specs, self.recall, self.keys, budgets, tails,
                                                            by_prompt)]}


def across_prompts(per_prompt: Sequence[HeadResult]) -> HeadResult:
    """One head's results on several prompts (same head, same candidates, the first prompt's fitted specs) as one:
    per candidate the lowest recall and tail recall, the mean keys, and each prompt's :meth:`HeadResult.score` in
    ``prompt_recall``; the rest is the first prompt's."""
    first = per_prompt[0]
    if len(per_prompt) == 1:
        return first
    check(all((r.layer, r.head, len(r.specs)) == (first.layer, first.head, len(first.specs)) for r in per_prompt),
          "per_prompt", "results of different heads or candidate lists")
    cols = range(len(first.specs))
    tail = None if first.tail_recall is None else [min(r.tail_recall[c] for r in per_prompt) for c in cols]
    scores = [r.score() for r in per_prompt]
    return HeadResult(layer=first.layer, head=first.head, specs=first.specs,
                      recall=[min(r.recall[c] for r in per_prompt) for c in cols],
                      keys=[sum(r.keys[c] for r in per_prompt) / len(per_prompt) for c in cols],
                      best=first.best, budgets=first.budgets, causal_keys=first.causal_keys, tail_recall=tail,
                      prompt_recall=[[s[c] for s in scores] for c in cols])


def score_layer(qk: LayerQK, specs_for: Callable[[int, int], Sequence], settings: ScoreSettings,
                on_head: Callable[[HeadResult], None] | None = None,
                fit_budget: int | Sequence[int] | None = None,
                skip: Callable[[int, int], bool] | None = None) -> list[HeadResult]:
    """Score ``specs_for(layer, head)`` on every query head of one captured layer (GQA: head ``h`` reads KV head
    ``h // (Hq / Hk)``), except those ``skip(layer, head)`` marks (already scored). With ``fit_budget``, specs whose
    pattern has a fit (vertical-slash: the slash count; the adaptive patterns: their mass threshold) are first
    fitted to that many keys per row on the head (:func:`~sgl_minference.tools.search.candidates.fit`); a sequence
    gives each spec its own budget (recorded in ``HeadResult.budgets``)."""
    num_heads, num_kv = qk.q.shape[0], qk.k.shape[0]
    check(num_heads % num_kv == 0, "qk", f"{num_kv} KV heads do not divide {num_heads} query heads")
    group = num_heads // num_kv
    n = qk.q.shape[1]
    skip_rows = min(settings.skip_rows, n - 1)
    out = []
    for h in range(num_heads):
        if skip is not None and skip(qk.layer, h):
            continue
        q, k = qk.q[h], qk.k[h // group]
        est = dict(sm_scale=qk.sm_scale, est=settings.est, softcap=qk.softcap)
        specs = list(specs_for(qk.layer, h))
        budgets = None
        if fit_budget is not None:
            budgets = [fit_budget] * len(specs) if isinstance(fit_budget, int) else list(fit_budget)
            check(len(budgets) == len(specs), "fit_budget", f"{len(budgets)} budgets for {len(specs)} specs")
            specs = [fit(s, q, k, b, row_block=settings.row_block, skip_rows=skip_rows, **est)
                     for s, b in zip(specs, budgets)]
        sels = [realise(s, q, k, **est) for s in specs]
        recall, keys = head_recall(q, k, sels, sm_scale=qk.sm_scale, row_block=settings.row_block,
                                   skip_rows=skip_rows, softcap=qk.softcap)
        tail = None
        if settings.tail_rows > 0:
            tail, _ = head_recall(q, k, sels, sm_scale=qk.sm_scale, row_block=settings.row_block,
                                  skip_rows=max(skip_rows, n - settings.tail_rows), softcap=qk.softcap)
            tail = tail.tolist()
        res = HeadResult(layer=qk.layer, head=h, specs=specs, recall=recall.tolist(), keys=keys.tolist(),
                         budgets=budgets, causal_keys=(skip_rows + 1 + n) / 2,  # mean of row + 1, rows skip_rows..n-1
                         tail_recall=tail)
        out.append(res)
        if on_head is not None:
            on_head(res)
    return out


def meeting_target(res: HeadResult, target_recall: float, slack: float, max_key_share: float) -> int | None:
    """The candidate of ``res`` a recall-target search chooses (``HeadResult.best``; ``None``: dense): the cheapest
    whose :meth:`~HeadResult.score` reaches ``target_recall``, within ``slack`` times its own budget and below
    ``max_key_share`` of the head's causal keys (:func:`~sgl_minference.tools.search.candidates.cheapest_meeting`)."""
    return cheapest_meeting(res.score(), res.keys, res.budgets, target_recall, slack,
                            max_key_share * res.causal_keys)


class Checkpoint:
    """A search's results so far, one JSON line per (prompt, head) after a first line with the search's settings,
    so a run cut off (a device call's time limit) goes on where it stopped. A file written with other settings is
    refused: its heads were scored for another search."""

    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        settings = json.loads(json.dumps(settings))  # as JSON gives them back
        text = self.path.read_text() if self.path.exists() else ""
        if not text.strip():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": settings}) + "\n")
        elif json.loads(text.splitlines()[0]).get("settings") != settings:
            raise ValueError(f"checkpoint: {self.path} holds a search with other settings; remove it to start over")
        elif not text.endswith("\n"):  # cut off mid-line: what follows starts a line of its own
            with self.path.open("a") as f:
                f.write("\n")

    def load(self) -> list[tuple[int, HeadResult]]:
        """``(prompt index, result)`` of every head in the file."""
        _settings, *lines = self.path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the run was cut off
                continue
            out.append((d["prompt"], head_from_dict(d, None)))
        return out

    def append(self, prompt: int, res: HeadResult) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"prompt": prompt, **res.as_dict()}) + "\n")


def _num_heads(model) -> int:
    return model.config.get_text_config().num_attention_heads


def search_model(model, prompts: Sequence[torch.Tensor], *, layers: Sequence[int], candidates: Sequence,
                 budget: int | Sequence[int], settings: ScoreSettings, slack: float = 1.5,
                 target_recall: float | None = None, max_key_share: float = 1.0,
                 progress: bool = True, checkpoint: Checkpoint | None = None) -> list[HeadResult]:
    """Score ``candidates`` on every query head of ``layers`` and choose one per head (``HeadResult.best``);
    candidates with a fit (vertical-slash, the adaptive patterns) are fitted to their budget per head first.

    ``model``: a transformers causal LM loaded with ``attn_implementation="sdpa"``; ``prompts``: the calibration
    prompts, each ``[N]`` int64, all of one length N; the candidates are fitted on the first and scored on every one
    (:func:`across_prompts`: the lowest recall, the mean keys). ``budget``: keys per row the candidates were sized
    for. One budget: the best recall within it (:func:`~sgl_minference.tools.search.candidates.choose`). A ladder:
    ``budget`` a sequence of budgets and ``candidates`` one candidate list per budget, scored together on each
    layer's Q/K; needs ``target_recall``, and each head gets the cheapest candidate reaching it, or ``best``
    ``None`` (dense) when none does (:func:`~sgl_minference.tools.search.candidates.cheapest_meeting`).
    ``target_recall`` applies to one budget too; with it, a candidate must keep fewer than ``max_key_share``
    (0, 1] of the head's causal keys per row. Both compare :meth:`HeadResult.score`. ``checkpoint``: every head's
    result on every prompt is appended to it as it is scored, and those it already holds are not scored again.
    """
    from tqdm.auto import tqdm

    ladder = [(budget, candidates)] if isinstance(budget, int) else list(zip(budget, candidates, strict=True))
    check(len(ladder) > 0, "budget", "no budget to search")
    check(len(prompts) > 0, "prompts", "no calibration prompt")
    check(len({p.numel() for p in prompts}) == 1, "prompts",
          f"calibration prompts of different lengths {sorted({p.numel() for p in prompts})}")
    check(0.0 < max_key_share <= 1.0, "max_key_share", f"{max_key_share} is not in (0, 1]")
    check(target_recall is not None or len(ladder) == 1, "target_recall",
          f"a ladder of {len(ladder)} budgets needs a recall target to choose among them")
    specs = [s for _b, cands in ladder for s in cands]
    fit_budgets = [b for b, cands in ladder for _s in cands]
    # per_head[layer, head][i]: the head's result on prompt i (from the checkpoint, or scored now)
    per_head: dict[tuple[int, int], dict[int, HeadResult]] = {}
    for i, res in (checkpoint.load() if checkpoint is not None else []):
        per_head.setdefault((res.layer, res.head), {})[i] = res
    total = len(layers) * _num_heads(model) * len(prompts)
    bar = tqdm(total=total, initial=sum(map(len, per_head.values())), desc="heads searched", disable=not progress)

    for i, ids in enumerate(prompts):
        def on_head(res: HeadResult, i=i) -> None:
            per_head.setdefault((res.layer, res.head), {})[i] = res
            if checkpoint is not None:
                checkpoint.append(i, res)
            bar.update(1)

        def done(layer: int, head: int, i=i) -> bool:
            return i in per_head.get((layer, head), {})

        if all(done(layer, h) for layer in layers for h in range(_num_heads(model))):
            continue
        # The first prompt fits every candidate to its budget on the head; the others score those fitted specs.
        specs_for = (lambda _l, _h: specs) if i == 0 else (lambda l, h: per_head[l, h][0].specs)
        capture_qk(model, ids, layers, lambda qk: score_layer(qk, specs_for, settings, on_head,
                                                              fit_budgets if i == 0 else None, skip=done))
    bar.close()
    results = [across_prompts([per_head[key][i] for i in range(len(prompts))]) for key in sorted(per_head)]
    for res in results:
        res.best = (choose(res.score(), res.keys, ladder[0][0], slack) if target_recall is None
                    else meeting_target(res, target_recall, slack, max_key_share))
    return results


def config_recall(model, input_ids: torch.Tensor, config: MInferenceConfig, *, layers: Sequence[int],
                  settings: ScoreSettings, progress: bool = True) -> list[HeadResult]:
    """Recall of ``config``'s own spec on every query head of ``layers`` (one candidate per head)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers) * _num_heads(model), desc="heads scored", disable=not progress)
    results: list[HeadResult] = []
    capture_qk(model, input_ids, layers,
               lambda qk: results.extend(score_layer(qk, lambda l, h: [config.head_spec(l, h)], settings,
                                                     lambda _r: bar.update(1))))
    bar.close()
    return results


def to_config(results: Sequence[HeadResult], *, num_layers: int, num_heads: int, dense_below: float = 0.0,
              **globals_) -> MInferenceConfig:
    """The config listing each searched head's chosen spec; every other head (sliding-window layers) dense.

    ``dense_below``: a head whose chosen score (:meth:`HeadResult.score`) is lower stays dense too (no pattern fits
    it within the budget); so does a head without a chosen candidate (``best`` ``None``: none met the search's
    recall target).
    ``globals_``: further ``MInferenceConfig`` fields (e.g. ``min_context``, ``last_q``).
    """
    heads: dict[int, dict[int, object]] = {}
    for r in results:
        sparse = r.best is not None and r.score()[r.best] >= dense_below
        heads.setdefault(r.layer, {})[r.head] = r.specs[r.best] if sparse else DenseSpec()
    return MInferenceConfig(num_layers=num_layers, num_heads=num_heads, default=DenseSpec(), heads=heads, **globals_)


def layer_summary(results: Sequence[HeadResult]) -> dict[int, float]:
    """Mean recall of the chosen candidates per layer; a head left dense (``best`` ``None``) counts 1.0 (exact)."""
    per: dict[int, list[float]] = {}
    for r in results:
        per.setdefault(r.layer, []).append(1.0 if r.best is None else r.recall[r.best])
    return {layer: sum(v) / len(v) for layer, v in sorted(per.items())}


def report_path_for(config_path: Path) -> Path:
    """Where the search writes the report of a config it writes to ``config_path`` unless told otherwise."""
    return config_path.with_suffix(".report.json")


def write_outputs(results: Sequence[HeadResult], config: MInferenceConfig, out: Path, report_path: Path | None,
                  info: dict) -> dict:
    """Save ``config`` to ``out`` and its report (``info``, the search's settings, plus every head's result and
    the summary: ``layer_recall``, ``dense_heads``, ``key_share``) to ``report_path`` (default
    :func:`report_path_for`); print the one-line summary and return the report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    config.save(out)
    dense = [config.head_spec(r.layer, r.head) == DenseSpec() for r in results]
    key_share = sum(1.0 if d else r.keys[r.best] / r.causal_keys for r, d in zip(results, dense)) / len(results)
    report = {**info, "layer_recall": layer_summary(results), "dense_heads": sum(dense), "key_share": key_share,
              "heads": [{**r.as_dict(), "dense": d} for r, d in zip(results, dense)]}  # dense: in the config
    report_path = report_path or report_path_for(out)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    chosen: dict[str, int] = {}
    for per_head in config.heads.values():
        for spec in per_head.values():
            chosen[spec.type] = chosen.get(spec.type, 0) + 1
    print(f"wrote {out} ({chosen}) and {report_path}; {sum(dense)} of {len(results)} searched heads dense, "
          f"realised keys {key_share:.3f} of causal; mean recall per layer "
          + ", ".join(f"{k}: {v:.3f}" for k, v in report["layer_recall"].items()), flush=True)
    return report


def results_from_report(report: dict) -> list[HeadResult]:
    """The :class:`HeadResult` of every head in a search report (``write_outputs``), candidates in order; in a
    report whose candidates carry no budget (a one-budget search), each gets the report's ``budget``."""
    return [head_from_dict(h, report["budget"]) for h in report["heads"]]


@functools.cache
def _spec_adapter():
    """pydantic's validator of a head spec, built once (a report or checkpoint holds hundreds of heads)."""
    from pydantic import TypeAdapter

    return TypeAdapter(HeadSpec)


def head_from_dict(h: dict, budget: int | None) -> HeadResult:
    """The :class:`HeadResult` that :meth:`HeadResult.as_dict` wrote; candidates without a budget get ``budget``
    (``None``: the result has no budgets)."""
    spec = _spec_adapter()
    cands = h["candidates"]
    budgets = [c.get("budget", budget) for c in cands]
    return HeadResult(layer=h["layer"], head=h["head"], specs=[spec.validate_python(c["spec"]) for c in cands],
                      recall=[c["recall"] for c in cands], keys=[c["keys"] for c in cands], best=h["best"],
                      budgets=None if None in budgets else budgets, causal_keys=h["causal_keys"],
                      tail_recall=[c["tail_recall"] for c in cands] if "tail_recall" in cands[0] else None,
                      prompt_recall=[c["prompt_recall"] for c in cands] if "prompt_recall" in cands[0] else None)
