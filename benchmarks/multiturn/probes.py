"""Requests whose every output can be checked: a distinct random prompt, then one fixed continuation.

Each probe is sent greedy with ``return_logprob`` from the continuation on, so a response carries two
witnesses of what the request attended to: its output ids, and the log-probability of each continuation token
(see ``checks`` for why the second one exists and when it can tell requests apart). Its reference is the same
probe sent alone on an empty cache. Prompts depend only on (seed, name, length), so a resumed run rebuilds
the same probes.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field

from benchmarks.multiturn.checks import (CrossCheck, attribute, attribute_logprobs, cross_check, logprob_check)
from benchmarks.multiturn.client import SGLangClient, new_rid
from benchmarks.multiturn.workload import token_id_range
from sgl_minference.checks import check

COMPARE_MODES = ("logprobs", "tokens")


@dataclass(kw_only=True)
class Probe:
    name: str
    kind: str  # "long" or "short"
    prompt: list[int]
    continuation: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt + self.continuation


def uniform_lengths(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """``n`` lengths drawn uniformly from ``[low, high]``."""
    check(0 < low <= high, "low", f"need 0 < low <= high, got {low}..{high}")
    return [rng.randint(low, high) for _ in range(n)]


def log_uniform_lengths(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    """``n`` lengths drawn log-uniformly from ``[low, high]`` (as many 1K-2K prompts as 64K-128K ones)."""
    check(0 < low <= high, "low", f"need 0 < low <= high, got {low}..{high}")
    return [min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high)))))) for _ in range(n)]


def make_probes(specs: list[tuple[str, str, int]], *, vocab_size: int, seed: int,
                continuation_tokens: int) -> list[Probe]:
    """One probe per ``(name, kind, prompt length)``; names must be distinct. Every probe ends with the same
    ``continuation_tokens`` seeded ids."""
    check(continuation_tokens > 0, "continuation_tokens", f"must be positive, got {continuation_tokens}")
    check(len({name for name, _, _ in specs}) == len(specs), "specs", "probe names must be distinct")
    low, high = token_id_range(vocab_size)
    cont_rng = random.Random(f"sgl-minference-probe-continuation:{seed}")
    continuation = [cont_rng.randrange(low, high) for _ in range(continuation_tokens)]
    probes = []
    for name, kind, length in specs:
        check(length > 0, "specs", f"probe {name}: prompt length must be positive, got {length}")
        rng = random.Random(f"sgl-minference-probe:{seed}:{name}:{length}")
        probes.append(Probe(name=name, kind=kind, prompt=[rng.randrange(low, high) for _ in range(length)],
                            continuation=list(continuation)))
    return probes


@dataclass(kw_only=True)
class Outcome:
    """What one probe request came back with."""

    name: str
    kind: str
    error: str | None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)  # one per continuation token
    ttft_s: float | None = None
    latency_s: float = 0.0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    started_s: float = 0.0  # since the start of its run (time.monotonic based)
    started_at: float = 0.0  # time.time() when sent

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first_token_s(self) -> float | None:
        """When its first token arrived, on the run's clock (None without one)."""
        return None if self.ttft_s is None else self.started_s + self.ttft_s


def send(client: SGLangClient, probe: Probe, *, max_new_tokens: int, t0: float | None = None) -> Outcome:
    """Send ``probe`` streamed and greedy with log-probabilities from its continuation on; ``t0`` is the run's
    ``time.monotonic()`` zero for ``started_s``."""
    started = time.monotonic()
    started_at = time.time()
    reply = client.generate(probe.input_ids, max_new_tokens=max_new_tokens, ignore_eos=True, stream=True,
                            rid=new_rid(), logprob_start_len=len(probe.prompt))
    error = reply.error
    entries = reply.input_logprobs
    if error is None and [tid for _, tid in entries] != probe.continuation:
        # The ids come back from the server: other ids mean the numbers belong to another request's input.
        error = (f"log-probabilities returned for {len(entries)} positions whose ids are not this request's "
                 f"{len(probe.continuation)}-token continuation")
    return Outcome(name=probe.name, kind=probe.kind, error=error, output_ids=list(reply.output_ids),
                   logprobs=[lp for lp, _ in entries], ttft_s=reply.ttft_s, latency_s=reply.latency_s,
                   prompt_tokens=reply.prompt_tokens, cached_tokens=reply.cached_tokens,
                   completion_tokens=reply.completion_tokens, started_s=started - (t0 if t0 is not None else started),
                   started_at=started_at)


