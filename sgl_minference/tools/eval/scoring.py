"""Scores for the synthetic tasks and the dense-vs-sparse next-token divergence.

* :func:`answer_recall`: the share of reference strings found in an output (case-insensitive substring match,
  RULER's "string match all"); 1.0 for single-answer tasks that got it right.
* :func:`accuracy_table`: mean score per task x length (and per length x depth for the NIAH heatmap).
* :func:`top_logprob_kl`: KL(dense || sparse) of the next-token distributions, from the top-k log-probabilities
  SGLang returns (``return_logprob=True, top_logprobs_num=k``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from ...checks import check


def answer_recall(output: str, answers: Sequence[str]) -> float:
    """Share of ``answers`` that occur in ``output`` (case-insensitive); ``answers`` must be non-empty."""
    check(len(answers) > 0, "answers", "need at least one reference answer")
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def accuracy_table(records: Iterable[Mapping], key: tuple[str, ...] = ("task", "length")) -> dict:
    """Mean ``score`` of ``records`` grouped by the fields in ``key``, as nested dicts in ``key`` order.

    Each record is a mapping holding ``score`` and the ``key`` fields, e.g. ``{"task": "passkey",
    "length": 4096, "depth": 0.5, "score": 1.0}``. Group keys keep their types (JSON writers turn them into
    strings).
    """
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for rec in records:
        cell = sums[tuple(rec[k] for k in key)]
        cell[0] += rec["score"]
        cell[1] += 1
    out: dict = {}
    for cell_key, (total, n) in sorted(sums.items(), key=lambda kv: tuple(map(_sort_key, kv[0]))):
        node = out
        for k in cell_key[:-1]:
            node = node.setdefault(k, {})
        node[cell_key[-1]] = total / n
    return out


def _sort_key(v):
    return (v is None, v if v is not None else 0)


def top_logprob_kl(dense: Sequence[tuple[float, int]], sparse: Sequence[tuple[float, int]]) -> float:
    """KL(P_dense || P_sparse) in nats from each side's top-k ``(logprob, token_id)`` pairs.

    Exact KL needs both full distributions; with only the top ``k`` of each, the distributions are coarsened
    to the dense top-k tokens plus one "rest" bucket (the mass of every other token) and the KL of the
    coarsened pair is returned (by the log-sum inequality, a lower bound of the exact KL when the sparse
    probabilities are known). A dense top-k token missing from the sparse top-k gets the smallest sparse
    top-k probability (an upper bound on its true probability, so its term is not overstated).
    """
    check(len(dense) > 0, "dense", "need at least one (logprob, token_id) pair")
    check(len(sparse) > 0, "sparse", "need at least one (logprob, token_id) pair")
    q_of = {int(t): float(lp) for lp, t in sparse}
    q_floor = min(q_of.values())
    kl, p_top, q_top = 0.0, 0.0, 0.0
    for lp, t in dense:
        p, lq = math.exp(lp), q_of.get(int(t), q_floor)
        kl += p * (lp - lq)
        p_top += p
        q_top += math.exp(lq)
    p_rest, q_rest = max(1.0 - p_top, 0.0), max(1.0 - q_top, 1e-12)
    if p_rest > 0.0:
        kl += p_rest * math.log(max(p_rest, 1e-12) / q_rest)
    return max(kl, 0.0)


def first_token_top(meta_info: Mapping) -> list[tuple[float, int]]:
    """The first generated position's top-k ``(logprob, token_id)`` pairs from an SGLang ``meta_info``.

    SGLang lists ``output_top_logprobs`` per generated token, each a list of ``(logprob, token_id, text)``.
    """
    tops = meta_info.get("output_top_logprobs")
    check(bool(tops) and bool(tops[0]), "meta_info",
          "no output_top_logprobs: request with return_logprob=True and top_logprobs_num > 0")
    return [(float(e[0]), int(e[1])) for e in tops[0]]
