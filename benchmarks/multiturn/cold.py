"""``cold``: many long prompts prefilling at once on an empty cache, with short prompts in between.

``--clients`` threads each send their share of ``--long-prompts`` distinct long prompts (lengths drawn from
``--long-range``) alternating with ``--short-prompts`` short ones, so every client starts with a long prefill.
Before that, every probe is sent alone on an empty cache (its reference), and the cache is flushed again, so
the concurrent prefills are cold whether the radix cache is on or off (``--disable-radix-cache``). Checks:

* ``cold-errors``: no error response.
* ``cold-prefills``: the long requests were full prefills (no cached tokens), and how many overlapped.
* ``cold-isolation``: no response is another request's (``checks``): by continuation log-probabilities on
  dummy weights, by output ids on real ones (``--compare``); INCONCLUSIVE when the references cannot tell
  the requests apart.
* ``cold-equal-alone``: every response equals the same request sent alone (``--logprob-tol`` for logprobs).
* ``cold-idle``: afterwards no request left, no KV slot held, GPU memory back to its idle level.
* ``cold-crash``: the server is alive and healthy and logged no traceback and no KV-pool leak warning.

The results also give TTFT (alone and under load, long and short) and throughput per backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import threading
import time

from benchmarks.multiturn import probes
from benchmarks.multiturn.argcheck import parse_range
from benchmarks.multiturn.checklist import Checks
from benchmarks.multiturn.harness import (back_to_idle, dummy_weights, idle_memory, limits, log_path, server_failed,
                                          vocab_size)
from benchmarks.multiturn.server import ServerStartError, log_problems, log_size, server_for
from benchmarks.multiturn.stats import latency_summary
from sgl_minference.gpu_memory import MemoryPoller


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--clients", type=int, default=8)
    sp.add_argument("--long-prompts", type=int, default=16)
    sp.add_argument("--long-range", type=parse_range, default=parse_range("64K-128K"),
                    help="long prompt lengths, drawn uniformly (capped to what the server accepts)")
    sp.add_argument("--short-prompts", type=int, default=16)
    sp.add_argument("--short-range", type=parse_range, default=parse_range("256-2K"))
    sp.add_argument("--duration-s", type=float, default=420.0, help="no client sends a request after this")
    add_comparison_arguments(sp)
    add_memory_arguments(sp)


def add_comparison_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--continuation-tokens", type=int, default=16,
                    help="fixed tokens after every prompt whose log-probabilities are compared")
    sp.add_argument("--compare", choices=probes.COMPARE_MODES,
                    help="what decides isolation and equality: default logprobs on dummy weights, tokens on real")
    # Dummy weights: a position's log-probability depends on its own token alone (attention is rounded away),
    # so a re-run of the same computation differs by fp32 rounding of a ~12-nat value (~1e-6); 1e-3 leaves
    # room for batch-shape-dependent GEMM rounding. Real weights: set it from the dense backend's own drift.
    sp.add_argument("--logprob-tol", type=float, default=1e-3, help="max |log-probability difference| for equal")


def add_memory_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--gpu", type=int, default=0, help="nvidia-smi GPU index to poll")
    sp.add_argument("--memory-interval-s", type=float, default=0.5)
    sp.add_argument("--memory-slack-mib", type=int, default=512)
    sp.add_argument("--idle-timeout-s", type=float, default=120.0,
                    help="bound on each wait for the server to go idle and memory to come back")


def schedule(long_names: list[str], short_names: list[str], clients: int) -> list[list[str]]:
    """Per client, the probe names it sends in order: longs dealt round-robin, each followed by one of the
    shorts dealt the same way, so every client opens with a long prefill and shorts land between them."""
    longs = [long_names[c::clients] for c in range(clients)]
    shorts = [short_names[c::clients] for c in range(clients)]
    out = []
    for ls, ss in zip(longs, shorts):
        order = []
        for i in range(max(len(ls), len(ss))):
            order += ls[i:i + 1] + ss[i:i + 1]
        out.append(order)
    return out


def run_clients(client, by_name: dict[str, probes.Probe], plan: list[list[str]], *, max_new_tokens: int,
                deadline_s: float) -> tuple[list[probes.Outcome], float]:
    """One thread per client list, each sending its probes one after another; a client sends nothing after
    ``deadline_s`` (requests in flight then finish, each bounded by the client's timeout). Returns outcomes in
    completion order and the run's wall time."""
    lock = threading.Lock()
    done: list[probes.Outcome] = []
    t0 = time.monotonic()

    def worker(names: list[str]) -> None:
        for name in names:
            if time.monotonic() - t0 >= deadline_s:
                return
            o = probes.send(client, by_name[name], max_new_tokens=max_new_tokens, t0=t0)
            with lock:
                done.append(o)

    threads = [threading.Thread(target=worker, args=(names,), name=f"cold-client-{i}") for i, names in enumerate(plan)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, time.monotonic() - t0


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals ``[start, end)`` open at one time."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    peak = cur = 0
    for _, step in events:
        cur += step
        peak = max(peak, cur)
    return peak


def performance(outcomes: list[probes.Outcome], references: dict[str, probes.Outcome], wall_s: float) -> dict:
    """TTFT under load and alone (per kind), and the run's throughput."""
    perf = {"wall_s": wall_s}
    for kind in ("long", "short"):
        ours = [o for o in outcomes if o.kind == kind and o.ok and o.ttft_s is not None]
        alone = [references[o.name].ttft_s for o in ours if references[o.name].ttft_s is not None]
        perf[f"{kind}_ttft_s"] = latency_summary([o.ttft_s for o in ours])
        perf[f"{kind}_ttft_alone_s"] = latency_summary(alone)
    ok = [o for o in outcomes if o.ok]
    prefilled = sum((o.prompt_tokens or 0) - (o.cached_tokens or 0) for o in ok)
    generated = sum(o.completion_tokens or 0 for o in ok)
    perf.update(requests=len(outcomes), prefill_tokens=prefilled, output_tokens=generated,
                prefill_tokens_per_s=prefilled / wall_s if wall_s > 0 else None,
                requests_per_s=len(outcomes) / wall_s if wall_s > 0 else None)
    return perf


def cmd_cold(args, checks: Checks, out: dict) -> None:
    log = log_path(args, "cold")
    try:
        with server_for(args, args.backend, log_path=log) as srv:
            out["server"] = srv.describe()
            client = srv.client(timeout_s=args.request_timeout_s)
            lim = limits(client, args)
            info = lim.pop("info")
            out["limits"] = lim
            out["radix_cache"] = not info.get("disable_radix_cache", False)
            vocab = vocab_size(args, info)
            mode = args.compare or ("logprobs" if dummy_weights(args, info) else "tokens")
            out["compare"] = {"mode": mode, "logprob_tol": args.logprob_tol}
            k = args.continuation_tokens
            cap = lim["longest_input"] - k
            rng = random.Random(f"sgl-minference-cold:{args.seed}")
            long_lens = [min(n, cap) for n in probes.uniform_lengths(rng, args.long_prompts, *args.long_range)]
            short_lens = [min(n, cap) for n in probes.uniform_lengths(rng, args.short_prompts, *args.short_range)]
            specs = ([(f"long{i:02d}", "long", n) for i, n in enumerate(long_lens)] +
                     [(f"short{i:02d}", "short", n) for i, n in enumerate(short_lens)])
            plist = probes.make_probes(specs, vocab_size=vocab, seed=args.seed, continuation_tokens=k)
            by_name = {p.name: p for p in plist}
            out["probes"] = [{"name": p.name, "kind": p.kind, "prompt_tokens": len(p.prompt)} for p in plist]

            t0 = time.monotonic()
            out["warmup"] = probes.warm_up(client, sorted({max(long_lens, default=cap), max(short_lens, default=256)}),
                                           vocab_size=vocab, max_new_tokens=args.max_new_tokens)
            refs = {p.name: probes.send_alone(client, p, max_new_tokens=args.max_new_tokens) for p in plist}
            out["reference_s"] = time.monotonic() - t0
            out["references"] = [probes.outcome_record(r) for r in refs.values()]
            bad = {n: r.error for n, r in refs.items() if not r.ok}
            if bad:
                checks.add("cold-references", "FAIL", f"{len(bad)} of {len(plist)} probes failed alone: {bad}")
                return

            client.flush_cache()
            idle_mib, idle_readings, mem_error = idle_memory(gpu=args.gpu)
            out["idle_memory"] = {"mib": idle_mib, "readings": idle_readings, "error": mem_error}
            plan = schedule([p.name for p in plist if p.kind == "long"], [p.name for p in plist if p.kind == "short"],
                            args.clients)
            out["schedule"] = plan
            log_start = log_size(srv.log_path)
            with MemoryPoller(gpu=args.gpu, interval_s=args.memory_interval_s) as mem:
                outcomes, wall = run_clients(client, by_name, plan, max_new_tokens=args.max_new_tokens,
                                             deadline_s=args.duration_s)
                out["outcomes"] = [probes.outcome_record(o) for o in outcomes]
                idle = back_to_idle(checks, "cold-idle", client, gpu=args.gpu, idle_mib=idle_mib,
                                    slack_mib=args.memory_slack_mib, timeout_s=args.idle_timeout_s)
            alive, healthy = srv.alive(), client.healthy()
            problems = log_problems(srv.log_path, log_start)
    except ServerStartError as e:
        server_failed(checks, "cold", e)
        return

    out["memory"] = {"samples": mem.samples, "error": mem.error, "peak_mib": max(mem.values(), default=None),
                     "idle": idle}
    perf = performance(outcomes, refs, wall)
    out["performance"] = perf
    sent = sum(len(names) for names in plan)
    errors = [o for o in outcomes if not o.ok]
    checks.add("cold-errors", "FAIL" if errors or len(outcomes) < sent else "PASS",
               f"{len(outcomes)} of {sent} requests answered in {wall:.1f} s, {len(errors)} errors"
               + (f": {sorted({o.error for o in errors})[:3]}" if errors else ""), errors=len(errors))

    longs = [o for o in outcomes if o.kind == "long" and o.ok]
    cached = max((o.cached_tokens or 0) for o in longs) if longs else None
    overlap = peak_overlap([(o.started_s, o.first_token_s if o.first_token_s is not None else o.started_s + o.latency_s)
                            for o in longs])
    full = longs and all((o.cached_tokens or 0) <= 0.01 * (o.prompt_tokens or 1) for o in longs)
    lt, la = perf["long_ttft_s"], perf["long_ttft_alone_s"]
    checks.add("cold-prefills", "PASS" if full else "INCONCLUSIVE",
               f"{len(longs)} long prompts ({min(long_lens)}-{max(long_lens)} tokens), at most {cached} cached "
               f"tokens each, up to {overlap} waiting for their first token at once; long TTFT p50 "
               f"{_s(lt['p50'])} p99 {_s(lt['p99'])} (alone p50 {_s(la['p50'])}); "
               f"{perf['prefill_tokens_per_s'] or 0:.0f} prefill tokens/s",
               peak_long_overlap=overlap, max_cached_tokens=cached)

    cmp = probes.compare(outcomes, refs, tol=args.logprob_tol)
    out["comparison"] = {"tokens": dataclasses.asdict(cmp.tokens), "logprobs": dataclasses.asdict(cmp.logprobs),
                         "token_attributions": cmp.token_attributions,
                         "logprob_attributions": cmp.logprob_attributions}
    decisive = cmp.decisive(mode)
    other = cmp.logprobs if mode == "tokens" else cmp.tokens
    checks.add("cold-isolation", decisive.status, f"by {mode}: {decisive.message} (by the other witness: "
               f"{other.status})", counts=decisive.counts)
    status, msg = probes.equal_alone(decisive, mode, tol=args.logprob_tol)
    checks.add("cold-equal-alone", status, msg)

    checks.add("cold-crash", "PASS" if alive and healthy and not any(problems.values()) else "FAIL",
               f"server alive={alive}, healthy={healthy}; in its log since the load: {problems}", **problems)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"