def send_alone(client: SGLangClient, probe: Probe, *, max_new_tokens: int) -> Outcome:
    """The probe alone on an empty cache: its reference (an error if the cache cannot be emptied, which means
    some request never finished)."""
    if not client.flush_cache():
        return Outcome(name=probe.name, kind=probe.kind,
                       error="could not flush the radix cache: requests still running after 60 s")
    return send(client, probe, max_new_tokens=max_new_tokens)


def warm_up(client: SGLangClient, lengths: list[int], *, vocab_size: int, max_new_tokens: int) -> list[dict]:
    """One throw-away request per prompt length before anything is timed: kernels that compile on first use
    (FlashInfer's JIT variants, the sparse path's Triton kernels) do it here. Returns what each took."""
    probes = make_probes([(f"warmup-{n}", "warmup", n) for n in lengths], vocab_size=vocab_size, seed=-1,
                         continuation_tokens=4)
    out = []
    for p in probes:
        o = send_alone(client, p, max_new_tokens=max_new_tokens)
        out.append({"prompt_tokens": len(p.input_ids), "latency_s": o.latency_s, "error": o.error})
    return out


@dataclass(kw_only=True)
class Comparison:
    """Every response of a run against its reference, both ways."""

    tokens: CrossCheck
    logprobs: CrossCheck
    token_attributions: list[dict]
    logprob_attributions: list[dict]

    def decisive(self, mode: str) -> CrossCheck:
        check(mode in COMPARE_MODES, "mode", f"{mode!r} is not one of {COMPARE_MODES}")
        return self.logprobs if mode == "logprobs" else self.tokens


def compare(outcomes: list[Outcome], references: dict[str, Outcome], *, tol: float) -> Comparison:
    """Attribute every outcome by output ids and by continuation log-probabilities."""
    ref_ids = {n: r.output_ids for n, r in references.items()}
    ref_lps = {n: r.logprobs for n, r in references.items()}
    tok = [attribute(o.name, o.output_ids, ref_ids, o.error) for o in outcomes]
    lps = [attribute_logprobs(o.name, o.logprobs, ref_lps, tol=tol, error=o.error) for o in outcomes]
    return Comparison(tokens=cross_check(tok, ref_ids), logprobs=logprob_check(lps, ref_lps, tol=tol),
                      token_attributions=[dataclasses.asdict(a) for a in tok],
                      logprob_attributions=[dataclasses.asdict(a) for a in lps])


def equal_alone(result: CrossCheck, mode: str, *, tol: float) -> tuple[str, str]:
    """(status, message) of "every output equals the same request sent alone" under ``mode``: FAIL on any
    error, crossed or drifted response; INCONCLUSIVE when the references cannot tell requests apart (equality
    then says nothing); else PASS."""
    c = result.counts
    n = sum(c.values())
    what = f"within {tol:g} in every continuation log-probability" if mode == "logprobs" else "identical output ids"
    msg = f"{c['exact']} of {n} responses equal to the same request sent alone ({what})"
    if c["error"] or c["cross"] or c["drift"]:
        return "FAIL", f"{msg}; {c['drift']} drifted, {c['cross']} crossed, {c['error']} errors"
    if result.status == "INCONCLUSIVE":
        return "INCONCLUSIVE", f"{msg}, but the references cannot tell requests apart"
    return "PASS", msg


def outcome_record(o: Outcome) -> dict:
    """An outcome for the results file (output ids and log-probabilities kept: they are the evidence)."""
    return dataclasses.asdict(o)


def outcome_from_record(d: dict) -> Outcome:
    return Outcome(**{f.name: d[f.name] for f in dataclasses.fields(Outcome) if f.name in d})
