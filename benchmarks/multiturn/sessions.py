"""Sending a shared context's queries to a server, one record per turn, and summarising the records.

``multiturn``: one session; turn k's prompt is turn k-1's prompt + its reply + the next question, sent only
after turn k-1 finished (so the radix cache holds the whole previous prompt). ``multirequest``: every query is
its own request over the same context; the first one is sent alone (it fills the cache), the rest after it,
``concurrency`` at a time.
"""

from __future__ import annotations

import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from benchmarks.multiturn.checks import score_reply
from benchmarks.multiturn.client import Reply, SGLangClient
from benchmarks.multiturn.prompts import PromptFormat, multiturn_prompt
from benchmarks.multiturn.workload import Query, SharedContext
from sgl_minference.checks import check

MODES = ("multiturn", "multirequest")


@dataclass(kw_only=True)
class TurnRecord:
    """One request of a session."""

    backend: str  # attention backend the server ran
    mode: str  # one of MODES
    task: str
    context_id: str
    target_tokens: int  # requested context length
    context_tokens: int  # actual context length
    turn: int  # 1-based: the turn (multiturn) or the query index (multirequest)
    prompt_tokens: int  # ids sent
    cached_tokens: int | None  # prompt ids served from the radix cache (meta_info)
    ttft_s: float | None  # send -> first streamed token
    latency_s: float
    completion_tokens: int | None
    accuracy: float | None  # share of expected answers in the reply; None for token mode and errors
    reply: str | None  # the reply text, cut to 300 characters (None under --skip-tokenizer-init)
    expected: list[str] = field(default_factory=list)
    error: str | None = None


def _record(reply: Reply, *, backend: str, mode: str, ctx: SharedContext, turn: int, query: Query,
            prompt_tokens: int) -> TurnRecord:
    accuracy = score_reply(query.answers, reply.text) if query.answers and reply.ok else None
    return TurnRecord(backend=backend, mode=mode, task=ctx.task, context_id=ctx.context_id,
                      target_tokens=ctx.target_tokens, context_tokens=ctx.context_tokens, turn=turn,
                      prompt_tokens=prompt_tokens, cached_tokens=reply.cached_tokens, ttft_s=reply.ttft_s,
                      latency_s=reply.latency_s, completion_tokens=reply.completion_tokens, accuracy=accuracy,
                      reply=None if reply.text is None else reply.text[:300], expected=list(query.answers),
                      error=reply.error)


def _send(client: SGLangClient, fmt: PromptFormat, ids: list[int], max_new_tokens: int) -> Reply:
    return client.generate(ids, max_new_tokens=max_new_tokens, stop=fmt.stop, ignore_eos=fmt.ignore_eos, stream=True)


def run_multiturn(client: SGLangClient, fmt: PromptFormat, ctx: SharedContext, *, backend: str, turns: int,
                  max_new_tokens: int) -> list[TurnRecord]:
    """Ask the first ``turns`` queries of ``ctx`` as one conversation; stops at the first failed turn."""
    check(1 <= turns <= len(ctx.queries), "turns", f"{turns} not in [1, {len(ctx.queries)}]")
    records, replies = [], []
    for k in range(turns):
        ids = multiturn_prompt(fmt, ctx, replies)
        reply = _send(client, fmt, ids, max_new_tokens)
        records.append(_record(reply, backend=backend, mode="multiturn", ctx=ctx, turn=k + 1,
                               query=ctx.queries[k], prompt_tokens=len(ids)))
        if not reply.ok:
            break
        replies.append((reply.text, reply.output_ids))
    return records


