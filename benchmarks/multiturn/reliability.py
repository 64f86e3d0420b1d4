"""Reliability checks of a served attention backend: load, cold concurrent prefills, serving faults, a soak,
and bad configs.

Subcommands (each starts its own server on 127.0.0.1, or uses a detached one with ``--attach``, prints one
``PASS``/``FAIL``/``INCONCLUSIVE`` line per check with what happened, and writes a results JSON with device,
date and command, rewritten after every check so that a command cut short keeps what it finished):

* ``load``: ``--clients`` concurrent clients send a seeded mix of long (>= 64K) and short token-id requests
  until ``--max-requests`` were sent or ``--duration-s`` passed. Checks: the server survives; no response is
  another request's answer (each response against the same request sent alone, greedy, by output ids);
  GPU memory (nvidia-smi) stays bounded. Run it once per backend, then ``compare`` the memory peaks.
* ``cold``: many distinct long prompts prefilling at once on an empty cache, short ones in between; every
  output against the same request alone; memory back to idle; TTFT and throughput (``cold.py``).
* ``serving``: malformed bodies, empty prompts, ``max_new_tokens`` 0, an over-long prompt, ``/flush_cache``
  and ``/abort_request`` during a prefill, repeated client hang-ups mid-prefill (``serving.py``).
* ``soak``: a long mixed load in resumable segments: errors, TTFT, cross-request answers, memory trend
  (``soak.py``).
* ``faults``: a malformed config file, a config for another model shape, an unknown pattern name and zero
  budgets must each stop startup with a message naming the problem (exit code and message recorded).
* ``compare``: a sparse result against a dense one of the same subcommand (memory peaks; for ``cold`` and
  ``soak`` also TTFT, throughput and the check statuses side by side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.multiturn import cold, serving, soak
from benchmarks.multiturn.checklist import Checks
from benchmarks.multiturn.checks import attribute, cross_check
from benchmarks.multiturn.client import Reply, SGLangClient
from benchmarks.multiturn.harness import log_path, server_failed, vocab_size
from benchmarks.multiturn.results import envelope, write_json
from benchmarks.multiturn.server import (ServerStartError, add_server_arguments, attempt_startup, log_problems,
                                         log_size, log_tail, model_config, server_for, spec_from_args)
from benchmarks.multiturn.stats import bounded_memory
from benchmarks.multiturn.workload import token_id_range
from sgl_minference.checks import check
from sgl_minference.gpu_memory import MemoryPoller


# ----------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LoadRequest:
    name: str
    input_ids: list[int]


def load_mix(*, vocab_size: int, long_tokens: int, short_tokens: int, long_contexts: int, variants: int,
             shorts: int, seed: int, suffix_tokens: int = 32) -> list[LoadRequest]:
    """Seeded requests: ``long_contexts`` long contexts each asked with ``variants`` different suffixes (so
    requests share cached prefixes), plus ``shorts`` unrelated short prompts. Every prompt is distinct."""
    check(long_tokens > suffix_tokens, "long_tokens", f"{long_tokens} must exceed the {suffix_tokens}-token suffix")
    check(short_tokens > 0, "short_tokens", f"must be positive, got {short_tokens}")
    rng = random.Random(f"sgl-minference-load:{seed}")
    low, high = token_id_range(vocab_size)
    draw = lambda n: [rng.randrange(low, high) for _ in range(n)]  # noqa: E731
    mix = []
    for c in range(long_contexts):
        context = draw(long_tokens - suffix_tokens)
        mix += [LoadRequest(name=f"long{c}-v{v}", input_ids=context + draw(suffix_tokens)) for v in range(variants)]
    mix += [LoadRequest(name=f"short{s}", input_ids=draw(short_tokens)) for s in range(shorts)]
    return mix


def _alone(client: SGLangClient, ids: list[int], max_new_tokens: int) -> Reply:
    """The request alone on an empty cache: its reference output (an error if the cache cannot be emptied,
    which means some request never finished)."""
    if not client.flush_cache():
        return Reply(status=0, error="could not flush the radix cache: requests still running after 60 s")
    return client.generate(ids, max_new_tokens=max_new_tokens, ignore_eos=True)


# ----------------------------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------------------------


def run_load(client: SGLangClient, mix: list[LoadRequest], *, clients: int, max_requests: int, duration_s: float,
             max_new_tokens: int, seed: int) -> list[tuple[str, Reply]]:
    """``clients`` threads send random picks of ``mix`` until ``max_requests`` were sent or ``duration_s``
    passed (requests in flight then finish); returns ``(request name, reply)`` in completion order."""
    lock = threading.Lock()
    sent = [0]
    done: list[tuple[str, Reply]] = []
    deadline = time.monotonic() + duration_s

    def worker(i: int) -> None:
        rng = random.Random(f"sgl-minference-load-client:{seed}:{i}")
        while True:
            with lock:
                if sent[0] >= max_requests or time.monotonic() >= deadline:
                    return
                sent[0] += 1
            req = mix[rng.randrange(len(mix))]
            reply = client.generate(req.input_ids, max_new_tokens=max_new_tokens, ignore_eos=True)
            with lock:
                done.append((req.name, reply))

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def cmd_load(args, checks: Checks, out: dict) -> None:
    mix = load_mix(vocab_size=vocab_size(args), long_tokens=args.long_tokens, short_tokens=args.short_tokens,
                   long_contexts=args.long_contexts, variants=args.variants, shorts=args.shorts, seed=args.seed)
    log = log_path(args, "load")
    try:
        with server_for(args, args.backend, log_path=log) as srv:
            out["server"] = srv.describe()
            client = srv.client(timeout_s=args.request_timeout_s)
            t0 = time.monotonic()
            refs = {r.name: _alone(client, r.input_ids, args.max_new_tokens) for r in mix}
            out["reference_s"] = time.monotonic() - t0
            bad = {n: r.error for n, r in refs.items() if not r.ok}
            if bad:
                checks.add("load-references", "FAIL", f"{len(bad)} of {len(mix)} requests failed alone: {bad}")
                return
            references = {n: r.output_ids for n, r in refs.items()}
            client.flush_cache()
            log_start = log_size(srv.log_path)
            with MemoryPoller(gpu=args.gpu, interval_s=args.memory_interval_s) as mem:
                time.sleep(2 * args.memory_interval_s)  # idle samples before the load starts
                idle = mem.values()
                t0 = time.monotonic()
                done = run_load(client, mix, clients=args.clients, max_requests=args.max_requests,
                                duration_s=args.duration_s, max_new_tokens=args.max_new_tokens, seed=args.seed)
                elapsed = time.monotonic() - t0
            alive, healthy = srv.alive(), client.healthy()
            problems = log_problems(srv.log_path, log_start)
    except ServerStartError as e:
        server_failed(checks, "load", e)
        return

    longs = sum(name.startswith("long") for name, _ in done)
    ttfts = sorted(r.ttft_s for _, r in done if r.ok and r.ttft_s is not None)
    out["load"] = {"requests": len(done), "long_requests": longs, "elapsed_s": elapsed,
                   "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None, "ttft_max_s": ttfts[-1] if ttfts else None}
    status = "PASS" if alive and healthy and not any(problems.values()) else "FAIL"
    checks.add("load-crash", status, f"{len(done)} requests ({longs} of {args.long_tokens} tokens) from "
               f"{args.clients} clients in {elapsed:.0f} s; server alive={alive}, healthy={healthy}, "
               f"in its log since the load: {problems}", **problems)

    attributions = [attribute(name, r.output_ids, references, r.error) for name, r in done]
    cc = cross_check(attributions, references)
    out["attributions"] = [dataclasses.asdict(a) for a in attributions]
    checks.add("load-cross-request", cc.status, cc.message, counts=cc.counts)

    values = mem.values()
    if mem.error and not values:
        checks.add("load-memory", "INCONCLUSIVE", f"no memory samples: {mem.error}")
        return
    load_values = values[len(idle):] or values
    verdict = bounded_memory(load_values, slack_mib=args.memory_slack_mib)
    out["memory"] = {"idle_mib": idle, "samples": mem.samples, **dataclasses.asdict(verdict)}
    checks.add("load-memory", verdict.status, f"{verdict.message}; idle {max(idle, default=None)} MiB",
               peak_mib=verdict.peak_mib)


# ----------------------------------------------------------------------------------------------------------
# faults: bad configs must stop startup
# ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ConfigFault:
    name: str
    content: str  # the config file's text
    expect: str  # regex (case-insensitive) a clear error message matches


def config_faults(num_layers: int, num_heads: int) -> list[ConfigFault]:
    """The bad configs, in MInference's table format, for a model of ``num_layers`` x ``num_heads``."""

    def table(layers: int, heads: int, special: dict[tuple[int, int], list] | None = None) -> str:
        rows = []
        for layer in range(layers):
            row = {str(h): ["vertical_and_slash", 1000, 6096, 0.9] for h in range(heads)}
            for (sl, sh), entry in (special or {}).items():
                if sl == layer:
                    row[str(sh)] = entry
            rows.append(row)
        return json.dumps(rows)

    good = table(num_layers, num_heads)
    return [
        ConfigFault(name="malformed", content=good[: len(good) // 2] + ",,", expect=r"not json|jsondecode|expecting|parse|decode"),
        ConfigFault(name="shape", content=table(num_layers + 2, num_heads * 2), expect=r"layer|head"),
        ConfigFault(name="pattern", content=table(num_layers, num_heads, {(0, 0): ["diagonal_magic", 100, 100, 0.9]}),
                    expect=r"diagonal_magic"),
        ConfigFault(name="budget", content=table(num_layers, num_heads, {(0, 1): ["vertical_and_slash", 0, 0, 0.9]}),
                    expect=r"budget|vertical|slash|greater than 0|positive"),
    ]


def error_line(log_text: str, expect: str) -> str | None:
    """The server-output line that explains a failed start: the first line matching ``expect`` that is not
    the echoed command or SGLang's dump of its own arguments (both contain the config path), preferring an
    exception's own ``Name: message`` line."""
    rx = re.compile(expect, re.IGNORECASE)
    candidates = [line.strip() for line in log_text.splitlines()
                  if rx.search(line) and not line.startswith("$ ") and "server_args=" not in line
                  and "ServerArgs(" not in line and "json_model_override_args" not in line]
    # A traceback's final "pkg.SomeError: message" line, before its source lines (which quote the raise).
    raised = [line for line in candidates if re.match(r"[\w.]*(Error|Exception)\b: ", line)]
    errors = [line for line in candidates if re.search(r"error|exception|invalid", line, re.IGNORECASE)]
    return (raised or errors or candidates or [None])[0]


def cmd_faults(args, checks: Checks, out: dict) -> None:
    cfg = model_config(args.model)
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    if not layers or not heads:
        raise SystemExit(f"--model: {args.model}/config.json lacks num_hidden_layers / num_attention_heads")
    wanted = [f.strip() for f in args.faults.split(",") if f.strip()]
    faults = {f.name: f for f in config_faults(layers, heads)}
    unknown = [w for w in wanted if w not in faults]
    if unknown:
        raise SystemExit(f"--faults: {unknown} not in {sorted(faults)}")
    folder = Path(args.log_dir) / f"fault_configs_{time.strftime('%Y%m%d_%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    out["faults"] = []
    for i, name in enumerate(wanted):
        fault = faults[name]
        # A neutral file name: the path shows up in the log and must not match the expected message itself.
        path = folder / f"bad_config_{i}.json"
        path.write_text(fault.content)
        log = log_path(args, f"fault_{name}")
        outcome = attempt_startup(spec_from_args(args, args.backend, config_path=str(path)), log_path=log,
                                  timeout_s=args.startup_timeout_s)
        text = Path(log).read_text(errors="replace")
        line = error_line(text, fault.expect)
        stopped = not outcome.became_healthy and outcome.exit_code not in (None, 0)
        status = "PASS" if stopped and line else "FAIL"
        if outcome.became_healthy:
            what = "server started and served despite the bad config"
        elif outcome.exit_code is None:
            what = f"server neither started nor exited within {args.startup_timeout_s:.0f} s"
        else:
            what = f"startup stopped after {outcome.elapsed_s:.0f} s with exit code {outcome.exit_code}"
        msg = f"{what}; message: {line!r}" if line else f"{what}; no line matching /{fault.expect}/ in the log"
        checks.add(f"fault-{name}", status, msg, exit_code=outcome.exit_code, log=str(log), config=str(path))
        out["faults"].append({"name": name, "exit_code": outcome.exit_code, "became_healthy": outcome.became_healthy,
                              "elapsed_s": outcome.elapsed_s, "message": line, "log_tail": log_tail(log, 40),
                              "command": outcome.command})


# ----------------------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------------------


def _peak_mib(data: dict) -> int | None:
    """Peak GPU memory of a load, cold or soak result."""
    if (data.get("memory") or {}).get("peak_mib") is not None:
        return data["memory"]["peak_mib"]
    samples = [m for seg in data.get("segments") or [] for _, m in seg["memory"]["samples"]]
    return max(samples, default=None)


def _performance_rows(data: dict) -> dict[str, float | None]:
    """The numbers a cold or soak result reports per backend, flattened for a side-by-side table."""
    perf = data.get("performance") or {}
    rows = {}
    for key, value in perf.items():
        if isinstance(value, dict) and "p50" in value:
            rows[f"{key} p50"], rows[f"{key} p99"] = value["p50"], value["p99"]
        elif isinstance(value, dict):  # soak: ttft_s per bucket
            for sub, summary in value.items():
                rows[f"{key} {sub} p50"], rows[f"{key} {sub} p99"] = summary["p50"], summary["p99"]
        elif isinstance(value, (int, float)):
            rows[key] = value
    return rows


def cmd_compare(args, checks: Checks, out: dict) -> None:
    data = {"sparse": json.loads(Path(args.sparse).read_text()), "dense": json.loads(Path(args.dense).read_text())}
    kinds = {label: d.get("kind") for label, d in data.items()}
    if kinds["sparse"] != kinds["dense"]:
        raise SystemExit(f"--dense: {args.dense} is a {kinds['dense']} result, {args.sparse} a {kinds['sparse']} one")
    out["compared"] = {"kind": kinds["sparse"], "sparse": args.sparse, "dense": args.dense,
                       "backends": {label: (d.get("args") or {}).get("backend") for label, d in data.items()}}

    peaks = {label: _peak_mib(d) for label, d in data.items()}
    if None in peaks.values():
        if kinds["sparse"] == "reliability-load":
            raise SystemExit(f"no memory peak in {[label for label, v in peaks.items() if v is None]} "
                             f"(not a finished load result)")
        checks.add("memory-vs-dense", "INCONCLUSIVE", f"no GPU memory samples: {peaks}")
    else:
        delta = peaks["sparse"] - peaks["dense"]
        out["memory_peaks_mib"] = peaks
        checks.add("memory-vs-dense", "PASS" if delta <= args.memory_slack_mib else "FAIL",
                   f"peak {peaks['sparse']} MiB (sparse) vs {peaks['dense']} MiB (dense): {delta:+d} MiB, "
                   f"allowed {args.memory_slack_mib}")
    if kinds["sparse"] == "reliability-load":
        return

    rows = {label: _performance_rows(d) for label, d in data.items()}
    table = {key: {"sparse": rows["sparse"].get(key), "dense": rows["dense"].get(key)}
             for key in sorted(set(rows["sparse"]) | set(rows["dense"]))}
    out["performance"] = table
    print(f"{'':<34} {'sparse':>12} {'dense':>12}")
    for key, v in table.items():
        cell = lambda x: "-" if x is None else f"{x:12.4g}"  # noqa: E731
        print(f"{key:<34} {cell(v['sparse']):>12} {cell(v['dense']):>12}")

    statuses = {label: {c["name"]: c["status"] for c in d.get("checks") or []} for label, d in data.items()}
    names = sorted(set(statuses["sparse"]) | set(statuses["dense"]))
    side = {n: {"sparse": statuses["sparse"].get(n), "dense": statuses["dense"].get(n)} for n in names}
    out["statuses"] = side
    worse = [n for n, v in side.items() if v["sparse"] == "FAIL" and v["dense"] != "FAIL"]
    both = [n for n, v in side.items() if v["sparse"] == "FAIL" and v["dense"] == "FAIL"]
    listed = ", ".join(f"{n} {v['sparse']}/{v['dense']}" for n, v in side.items())
    checks.add("checks-vs-dense", "FAIL" if worse else "PASS",
               f"sparse/dense: {listed}" + (f"; failing only with the sparse backend: {worse}" if worse else "")
               + (f"; failing with both: {both}" if both else ""))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multiturn.reliability", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--backend", default="minference")
        sp.add_argument("--vocab-size", type=int, help="default: the model's config.json")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--max-new-tokens", type=int, default=16)
        sp.add_argument("--request-timeout-s", type=float, default=300.0)
        sp.add_argument("--out", required=True, help="results JSON")
        add_server_arguments(sp)

    load = sub.add_parser("load", help="concurrent mixed load: crash, cross-request answers, memory")
    common(load)
    load.add_argument("--clients", type=int, default=8)
    load.add_argument("--long-tokens", type=int, default=65536)
    load.add_argument("--short-tokens", type=int, default=1024)
    load.add_argument("--long-contexts", type=int, default=2)
    load.add_argument("--variants", type=int, default=3, help="suffixes per long context (shared prefixes)")
    load.add_argument("--shorts", type=int, default=6)
    load.add_argument("--max-requests", type=int, default=64)
    load.add_argument("--duration-s", type=float, default=150.0, help="stop sending new requests after this")
    load.add_argument("--gpu", type=int, default=0, help="nvidia-smi GPU index to poll")
    load.add_argument("--memory-interval-s", type=float, default=0.5)
    load.add_argument("--memory-slack-mib", type=int, default=512)

    cold_ = sub.add_parser("cold", help="cold concurrent long prefills: errors, isolation, equality, idle memory, TTFT")
    common(cold_)
    cold.add_arguments(cold_)

    serving_ = sub.add_parser("serving", help="bad clients: malformed bodies, empty and over-long prompts, "
                                              "flush/abort during a prefill, disconnects")
    common(serving_)
    serving.add_arguments(serving_)

    soak_ = sub.add_parser("soak", help="long mixed load in resumable segments: errors, TTFT, isolation, memory trend")
    common(soak_)
    soak.add_arguments(soak_)

    faults = sub.add_parser("faults", help="bad configs must stop startup with a clear message")
    common(faults)
    faults.add_argument("--faults", default="malformed,shape,pattern,budget")

    cmp_ = sub.add_parser("compare", help="a sparse result against a dense one of the same subcommand")
    cmp_.add_argument("--sparse", required=True)
    cmp_.add_argument("--dense", required=True)
    cmp_.add_argument("--memory-slack-mib", type=int, default=512)
    cmp_.add_argument("--out", required=True)
    return p


COMMANDS = {"load": cmd_load, "cold": cold.cmd_cold, "serving": serving.cmd_serving, "soak": soak.cmd_soak,
            "faults": cmd_faults, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = {**envelope(f"reliability-{args.command}"), "args": vars(args)}

    def save() -> None:
        out["checks"] = checks.items
        write_json(args.out, out)

    checks = Checks(on_add=save)
    try:
        COMMANDS[args.command](args, checks, out)
    finally:
        out["checks"] = checks.items
        write_json(args.out, out)
    print(f"results: {args.out}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
