"""Pure checks on replies: answer matching, and which request a response belongs to.

Cross-request check: each response of a load run is compared with its reference (the same request sent
alone, greedy). Batching, chunking and cache hits change floating-point sums, so a long greedy output may
drift from its reference at some token without anything being wrong; a response that *is* another
request's reference output while differing from its own means a request got another request's answer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from sgl_minference.checks import check

VERDICTS = ("exact", "drift", "cross", "error")


def answer_found(answer: str, text: str) -> bool:
    """``answer`` occurs in ``text`` as a whole token (case-insensitive; not inside a longer word/number)."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer.lower()) + r"(?![0-9A-Za-z])"
    return re.search(pattern, text.lower()) is not None


def score_reply(answers: list[str], text: str | None) -> float:
    """Share of ``answers`` found in the reply ``text`` (1.0 = all); 0.0 for a missing reply."""
    check(bool(answers), "answers", "nothing to score against (token-mode queries have no answers)")
    if not text:
        return 0.0
    return sum(answer_found(a, text) for a in answers) / len(answers)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(kw_only=True)
class Attribution:
    """How one response of a load run relates to the references."""

    request: str  # the request's name
    verdict: str  # one of VERDICTS
    agree: int  # leading output tokens shared with its own reference
    length: int  # output tokens of the response
    other: str | None = None  # "cross": the request whose reference output it equals
    error: str | None = None  # "error": what went wrong


def attribute(request: str, output_ids: list[int] | None, references: dict[str, list[int]],
              error: str | None = None) -> Attribution:
    """Classify one response (``output_ids``, or ``error``) of ``request`` against ``references``
    (request name -> output ids of that request sent alone)."""
    check(request in references, "request", f"{request!r} has no reference output")
    if error is not None or output_ids is None:
        return Attribution(request=request, verdict="error", agree=0, length=0, error=error or "no output")
    own = references[request]
    agree = common_prefix(output_ids, own)
    if output_ids == own:
        return Attribution(request=request, verdict="exact", agree=agree, length=len(output_ids))
    for name, ref in references.items():
        if name != request and ref != own and output_ids == ref:
            return Attribution(request=request, verdict="cross", agree=agree, length=len(output_ids), other=name)
    return Attribution(request=request, verdict="drift", agree=agree, length=len(output_ids))


@dataclass(kw_only=True)
class CrossCheck:
    """Verdict of the cross-request check over a whole load run."""

    status: str  # "PASS", "FAIL" or "INCONCLUSIVE"
    counts: dict[str, int]  # verdict -> responses
    distinct_references: int  # different reference outputs among the requests
    requests: int  # requests with a reference
    message: str


def cross_check(attributions: list[Attribution], references: dict[str, list[int]]) -> CrossCheck:
    """FAIL on any error or cross-request answer; INCONCLUSIVE when the references cannot tell requests
    apart (fewer than two distinct outputs, typical of dummy weights) or there were no responses; else PASS."""
    counts = Counter(a.verdict for a in attributions)
    counts = {v: counts.get(v, 0) for v in VERDICTS}
    distinct = len({tuple(r) for r in references.values()})
    crosses = [f"{a.request}<-{a.other}" for a in attributions if a.verdict == "cross"][:5]
    errors = sorted({a.error for a in attributions if a.verdict == "error"})[:3]
    summary = (f"{len(attributions)} responses: {counts['exact']} exact, {counts['drift']} drifted, "
               f"{counts['cross']} another request's answer, {counts['error']} errors; "
               f"{distinct} distinct reference outputs over {len(references)} requests")
    if counts["cross"] or counts["error"]:
        status = "FAIL"
        summary += (f"; crossed: {crosses}" if crosses else "") + (f"; errors: {errors}" if errors else "")
    elif distinct < 2 or not attributions:
        status = "INCONCLUSIVE"
        summary += "; the references cannot tell requests apart"
    else:
        status = "PASS"
    if counts["drift"]:
        drifted = [a.agree for a in attributions if a.verdict == "drift"]
        summary += f"; drifted responses agree with their reference for {min(drifted)}..{max(drifted)} tokens"
    return CrossCheck(status=status, counts=counts, distinct_references=distinct, requests=len(references),
                      message=summary)


# ----------------------------------------------------------------------------------------------------------
# Log-probabilities of a fixed continuation
# ----------------------------------------------------------------------------------------------------------
#
# Greedy outputs make a poor witness of what a request attended to: one near-tie flipped by batching changes
# every later token, and on dummy weights (uniform in +-1e-3) the next token depends on the last input token
# alone. Teacher forcing does better: every request ends with the same fixed continuation, and the server
# returns the log-probability of each continuation token given everything before it. Those numbers are
# compared position by position with the same request sent alone. Whether they can show a request that saw
# another request's data is measured, not assumed: the *separation* of a request is how far the nearest other
# request's reference lies from its own. A context that does not move the continuation's log-probabilities
# (dummy weights: attention adds ~1e-9 to a bf16 residual of ~1e-3, which rounds it away) gives separation 0,
# and the check says INCONCLUSIVE instead of passing vacuously.