def run_multirequest(client: SGLangClient, fmt: PromptFormat, ctx: SharedContext, *, backend: str, turns: int,
                     max_new_tokens: int, concurrency: int = 1) -> list[TurnRecord]:
    """Ask the first ``turns`` queries of ``ctx`` as separate requests sharing the context."""
    check(1 <= turns <= len(ctx.queries), "turns", f"{turns} not in [1, {len(ctx.queries)}]")
    check(concurrency >= 1, "concurrency", f"must be >= 1, got {concurrency}")
    prompts = [fmt.first(ctx, q) for q in ctx.queries[:turns]]

    def one(k: int) -> TurnRecord:
        reply = _send(client, fmt, prompts[k], max_new_tokens)
        return _record(reply, backend=backend, mode="multirequest", ctx=ctx, turn=k + 1, query=ctx.queries[k],
                       prompt_tokens=len(prompts[k]))

    records = [one(0)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        records += list(pool.map(one, range(1, turns)))
    return records


def run_session(mode: str, client: SGLangClient, fmt: PromptFormat, ctx: SharedContext, *, backend: str,
                turns: int, max_new_tokens: int, concurrency: int = 1) -> list[TurnRecord]:
    if mode == "multiturn":
        return run_multiturn(client, fmt, ctx, backend=backend, turns=turns, max_new_tokens=max_new_tokens)
    if mode == "multirequest":
        return run_multirequest(client, fmt, ctx, backend=backend, turns=turns, max_new_tokens=max_new_tokens,
                                concurrency=concurrency)
    raise ValueError(f"mode: {mode!r} is not one of {MODES}")


# ----------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize(records: list[dict]) -> list[dict]:
    """Per (backend, mode, task, target length, turn): request count, errors, mean/median TTFT, mean cached
    tokens and cached share of the context, mean accuracy. ``records`` are :class:`TurnRecord` dicts."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["backend"], r["mode"], r["task"], r["target_tokens"], r["turn"]), []).append(r)
    rows = []
    for (backend, mode, task, target, turn), rs in sorted(groups.items()):
        ok = [r for r in rs if r["error"] is None]
        ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        cached = [r["cached_tokens"] for r in ok if r["cached_tokens"] is not None]
        share = [r["cached_tokens"] / r["context_tokens"] for r in ok if r["cached_tokens"] is not None]
        acc = [r["accuracy"] for r in ok if r["accuracy"] is not None]
        rows.append({
            "backend": backend, "mode": mode, "task": task, "target_tokens": target, "turn": turn,
            "requests": len(rs), "errors": len(rs) - len(ok),
            "context_tokens": _mean([r["context_tokens"] for r in rs]),
            "prompt_tokens": _mean([r["prompt_tokens"] for r in rs]),
            "ttft_mean_s": _mean(ttft), "ttft_median_s": statistics.median(ttft) if ttft else None,
            "cached_tokens_mean": _mean(cached), "cached_share_mean": _mean(share), "accuracy_mean": _mean(acc),
        })
    return rows


def compare(rows: list[dict], *, sparse: str, dense: str) -> list[dict]:
    """Join :func:`summarize` rows of two backends on (mode, task, length, turn): TTFT speedup
    (dense / sparse), cached shares and accuracies side by side."""
    by_key = {(r["backend"], r["mode"], r["task"], r["target_tokens"], r["turn"]): r for r in rows}
    out = []
    for (backend, *key), s in sorted(by_key.items()):
        d = by_key.get((dense, *key))
        if backend != sparse or d is None:
            continue
        speedup = (d["ttft_mean_s"] / s["ttft_mean_s"]) if s["ttft_mean_s"] and d["ttft_mean_s"] else None
        out.append({"mode": key[0], "task": key[1], "target_tokens": key[2], "turn": key[3],
                    "ttft_sparse_s": s["ttft_mean_s"], "ttft_dense_s": d["ttft_mean_s"], "ttft_speedup": speedup,
                    "cached_share_sparse": s["cached_share_mean"], "cached_share_dense": d["cached_share_mean"],
                    "accuracy_sparse": s["accuracy_mean"], "accuracy_dense": d["accuracy_mean"],
                    "errors": s["errors"] + d["errors"]})
    return out


@dataclass(kw_only=True)
class Expectations:
    """Thresholds of the issue's expectation: sparse first turns are faster, later turns hit the cache,
    and sparse answers are as accurate as dense ones."""

    min_first_turn_speedup: float = 1.0  # turn-1 dense TTFT / sparse TTFT must exceed this
    min_cached_share: float = 0.95  # turns >= 2: cached tokens / context tokens
    max_accuracy_drop: float = 0.05  # dense accuracy - sparse accuracy, per turn


def expectation_lines(comparison: list[dict], exp: Expectations) -> list[str]:
    """One ``PASS``/``FAIL`` line per (mode, task, length) with the numbers behind it."""
    groups: dict[tuple, list[dict]] = {}
    for c in comparison:
        groups.setdefault((c["mode"], c["task"], c["target_tokens"]), []).append(c)
    lines = []
    for (mode, task, target), cs in sorted(groups.items()):
        cs.sort(key=lambda c: c["turn"])
        first, later = cs[0], cs[1:]
        problems = []
        if first["turn"] != 1 or first["ttft_speedup"] is None:
            problems.append("no turn-1 timing")
        elif first["ttft_speedup"] <= exp.min_first_turn_speedup:
            problems.append(f"turn-1 speedup {first['ttft_speedup']:.2f}x <= {exp.min_first_turn_speedup}")
        for c in later:
            share = c["cached_share_sparse"]
            if share is None or share < exp.min_cached_share:
                problems.append(f"turn {c['turn']} cached share {share} < {exp.min_cached_share}")
        for c in cs:
            a_s, a_d = c["accuracy_sparse"], c["accuracy_dense"]
            if a_s is not None and a_d is not None and a_d - a_s > exp.max_accuracy_drop:
                problems.append(f"turn {c['turn']} accuracy {a_s:.2f} vs dense {a_d:.2f}")
            if c["errors"]:
                problems.append(f"turn {c['turn']}: {c['errors']} failed requests")
        speed = f"{first['ttft_speedup']:.2f}x" if first["ttft_speedup"] else "n/a"
        shares = [c["cached_share_sparse"] for c in later if c["cached_share_sparse"] is not None]
        accs = [(c["accuracy_sparse"], c["accuracy_dense"]) for c in cs
                if c["accuracy_sparse"] is not None and c["accuracy_dense"] is not None]
        facts = (f"turn-1 TTFT speedup {speed}; later-turn cached share "
                 f"{min(shares):.3f}..{max(shares):.3f}" if shares else f"turn-1 TTFT speedup {speed}; no later turns")
        if accs:
            facts += "; accuracy sparse/dense per turn " + " ".join(f"{s:.2f}/{d:.2f}" for s, d in accs)
        status = "FAIL" if problems else "PASS"
        lines.append(f"{status} expectation {mode} {task} {target}: {facts}" + (f" -- {'; '.join(problems)}" if problems else ""))
    return lines
