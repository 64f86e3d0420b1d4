"""Shared-context multi-turn benchmark against real SGLang servers (one per attention backend, in turn).

Per turn it records TTFT (streamed ``/generate``), ``cached_tokens`` and, for text tasks, answer accuracy,
then prints a summary, a sparse-vs-dense comparison and the issue's expectation as PASS/FAIL lines.
Everything is bounded: ``--duration-s`` stops starting new sessions (results are written after every
session, so a killed command still leaves its finished sessions behind).

Examples (from the repository root)::

    # dummy weights, token ids: TTFT and caching only
    python -m benchmarks.multiturn.run --model launch/models/llama3.2-1b --dummy \\
        --backends minference,flashinfer --mode multiturn --lengths 64K --sessions 2 \\
        --out benchmarks/results/multiturn_dummy.json
    # a real small model: accuracy too
    python -m benchmarks.multiturn.run --model <gguf_loader folder> --task kv --format chat ...
    # join result files of separate commands
    python -m benchmarks.multiturn.run --summarize a.json b.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.multiturn.argcheck import parse_lengths
from benchmarks.multiturn.client import SGLangClient
from benchmarks.multiturn.prompts import FORMATS, PromptFormat, make_format
from benchmarks.multiturn.results import envelope, write_json
from benchmarks.multiturn.server import (ServerStartError, add_server_arguments, launched_server, model_config,
                                         spec_from_args)
from benchmarks.multiturn.sessions import (MODES, Expectations, TurnRecord, compare, expectation_lines, run_multiturn,
                                           run_session, summarize)
from benchmarks.multiturn.tokenization import HFTokenizer
from benchmarks.multiturn.workload import QUERIES_PER_CONTEXT, TASKS, SharedContext, make_contexts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multiturn.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="minference,flashinfer", help="attention backends, one server each, in order")
    p.add_argument("--server-url", help="use this running loopback server instead of launching (one backend label)")
    p.add_argument("--task", choices=TASKS, help="default: tokens with --dummy, else kv")
    p.add_argument("--mode", default="multiturn", help=f"comma list of {MODES}")
    p.add_argument("--lengths", default="64K", help="context lengths in tokens, e.g. 32K,64K,131072")
    p.add_argument("--sessions", type=int, default=2, help="contexts per length (each asked --turns queries)")
    p.add_argument("--turns", type=int, default=QUERIES_PER_CONTEXT, help=f"queries per context, 1..{QUERIES_PER_CONTEXT}")
    p.add_argument("--max-new-tokens", type=int, help="default 16 for tokens, 48 for text tasks")
    p.add_argument("--format", choices=FORMATS, default="plain", help="text prompt format")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--vocab-size", type=int, help="token mode: id range (default: the model's config.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=1, help="multirequest: requests in flight after the first")
    p.add_argument("--no-warmup", action="store_true", help="skip the throw-away session per length")
    p.add_argument("--duration-s", type=float, default=420.0, help="start no session after this many seconds")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--sparse-label", default="minference", help="backend compared as sparse")
    p.add_argument("--dense-label", default="flashinfer", help="backend compared as dense")
    p.add_argument("--out", default="benchmarks/results/multiturn.json")
    p.add_argument("--summarize", nargs="+", metavar="RESULTS_JSON", help="only print the summary of these files")
    add_server_arguments(p)
    return p


def _csv(text: str, allowed: tuple[str, ...], name: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise SystemExit(f"{name}: {bad or 'empty'} not in {allowed}")
    return items


def report(records: list[dict], *, sparse: str, dense: str, exp: Expectations) -> dict:
    """Print the summary table, the comparison and the expectation lines; return them for the results file."""
    rows = summarize(records)
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    print(f"{'backend':<12} {'mode':<12} {'task':<8} {'length':>8} {'turn':>4} {'n':>3} {'err':>3} "
          f"{'ttft_s':>8} {'cached':>9} {'share':>6} {'acc':>5}")
    for r in rows:
        print(f"{r['backend']:<12} {r['mode']:<12} {r['task']:<8} {r['target_tokens']:>8} {r['turn']:>4} "
              f"{r['requests']:>3} {r['errors']:>3} {fmt(r['ttft_mean_s'], '8.3f')} "
              f"{fmt(r['cached_tokens_mean'], '9.0f')} {fmt(r['cached_share_mean'], '6.3f')} "
              f"{fmt(r['accuracy_mean'], '5.2f')}")
    comparison = compare(rows, sparse=sparse, dense=dense)
    lines = expectation_lines(comparison, exp)
    for line in lines:
        print(line)
    return {"summary": rows, "comparison": comparison, "expectations": lines}


def _records_of(results: dict) -> list[dict]:
    return [rec for run in results["runs"] for rec in run["records"]]


@dataclass(kw_only=True)
class Plan:
    """What every backend is asked, identically."""

    fmt: PromptFormat
    contexts: dict[int, list[SharedContext]]  # length -> measured contexts, then one warm-up context
    modes: list[str]
    turns: int
    max_new_tokens: int
    concurrency: int
    warmup: bool
    deadline: float  # time.monotonic() after which no session starts


def run_backend(client: SGLangClient, backend: str, plan: Plan, on_session: Callable[[list[TurnRecord]], None]) -> bool:
    """Every session of ``plan`` on one server, ``on_session`` after each; False when the deadline cut it short."""
    for length, ctxs in plan.contexts.items():
        *measured, warm = ctxs
        if time.monotonic() >= plan.deadline:
            return False
        if plan.warmup:
            # Compiles kernels for this length and both paths (a long prefill, then a short extend on a prefix).
            run_multiturn(client, plan.fmt, warm, backend=backend, turns=min(2, plan.turns),
                          max_new_tokens=plan.max_new_tokens)
        for mode in plan.modes:
            for ctx in measured:
                if time.monotonic() >= plan.deadline:
                    return False
                client.flush_cache()
                on_session(run_session(mode, client, plan.fmt, ctx, backend=backend, turns=plan.turns,
                                       max_new_tokens=plan.max_new_tokens, concurrency=plan.concurrency))
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exp = Expectations()
    if args.summarize:
        records = [rec for path in args.summarize for rec in _records_of(json.loads(Path(path).read_text()))]
        report(records, sparse=args.sparse_label, dense=args.dense_label, exp=exp)
        return 0

    deadline = time.monotonic() + args.duration_s
    task = args.task or ("tokens" if args.dummy else "kv")
    modes = _csv(args.mode, MODES, "--mode")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.server_url and len(backends) != 1:
        raise SystemExit("--server-url: give exactly one --backends label for the running server")
    if task != "tokens" and args.dummy:
        raise SystemExit("--task: dummy weights have no tokenizer; use --task tokens")
    if not 1 <= args.turns <= QUERIES_PER_CONTEXT:
        raise SystemExit(f"--turns: must be in [1, {QUERIES_PER_CONTEXT}]")

    tokenizer = vocab = None
    if task == "tokens":
        vocab = args.vocab_size or model_config(args.model or "").get("vocab_size")
        if not vocab:
            raise SystemExit("--vocab-size: needed (no config.json with vocab_size in --model)")
    else:
        tokenizer = HFTokenizer.from_pretrained(args.tokenizer or args.model)
    contexts = {}
    for length in parse_lengths(args.lengths):
        t0 = time.monotonic()
        # Index `sessions` of each length is the warm-up context: same length, never measured.
        contexts[length] = make_contexts(task=task, target_tokens=length, count=args.sessions + 1, seed=args.seed,
                                         tokenizer=tokenizer, vocab_size=vocab)
        print(f"generated {args.sessions + 1} {task} contexts of {length} tokens in {time.monotonic() - t0:.1f} s",
              flush=True)
    plan = Plan(fmt=make_format(task, args.format, tokenizer), contexts=contexts, modes=modes, turns=args.turns,
                max_new_tokens=args.max_new_tokens or (16 if task == "tokens" else 48),
                concurrency=args.concurrency, warmup=not args.no_warmup, deadline=deadline)

    results = {**envelope("multiturn"), "args": vars(args), "runs": []}
    for backend in backends:
        if time.monotonic() >= deadline:
            print(f"skipping backend {backend}: --duration-s used up", flush=True)
            continue
        run = {"backend": backend, "server": None, "records": [], "truncated": False, "error": None}
        results["runs"].append(run)

        def on_session(recs: list[TurnRecord]) -> None:
            run["records"] += [dataclasses.asdict(r) for r in recs]
            for r in recs:
                ttft = "-" if r.ttft_s is None else f"{r.ttft_s:.3f}"
                print(f"{backend} {r.mode} {r.context_id} turn {r.turn}: prompt {r.prompt_tokens} cached "
                      f"{r.cached_tokens} ttft {ttft} s acc {r.accuracy}" + (f" ERROR {r.error}" if r.error else ""),
                      flush=True)
            write_json(args.out, results)

        try:
            if args.server_url:
                run["server"] = {"url": args.server_url}
                finished = run_backend(SGLangClient(args.server_url, timeout_s=args.request_timeout_s), backend,
                                       plan, on_session)
            else:
                log = Path(args.log_dir) / f"multiturn_{backend}_{time.strftime('%Y%m%d_%H%M%S')}.log"
                timeout = min(args.startup_timeout_s, max(deadline - time.monotonic(), 1.0))
                with launched_server(spec_from_args(args, backend), log_path=log, startup_timeout_s=timeout) as srv:
                    run["server"] = {"command": srv.command, "startup_s": srv.startup_s, "log": str(log)}
                    print(f"{backend}: server up in {srv.startup_s:.0f} s ({log})", flush=True)
                    finished = run_backend(srv.client(timeout_s=args.request_timeout_s), backend, plan, on_session)
            run["truncated"] = not finished
            if not finished:
                print(f"{backend}: --duration-s used up, later sessions skipped", flush=True)
        except ServerStartError as e:
            run["error"] = str(e)
            print(f"FAIL {backend}: server did not start\n{e}", flush=True)
        write_json(args.out, results)

    results.update(report(_records_of(results), sparse=args.sparse_label, dense=args.dense_label, exp=exp))
    write_json(args.out, results)
    print(f"results: {args.out}")
    return 0 if all(run["error"] is None for run in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
