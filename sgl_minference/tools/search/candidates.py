"""The offline search's per-head candidate patterns, all of about the same kernel cost, and the cost model.

Each pattern type's nominal cost, candidates and fit are its entry in ``sgl_minference.registry``; this module
combines them.

Cost model. The sparse kernel's work for a query row is the number of keys it visits (``QK^T`` and ``PV`` both
scale with it), visited in 64-key tiles per 64-row query block (``sgl_minference.layout``). Nominal keys per row:

* ``a_shape(sink, local)``: ``ceil(sink / 64) * 64`` gathered sink columns, plus the band
  ``[r0 - local + 1, r0 + 64)`` of the block starting at ``r0``: ``local + 63`` keys.
* ``vertical_slash(V, S)``: ``ceil(V / 64) * 64`` gathered columns, plus ``S + 63`` keys for the diagonals when
  they are contiguous (most top diagonals hug the local band; a scattered diagonal costs up to 64 keys).
* ``block_sparse(K)``: ``64 K`` keys.

Candidate space for a budget ``B`` keys per row (:func:`candidate_space`), each of nominal cost about ``B``:
one A-shape (a 64-key sink, the rest local), vertical-slash with ``VERTICAL_SHARES`` of the budget in columns
(from slash-heavy to vertical-heavy, like the reference search's 30/800 .. 3500/100 splits), and block-sparse
with ``B / 64`` blocks (``SEARCHED``; the registry's ``VERTICAL_SHARES``). :func:`budget_for` turns a density
(share of the causal attention computed) into ``B``.
Diagonals are the one cost the nominal model cannot know in advance: a scattered diagonal costs up to 64 keys
per row. So the search fits each vertical-slash candidate to the head (:func:`fit`, by
``sgl_minference.patterns.selection.fit_slash``): its vertical count stays, its slash count becomes the largest
whose realised keys per row on the calibration prompt stay within the budget.
The search measures every candidate's *realised* cost too (``head_recall``'s keys per row) and only picks among
those within ``slack`` times the budget (:func:`choose`), so a pattern whose diagonals scatter cannot win by
spending more; among candidates of equal recall (within ``tol``) the cheapest wins.
With a recall target over a ladder of budgets (:func:`cheapest_meeting`), the candidates of every budget compete:
the one with the fewest realised keys per row among those reaching the target (each within ``slack`` times its
own budget) wins, and a head where none reaches it stays dense.

The adaptive patterns (``ADAPTIVE``: xattention, flexprefill; searched on request) have no nominal cost: their
budgets follow the input (``nominal_cost`` -1). Their cost is modelled the same way as the diagonals': each
candidate's mass threshold is fitted per head (:func:`fit`) to the largest whose realised keys per row on the
calibration prompt stay within the budget, and ``choose`` compares realised keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...checks import check
from ...config import DEFAULT_ESTIMATION, Estimation
from ...layout import BLOCK
from ...registry import PATTERNS, nominal_cost, search_candidates  # noqa: F401 (nominal_cost: the search's model)

MIN_BUDGET = 8 * BLOCK  # below this the splits collapse into one another
SEARCHED = ("a_shape", "vertical_slash", "block_sparse")  # the pattern types searched unless asked otherwise
ADAPTIVE = ("xattention", "flexprefill")  # input-dependent budgets: searched on request (their fit holds the budget)


def budget_for(length: int, density: float) -> int:
    """Keys per row that compute ``density`` of the causal attention of a ``length``-token prompt.

    A causal row has ``(length + 1) / 2`` keys on average, so the budget is ``density * (length + 1) / 2``.
    """
    check(0.0 < density <= 1.0, "density", f"{density} is not in (0, 1]")
    check(length > 0, "length", f"must be positive, got {length}")
    return max(1, round(density * (length + 1) / 2))


def candidate_space(budget: int, *, est: Estimation = DEFAULT_ESTIMATION, types: Sequence[str] = SEARCHED) -> list:
    """The candidate specs of ``types`` for ``budget`` keys per row (each registry entry's ``candidates``, see
    the module docstring), without duplicates."""
    check(budget >= MIN_BUDGET, "budget", f"{budget} keys per row is too small to split (need >= {MIN_BUDGET})")
    return search_candidates(budget, est, types)


def fit(spec, q: torch.Tensor, k: torch.Tensor, budget: int, *, sm_scale: float,
        est: Estimation = DEFAULT_ESTIMATION, softcap: float | None = None, row_block: int = 1024,
        skip_rows: int = 0):
    """``spec`` fitted to ``budget`` keys per row on this head by its registry entry (unchanged if it has no fit)."""
    entry = PATTERNS[spec.type]
    if entry.fit is None:
        return spec
    return entry.fit(spec, q, k, budget, sm_scale=sm_scale, est=est, softcap=softcap, row_block=row_block,
                     skip_rows=skip_rows)


def choose(recall: Sequence[float], keys: Sequence[float], budget: int, slack: float = 1.5,
           tol: float = 1e-3) -> int:
    """Index of the chosen candidate among those whose realised keys per row are at most ``slack * budget``:
    the cheapest (fewest keys) of those within ``tol`` of the best recall there, so equally good patterns are
    not told apart by rounding noise; the cheapest candidate overall when none is within the slack."""
    check(len(recall) == len(keys) and len(recall) > 0, "recall", "need one recall and one cost per candidate")
    within = [i for i in range(len(recall)) if keys[i] <= slack * budget]
    if not within:
        return min(range(len(keys)), key=lambda i: keys[i])
    best = max(recall[i] for i in within)
    return min((i for i in within if recall[i] >= best - tol), key=lambda i: (keys[i], -recall[i]))


def cheapest_meeting(recall: Sequence[float], keys: Sequence[float], budgets: Sequence[int], target: float,
                     slack: float = 1.5, max_keys: float | None = None) -> int | None:
    """Index of the candidate with the fewest realised keys per row among those whose recall is at least
    ``target``, whose keys are at most ``slack`` times their own budget (``budgets[i]``, the budget candidate
    ``i`` was sized and fitted for) and, given ``max_keys``, fewer than that: at most the head's mean causal keys
    per scored row, since a dense head reads as many keys exactly and a candidate keeping as many gains nothing.
    Ties go to the higher recall, then the lower index. ``None`` when no candidate qualifies: the head stays
    dense."""
    check(len(recall) == len(keys) == len(budgets) and len(recall) > 0, "recall",
          "need one recall, one cost and one budget per candidate")
    ok = [i for i in range(len(recall)) if recall[i] >= target and keys[i] <= slack * budgets[i]
          and (max_keys is None or keys[i] < max_keys)]
    return min(ok, key=lambda i: (keys[i], -recall[i], i)) if ok else None

