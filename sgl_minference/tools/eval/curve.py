"""``python -m sgl_minference.tools.eval.curve RESULTS.json ... -o CURVE.png``: accuracy and attention recall
against density, from eval results of one model and config at several ``--budget-scale`` values.

Each results file (``python -m sgl_minference.tools.eval ... --budget-scale S``) gives one point per task: the
sparse accuracy at ``--length`` (default: the longest length every file has) against that file's nominal density
there, with the dense accuracy as the reference line; a second panel plots the median and the lowest per-layer
attention recall. The files must share the model, the dense backend, the base config and the length; each needs
a different budget scale. Writes the PNG and, with ``--json``, the table it plotted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ...checks import check
from ...cli import fail

PROG = "python -m sgl_minference.tools.eval.curve"


def _base_config(results: dict) -> dict:
    """The results' sparse config with its budgets scaled back to scale 1: what the runs must share."""
    return {k: v for k, v in results["config"].items() if k not in ("default", "heads")}


def budget_curve(runs: list[dict], length: int | None = None) -> dict:
    """The curve's table from eval results dicts (the JSON ``tools.eval`` writes), one per budget scale.

    Returns ``{"model", "dense_backend", "length", "tasks", "dense": {task: acc}, "points": [{"budget_scale",
    "density", "accuracy": {task: acc}, "recall_median", "recall_min", "first_token_agree"}, ...]}`` with the
    points in ascending density. ``recall_*`` are ``None`` where a run skipped the recall (``--no-recall``).
    Raises ``ValueError`` naming ``runs`` or ``length`` when the files cannot share one curve.
    """
    check(len(runs) > 0, "runs", "no results to plot")
    first = runs[0]
    for i, r in enumerate(runs):
        for key in ("model_folder", "dense_backend"):
            check(r.get(key) == first.get(key), "runs", f"entry {i}: {key} {r.get(key)!r} != {first.get(key)!r}")
        check(_base_config(r) == _base_config(first), "runs", f"entry {i}: its config's settings differ from entry 0's")
    scales = [r["budget_scale"] for r in runs]
    check(len(set(scales)) == len(scales), "runs", f"budget scales repeat: {scales}")
    common = set.intersection(*({int(n) for n in r["nominal_density"]} for r in runs))
    if length is None:
        check(len(common) > 0, "runs", "no prompt length is in every file")
        length = max(common)
    check(length in common, "length", f"{length} is not in every file (common: {sorted(common)})")
    key = str(length)
    tasks = [t for t in first["tasks"] if all(key in r["accuracy"]["dense"].get(t, {}) for r in runs)]
    check(len(tasks) > 0, "runs", f"no task has results at length {length} in every file")
    dense = {t: first["accuracy"]["dense"][t][key] for t in tasks}
    for i, r in enumerate(runs):
        for t in tasks:  # the dense mode ignores the budgets: a different figure means different prompts or model
            check(abs(r["accuracy"]["dense"][t][key] - dense[t]) < 1e-9, "runs",
                  f"entry {i}: dense accuracy of {t} at {length} differs from entry 0's")
    points = []
    for r in runs:
        per_layer = list((r.get("attention_recall") or {}).get("per_layer", {}).values())
        points.append({"budget_scale": r["budget_scale"], "density": r["nominal_density"][key],
                       "accuracy": {t: r["accuracy"]["sparse"][t][key] for t in tasks},
                       "recall_median": statistics.median(per_layer) if per_layer else None,
                       "recall_min": min(per_layer) if per_layer else None,
                       "first_token_agree": r.get("first_token_agree")})
    points.sort(key=lambda p: (p["density"], p["budget_scale"]))
    return {"model": first.get("model_folder"), "dense_backend": first.get("dense_backend"), "length": length,
            "tasks": tasks, "dense": dense, "points": points}


def plot_budget_curve(curve: dict, path: str | Path, *, title: str = "") -> None:
    """Write :func:`budget_curve`'s table as a PNG: accuracy per task (solid, sparse; dotted, dense) and the
    per-layer recall (median, lowest) against nominal density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["density"] for p in curve["points"]]
    fig, (acc_ax, rec_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for t in curve["tasks"]:
        line, = acc_ax.plot(xs, [p["accuracy"][t] for p in curve["points"]], marker="o", label=t)
        acc_ax.axhline(curve["dense"][t], color=line.get_color(), linestyle=":", linewidth=1)
    acc_ax.set(xlabel=f"nominal density at {curve['length']} tokens", ylabel="accuracy (dotted: dense)",
               ylim=(-0.02, 1.02))
    acc_ax.legend(fontsize=7)
    for key, label in (("recall_median", "median layer"), ("recall_min", "lowest layer")):
        pts = [(x, p[key]) for x, p in zip(xs, curve["points"]) if p[key] is not None]
        if pts:
            rec_ax.plot(*zip(*pts), marker="o", label=label)
    rec_ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    rec_ax.set(xlabel=f"nominal density at {curve['length']} tokens", ylabel="attention recall")
    rec_ax.legend(fontsize=7)
    for x, p in zip(xs, curve["points"]):
        acc_ax.annotate(f"x{p['budget_scale']:g}", (x, 0.0), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
    fig.suptitle(title or f"{curve['model']}: budget scaling (dense on {curve['dense_backend']})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="eval results JSON files, one per budget scale")
    p.add_argument("--length", type=int, default=None, help="prompt length to plot (default: longest common)")
    p.add_argument("-o", "--out", required=True, help="PNG to write")
    p.add_argument("--json", default=None, help="also write the plotted table here")
    p.add_argument("--title", default="")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = []
    for f in args.results:
        try:
            runs.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            fail(PROG, f"{f}: {e}")
    try:
        curve = budget_curve(runs, args.length)
    except ValueError as e:
        fail(PROG, str(e))
    plot_budget_curve(curve, args.out, title=args.title)
    if args.json:
        Path(args.json).write_text(json.dumps(curve, indent=1) + "\n")
    for p in curve["points"]:
        recall = "-" if p["recall_median"] is None else f"{p['recall_median']:.3f}"
        print(f"x{p['budget_scale']:g}: density {p['density']:.3f}, median layer recall {recall}, "
              + ", ".join(f"{t} {a:.2f}" for t, a in p["accuracy"].items()))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))
    return curve


if __name__ == "__main__":
    main(sys.argv[1:])
