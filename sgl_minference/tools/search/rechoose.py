"""``python -m sgl_minference.tools.search.rechoose CONFIG.json --target-recall R -o NEW.json``: choose again.

The search's report keeps every candidate's recall and realised keys per head, and the choice among them is pure
arithmetic (:func:`~sgl_minference.tools.search.candidates.cheapest_meeting`). So a config for another recall
target, key-share limit or slack over the same ladder needs no model and no GPU: this reads ``CONFIG.json``
(written by ``python -m sgl_minference.tools.search``) and its report (``CONFIG.report.json`` unless
``--from-report`` names it), chooses every head's candidate again and writes ``NEW.json`` and its report in the
search's own format, with ``rechosen_from`` naming the source. The config's other settings (``min_context``, the
shape) are kept. A candidate can only be chosen at a budget the search scored: to go beyond its largest rung, search
again with a longer ladder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...cli import fail
from ...config import ConfigError, DenseSpec, MInferenceConfig
from .searcher import meeting_target, report_path_for, results_from_report, to_config, write_outputs

PROG = "python -m sgl_minference.tools.search.rechoose"
_SHAPE = {"heads", "default", "num_layers", "num_heads"}  # what to_config sets itself


def rechoose(config: MInferenceConfig, report: dict, *, target_recall: float, max_key_share: float = 1.0,
             slack: float = 1.5):
    """The config and head results of ``report``'s search chosen again for ``target_recall`` (see the module
    docstring); ``config`` is the search's config (its shape and global settings are kept)."""
    results = results_from_report(report)
    for r in results:
        r.best = meeting_target(r, target_recall, slack, max_key_share)
    kept = config.model_dump(exclude=_SHAPE)
    new = to_config(results, num_layers=config.num_layers, num_heads=config.num_heads, **kept)
    return new, results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a config written by the search (its report next to it)")
    p.add_argument("--output", "-o", required=True, help="the new config (JSON, sgl-minference/v1)")
    p.add_argument("--from-report", default=None, help="the search's report (default: CONFIG with .report.json)")
    p.add_argument("--report", default=None, help="the new report (default: OUTPUT with .report.json)")
    p.add_argument("--target-recall", type=float, required=True)
    p.add_argument("--max-key-share", type=float, default=1.0)
    p.add_argument("--slack", type=float, default=1.5)
    args = p.parse_args(argv)
    if not 0.0 < args.target_recall <= 1.0:
        fail(PROG, f"--target-recall: {args.target_recall} is not in (0, 1]")
    if not 0.0 < args.max_key_share <= 1.0:
        fail(PROG, f"--max-key-share: {args.max_key_share} is not in (0, 1]")
    if args.slack <= 0:
        fail(PROG, f"--slack: {args.slack} is not positive")
    source = Path(args.config)
    report_path = Path(args.from_report) if args.from_report else report_path_for(source)
    try:
        config = MInferenceConfig.load(source)
    except (OSError, ConfigError) as e:
        fail(PROG, f"config: {e}")
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        fail(PROG, f"--from-report: {report_path}: {e}")
    if not isinstance(report, dict) or "heads" not in report or "budget" not in report:
        fail(PROG, f"--from-report: {report_path} is not a search report (no 'heads' / 'budget')")
    if any("causal_keys" not in h for h in report["heads"]):
        fail(PROG, f"--from-report: {report_path} predates the heads' causal_keys (search again to choose from it)")
    if config.default != DenseSpec() or config.num_layers is None or config.num_heads is None:
        fail(PROG, f"config: {source} was not written by the search (needs num_layers, num_heads, a dense default)")
    new, results = rechoose(config, report, target_recall=args.target_recall, max_key_share=args.max_key_share,
                            slack=args.slack)
    info = {k: v for k, v in report.items() if k not in {"layer_recall", "dense_heads", "key_share", "heads"}}
    info.update(target_recall=args.target_recall, max_key_share=args.max_key_share, slack=args.slack,
                dense_below=0.0, rechosen_from=str(source))
    return write_outputs(results, new, Path(args.output), Path(args.report) if args.report else None, info)


if __name__ == "__main__":
    main()
