"""Pure checks on replies: answer matching, and which request a response belongs to.

Cross-request check: each response of a load run is compared with its reference (the same request sent
alone, greedy). Batching, chunking and cache hits change floating-point sums, so a long greedy output may
drift from its reference at some token without anything being wrong; a response that *is* another
request's reference output while differing from its own means a request got another request's answer.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from benchmarks.multiturn.argcheck import check

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
