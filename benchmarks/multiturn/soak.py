"""``soak``: a long mixed load that stops by itself, checked for errors, cross-request answers and memory growth.

``--clients`` threads send random picks of a pool of ``--prompts`` distinct probes (prompt lengths drawn
log-uniformly from ``--length-range``, each followed by the fixed continuation) until ``--max-requests`` were
sent or ``--duration-s`` passed, whichever comes first. Every probe of the pool is first sent alone on an empty
cache for its reference. With the radix cache on, a probe sent again hits the cache for all but its last token;
start the server with ``--disable-radix-cache`` to make every request a full prefill.

It runs in segments so that it fits commands of bounded length: ``--segment-s`` ends this command's share;
``--resume`` continues the results file of the previous segment (same settings: the probes and references are
reused; the request and time budgets are what the earlier segments left). With ``--attach`` every segment
uses the same detached server, and the memory trend spans all of them; with launched servers each segment
has its own server, and each segment's trend is checked on its own.

Checks, over all segments so far:

* ``soak-progress``: how far the soak got (PASS once a bound was reached; INCONCLUSIVE while budget is left),
  with TTFT p50/p99 overall and per length bucket.
* ``soak-errors``: error responses (must be 0).
* ``soak-cross-request``: responses that are another request's (must be 0; ``--compare``, as in ``cold``).
* ``soak-memory-trend``: a line fitted to the second half of the GPU memory samples rises by at most
  ``--trend-slack-mib`` over that half.
* ``soak-idle``: after this segment no request is left, no KV slot held, and memory is back to idle.
* ``soak-crash``: in every segment the server stayed alive and healthy and logged no traceback or KV leak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import threading
import time
from pathlib import Path

from benchmarks.multiturn import probes
from benchmarks.multiturn.argcheck import parse_range
from benchmarks.multiturn.checklist import Checks
from benchmarks.multiturn.cold import add_comparison_arguments, add_memory_arguments
from benchmarks.multiturn.harness import (back_to_idle, dummy_weights, idle_memory, limits, log_path, server_failed,
                                          vocab_size)
from benchmarks.multiturn.server import ServerStartError, log_problems, log_size, server_for
from benchmarks.multiturn.stats import latency_summary, memory_trend
from sgl_minference.gpu_memory import MemoryPoller

BUCKETS = ((0, 8192, "<=8K"), (8192, 32768, "8K-32K"), (32768, 1 << 40, ">32K"))


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--clients", type=int, default=16)
    sp.add_argument("--prompts", type=int, default=48, help="distinct probes in the pool (each gets a reference)")
    sp.add_argument("--length-range", type=parse_range, default=parse_range("1K-128K"),
                    help="prompt lengths, drawn log-uniformly (capped to what the server accepts)")
    sp.add_argument("--duration-s", type=float, default=1200.0, help="total sending time over all segments")
    sp.add_argument("--max-requests", type=int, default=2000, help="total requests over all segments")
    sp.add_argument("--segment-s", type=float, help="this command sends for at most this long (default: all)")
    sp.add_argument("--resume", action="store_true", help="continue the soak in --out")
    sp.add_argument("--trend-slack-mib", type=int, default=256)
    add_comparison_arguments(sp)
    add_memory_arguments(sp)
    sp.set_defaults(memory_interval_s=2.0)


def _fingerprint(args, vocab: int, model: str | None) -> dict:
    """What must match for ``--resume`` to continue a soak: everything the probes and references depend on."""
    return {"backend": args.backend, "model": model, "vocab": vocab, "seed": args.seed, "prompts": args.prompts,
            "length_range": list(args.length_range), "continuation_tokens": args.continuation_tokens,
            "max_new_tokens": args.max_new_tokens}


def _previous(args) -> dict | None:
    path = Path(args.out)
    if not (args.resume and path.is_file()):
        return None
    data = json.loads(path.read_text())
    if data.get("kind") != "reliability-soak":
        raise SystemExit(f"--resume: {path} is not a soak result")
    return data


def run_soak(client, pool: list[probes.Probe], *, clients: int, max_requests: int, duration_s: float,
             max_new_tokens: int, seed: str) -> tuple[list[probes.Outcome], float]:
    """``clients`` threads send random picks of ``pool`` until ``max_requests`` were sent or ``duration_s``
    passed (requests in flight then finish). Returns outcomes in completion order and the wall time."""
    lock = threading.Lock()
    sent = [0]
    done: list[probes.Outcome] = []
    t0 = time.monotonic()

    def worker(i: int) -> None:
        rng = random.Random(f"sgl-minference-soak-client:{seed}:{i}")
        while True:
            with lock:
                if sent[0] >= max_requests or time.monotonic() - t0 >= duration_s:
                    return
                sent[0] += 1
            o = probes.send(client, pool[rng.randrange(len(pool))], max_new_tokens=max_new_tokens, t0=t0)
            with lock:
                done.append(o)

    threads = [threading.Thread(target=worker, args=(i,), name=f"soak-client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, time.monotonic() - t0


def ttft_by_bucket(outcomes: list[probes.Outcome]) -> dict:
    ok = [o for o in outcomes if o.ok and o.ttft_s is not None]
    out = {"all": latency_summary([o.ttft_s for o in ok])}
    for lo, hi, label in BUCKETS:
        out[label] = latency_summary([o.ttft_s for o in ok if lo < (o.prompt_tokens or 0) <= hi])
    return out


def _trend_series(segments: list[dict]) -> list[tuple[str, list[tuple[float, int]]]]:
    """Memory series to fit: one per server (segments attached to the same detached server join up)."""
    series: dict[str, list[tuple[float, int]]] = {}
    for seg in segments:
        srv = seg.get("server") or {}
        key = f"pid {srv['pid']} at {srv['url']}" if srv.get("attached") else f"segment {seg['index']}"
        series.setdefault(key, []).extend((float(t), int(m)) for t, m in seg["memory"]["samples"])
    return [(k, sorted(v)) for k, v in series.items()]


def cmd_soak(args, checks: Checks, out: dict) -> None:
    prev = _previous(args)
    segments: list[dict] = list(prev["segments"]) if prev else []
    done_requests = sum(seg["requests"] for seg in segments)
    done_s = sum(seg["wall_s"] for seg in segments)
    left_requests, left_s = args.max_requests - done_requests, args.duration_s - done_s
    out["segments"] = segments
    if prev is not None:
        out.update({k: prev[k] for k in ("fingerprint", "references", "compare", "limits") if k in prev})
    log = log_path(args, "soak")
    if left_requests > 0 and left_s > 0:
        try:
            with server_for(args, args.backend, log_path=log) as srv:
                segment = _segment(args, checks, out, prev, srv, left_requests, left_s, len(segments))
        except ServerStartError as e:
            server_failed(checks, "soak", e)
            return
        if segment is None:
            return
        segments.append(segment)
    else:
        print(f"soak already complete in {args.out}: {done_requests} requests over {done_s:.0f} s", flush=True)
    _verdicts(args, checks, out, segments)


def _segment(args, checks: Checks, out: dict, prev: dict | None, srv, left_requests: int, left_s: float,
             index: int) -> dict | None:
    """Run this command's share of the soak on ``srv``; returns its segment record (None if it could not
    start)."""
    client = srv.client(timeout_s=args.request_timeout_s)
    lim = limits(client, args)
    info = lim.pop("info")
    out["limits"] = lim
    vocab = vocab_size(args, info)
    mode = args.compare or ("logprobs" if dummy_weights(args, info) else "tokens")
    out["compare"] = {"mode": mode, "logprob_tol": args.logprob_tol}
    fingerprint = _fingerprint(args, vocab, args.model or info.get("model_path"))
    if prev is not None and prev.get("fingerprint") != fingerprint:
        raise SystemExit(f"--resume: settings differ from {args.out}: {prev.get('fingerprint')} vs {fingerprint}")
    out["fingerprint"] = fingerprint
    cap = lim["longest_input"] - args.continuation_tokens
    rng = random.Random(f"sgl-minference-soak:{args.seed}")
    lengths = [min(n, cap) for n in probes.log_uniform_lengths(rng, args.prompts, *args.length_range)]
    pool = probes.make_probes([(f"p{i:03d}", "long" if n > 32768 else "short", n) for i, n in enumerate(lengths)],
                              vocab_size=vocab, seed=args.seed, continuation_tokens=args.continuation_tokens)
    warm = probes.warm_up(client, sorted({max(lengths), min(lengths)}), vocab_size=vocab,
                          max_new_tokens=args.max_new_tokens)
    if prev is not None:
        refs = {d["name"]: probes.outcome_from_record(d) for d in prev["references"]}
    else:
        refs = {p.name: probes.send_alone(client, p, max_new_tokens=args.max_new_tokens) for p in pool}
    out["references"] = [probes.outcome_record(r) for r in refs.values()]
    bad = {n: r.error for n, r in refs.items() if not r.ok}
    if bad:
        checks.add("soak-references", "FAIL", f"{len(bad)} of {len(pool)} probes failed alone: {bad}")
        return None

    client.flush_cache()
    idle_mib, _, mem_error = idle_memory(gpu=args.gpu)
    log_start = log_size(srv.log_path)
    budget_s = min(left_s, args.segment_s) if args.segment_s else left_s
    started_at = time.time()
    with MemoryPoller(gpu=args.gpu, interval_s=args.memory_interval_s) as mem:
        outcomes, wall = run_soak(client, pool, clients=args.clients, max_requests=left_requests, duration_s=budget_s,
                                  max_new_tokens=args.max_new_tokens, seed=f"{args.seed}:{index}")
    # After the load (the flush in there returns cached blocks to the driver: not part of the load's trend).
    idle = back_to_idle(checks, "soak-idle", client, gpu=args.gpu, idle_mib=idle_mib, slack_mib=args.memory_slack_mib,
                        timeout_s=args.idle_timeout_s)
    alive, healthy = srv.alive(), client.healthy()
    zero = mem.started_at or started_at
    return {"index": index, "server": srv.describe(), "started_at": started_at, "wall_s": wall,
            "requests": len(outcomes), "warmup": warm, "outcomes": [probes.outcome_record(o) for o in outcomes],
            "memory": {"samples": [(zero + t, mib) for t, mib in mem.samples], "error": mem.error or mem_error,
                       "idle_mib": idle_mib},
            "idle": {k: v for k, v in idle.items() if k != "memory_readings"},
            "alive": alive, "healthy": healthy, "log_problems": log_problems(srv.log_path, log_start)}


def _verdicts(args, checks: Checks, out: dict, segments: list[dict]) -> None:
    if not segments:
        return
    refs = {d["name"]: probes.outcome_from_record(d) for d in out.get("references") or []}
    outcomes = [probes.outcome_from_record(d) for seg in segments for d in seg["outcomes"]]
    requests, wall = len(outcomes), sum(seg["wall_s"] for seg in segments)
    ttft = ttft_by_bucket(outcomes)
    out["performance"] = {"requests": requests, "wall_s": wall, "ttft_s": ttft,
                          "requests_per_s": requests / wall if wall > 0 else None}
    finished = requests >= args.max_requests or wall >= args.duration_s - 1.0
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    buckets = "; ".join(f"{label} n={ttft[label]['n']} p50 {fmt(ttft[label]['p50'])} p99 {fmt(ttft[label]['p99'])}"
                        for _, _, label in BUCKETS)
    checks.add("soak-progress", "PASS" if finished else "INCONCLUSIVE",
               f"{requests} requests from {args.clients} clients over {wall:.0f} s in {len(segments)} segment(s) "
               f"(bounds {args.max_requests} requests / {args.duration_s:.0f} s"
               f"{'' if finished else '; resume to go on'}); "
               f"TTFT p50 {fmt(ttft['all']['p50'])} s, p99 {fmt(ttft['all']['p99'])} s ({buckets})",
               requests=requests, wall_s=wall)

    errors = [o for o in outcomes if not o.ok]
    checks.add("soak-errors", "FAIL" if errors else "PASS",
               f"{len(errors)} error responses of {requests}"
               + (f": {sorted({o.error for o in errors})[:3]}" if errors else ""), errors=len(errors))

    mode = out["compare"]["mode"]
    cmp = probes.compare(outcomes, refs, tol=args.logprob_tol)
    decisive = cmp.decisive(mode)
    out["comparison"] = {"tokens": dataclasses.asdict(cmp.tokens), "logprobs": dataclasses.asdict(cmp.logprobs)}
    checks.add("soak-cross-request", decisive.status, f"by {mode}: {decisive.message}", counts=decisive.counts,
               mismatches=decisive.counts["cross"])

    trends = [(key, memory_trend(samples, slack_mib=args.trend_slack_mib)) for key, samples in _trend_series(segments)]
    order = {"FAIL": 0, "INCONCLUSIVE": 1, "PASS": 2}
    worst = min((v.status for _, v in trends), key=order.get, default="INCONCLUSIVE")
    checks.add("soak-memory-trend", worst, "; ".join(f"{key}: {v.message}" for key, v in trends),
               trends=[{"series": key, **dataclasses.asdict(v)} for key, v in trends])

    bad = [seg["index"] for seg in segments
           if not (seg["alive"] and seg["healthy"]) or any(seg["log_problems"].values())]
    checks.add("soak-crash", "FAIL" if bad else "PASS",
               f"{len(segments)} segment(s); server alive and healthy after each, log problems "
               f"{[seg['log_problems'] for seg in segments]}" + (f"; failed in segments {bad}" if bad else ""))