def logprob_distance(a: list[float | None], b: list[float | None]) -> float:
    """Largest ``|a_i - b_i|`` over the positions both have; ``inf`` when the lists differ in length or in
    which positions carry no value."""
    if len(a) != len(b) or any((x is None) != (y is None) for x, y in zip(a, b)):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b) if x is not None), default=0.0)


@dataclass(kw_only=True)
class LogprobAttribution:
    """How the continuation log-probabilities of one response relate to the references."""

    request: str
    verdict: str  # one of VERDICTS: "exact" here means within the tolerance of its own reference
    own_distance: float | None  # max |difference| to its own reference (None for an error)
    nearest_other: str | None = None  # the other request whose reference lies nearest this response
    nearest_other_distance: float | None = None
    other: str | None = None  # "cross": the request whose reference it matches instead of its own
    error: str | None = None


def attribute_logprobs(request: str, values: list[float | None] | None, references: dict[str, list[float | None]],
                       *, tol: float, error: str | None = None) -> LogprobAttribution:
    """Classify one response's continuation log-probabilities ``values`` (or its ``error``) against
    ``references`` (request name -> the same request's values when sent alone)."""
    check(request in references, "request", f"{request!r} has no reference")
    check(tol >= 0, "tol", f"must be non-negative, got {tol}")
    if error is None and not values:
        error = "no continuation log-probabilities in the response"
    if error is None and any(v is not None and not math.isfinite(v) for v in values):
        error = "non-finite log-probability in the response"
    if error is not None:
        return LogprobAttribution(request=request, verdict="error", own_distance=None, error=error)
    own = logprob_distance(values, references[request])
    others = sorted((logprob_distance(values, ref), name) for name, ref in references.items() if name != request)
    near_d, near = others[0] if others else (None, None)
    if own <= tol:
        verdict, other = "exact", None
    elif near is not None and near_d <= tol and logprob_distance(references[near], references[request]) > tol:
        verdict, other = "cross", near
    else:
        verdict, other = "drift", None
    return LogprobAttribution(request=request, verdict=verdict, own_distance=own, nearest_other=near,
                              nearest_other_distance=near_d, other=other)


def separations(references: dict[str, list[float | None]]) -> dict[str, float]:
    """Per request: the distance from its reference to the nearest other request's reference."""
    return {name: min((logprob_distance(ref, other) for o, other in references.items() if o != name),
                      default=math.inf)
            for name, ref in references.items()}


def logprob_check(attributions: list[LogprobAttribution], references: dict[str, list[float | None]], *,
                  tol: float) -> CrossCheck:
    """The cross-request verdict over a run: FAIL on an error or a response matching another request's
    reference instead of its own; INCONCLUSIVE when the median separation is within twice the tolerance (the
    references cannot tell the requests apart) or there were no responses; else PASS. Drift is counted."""
    counts = Counter(a.verdict for a in attributions)
    counts = {v: counts.get(v, 0) for v in VERDICTS}
    seps = sorted(separations(references).values())
    median_sep = seps[len(seps) // 2] if seps else 0.0
    drifts = [a.own_distance for a in attributions if a.verdict == "drift"]
    drift = f"{counts['drift']} drifted" + (f" (by up to {max(drifts):.3g})" if drifts else "")
    summary = (f"{len(attributions)} responses: {counts['exact']} within {tol:g} of their own reference, {drift}, "
               f"{counts['cross']} matching another request's reference, {counts['error']} errors; separation "
               f"between requests' references min {seps[0] if seps else 0:.3g}, median {median_sep:.3g} over "
               f"{len(references)} requests")
    crosses = [f"{a.request}<-{a.other}" for a in attributions if a.verdict == "cross"][:5]
    errors = sorted({a.error for a in attributions if a.verdict == "error"})[:3]
    if counts["cross"] or counts["error"]:
        status = "FAIL"
        summary += (f"; crossed: {crosses}" if crosses else "") + (f"; errors: {errors}" if errors else "")
    elif median_sep <= 2 * tol or not attributions:
        status = "INCONCLUSIVE"
        summary += "; the references cannot tell requests apart (a context does not move these log-probabilities)"
    else:
        status = "PASS"
    return CrossCheck(status=status, counts=counts, distinct_references=sum(s > 2 * tol for s in seps),
                      requests=len(references), message=summary)
