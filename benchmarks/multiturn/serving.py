"""``serving``: what a bad client can do to a shared server; after each, the server must still serve correctly.

Checks (``--checks`` picks and orders them; each prints one line with what the server answered):

* ``serving-malformed-json``: bodies FastAPI cannot parse or validate, a wrong content type, an empty body, a
  negative ``max_new_tokens``, a malformed ``/abort_request``: each must get a 4xx with a message.
* ``serving-empty-prompt``: ``input_ids: []`` (plain and streamed) must be refused; ``text: ""`` must be refused
  or answered, not crash anything.
* ``serving-zero-new-tokens``: ``max_new_tokens: 0`` on a short and on the long prompt (a prefill-only request
  through the sparse path) must answer 200 with no output ids.
* ``serving-overlong``: a prompt 16 tokens over the context length must get an error (plain: HTTP 4xx;
  streamed: an error chunk) naming the length.
* ``serving-flush-during-prefill``: during the long prompt's prefill ``/flush_cache`` must be refused (SGLang
  flushes only when idle) and ``/flush_cache?timeout=`` must wait and then flush; the request must finish with
  its reference output.
* ``serving-abort-during-prefill``: ``/abort_request`` with one long request's rid while a second long request
  runs: the first ends aborted before its first token, the second finishes with its reference output, and the
  server goes idle with no KV slot held.
* ``serving-disconnect-xN``: the longest allowed prompt is sent and the connection closed mid-prefill, N times
  in a row (``--disconnect-after-s`` cycled), the radix cache flushed before each: else the prefix the rounds
  before cached answers at once (first token after 0.04 s on the H200, 2026-12-04), with no prefill to abort.
  Each time the server must go idle with no KV slot held well before the abandoned request could have finished
  its ``--abandon-new-tokens`` on its own (so it was aborted); then the probe and the long prompt must give
  their reference outputs.
* ``serving-crash``: afterwards the server is alive, and its log has no traceback and no KV-pool leak warning.

"Still serving" after a check: ``/health_generate`` answers, and the short probe sent alone gives its
reference output ids.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import dataclass

from benchmarks.multiturn import probes
from benchmarks.multiturn.checklist import Checks
from benchmarks.multiturn.client import Reply, SGLangClient, error_text, new_rid
from benchmarks.multiturn.harness import limits, log_path, server_failed, vocab_size
from benchmarks.multiturn.server import ServerStartError, log_problems, log_size, server_for
from benchmarks.multiturn.workload import token_id_range

CHECKS = ("malformed", "empty", "zero", "overlong", "flush", "abort", "disconnect")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--checks", default=",".join(CHECKS), help=f"comma list, in order, of {CHECKS}")
    sp.add_argument("--long-tokens", type=int, default=131072, help="the long prompt (capped to what fits)")
    sp.add_argument("--short-tokens", type=int, default=256, help="the probe prompt")
    sp.add_argument("--disconnects", type=int, default=10, help="client hang-ups in a row")
    sp.add_argument("--disconnect-after-s", type=_floats, default=[0.3, 1.0], help="comma list, cycled")
    sp.add_argument("--abandon-new-tokens", type=int, default=4096,
                    help="max_new_tokens (ignore_eos) of an abandoned request: its natural end is far off")
    sp.add_argument("--during-prefill-s", type=float, default=0.5,
                    help="how long after sending the long prompt /flush_cache or /abort_request is called")
    sp.add_argument("--idle-timeout-s", type=float, default=60.0, help="bound on each wait for the server to go idle")


@dataclass(kw_only=True)
class Session:
    """One server and the prompts the checks send to it."""

    client: SGLangClient
    args: argparse.Namespace
    checks: Checks
    out: dict
    lim: dict
    probe: list[int]  # short prompt
    probe_ref: Reply
    long_ids: list[int]  # the longest prompt that leaves room for --max-new-tokens
    long_ref: Reply
    other_long: list[int]  # a second long prompt (the request /abort_request must leave alone)
    other_ref: Reply
    rng: random.Random
    vocab: int

    def draw(self, n: int) -> list[int]:
        low, high = token_id_range(self.vocab)
        return [self.rng.randrange(low, high) for _ in range(n)]

    def alone(self, ids: list[int], **kw) -> Reply:
        if not self.client.flush_cache():
            return Reply(status=0, error="could not flush the radix cache: requests still running after 60 s")
        return self.client.generate(ids, max_new_tokens=self.args.max_new_tokens, ignore_eos=True, **kw)

    def still_serving(self) -> tuple[bool, str]:
        """Healthy, and the probe alone gives its reference output."""
        healthy = self.client.healthy()
        again = self.alone(self.probe)
        ok = healthy and again.ok and again.output_ids == self.probe_ref.output_ids
        why = ("the probe gives its reference output" if ok else
               f"healthy={healthy}, probe error={again.error}, matches={again.output_ids == self.probe_ref.output_ids}")
        return ok, why


def _answer(status: int, body: bytes) -> str:
    return f"{status} {error_text(body)[:160]!r}" if body else f"{status} (no body)"


def _error_of(reply: Reply | None) -> str | None:
    return "no reply" if reply is None else reply.error


def _background(fn) -> tuple[threading.Thread, dict]:
    """Run ``fn()`` in a thread; the dict gets ``reply`` and ``done_at`` (time.monotonic) when it returns."""
    box: dict = {}

    def run() -> None:
        box["reply"] = fn()
        box["done_at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


# ----------------------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------------------


def check_malformed(s: Session) -> None:
    ok_body = json.dumps({"input_ids": s.probe[:8], "sampling_params": {"max_new_tokens": 2}}).encode()
    cases = [
        ("/generate", b'{"input_ids": [101, 102, 103', "application/json", "truncated JSON"),
        ("/generate", b"this is not json", "application/json", "not JSON"),
        ("/generate", b"[101, 102, 103]", "application/json", "a JSON array, not an object"),
        ("/generate", b'{"input_ids": "not a list of ids"}', "application/json", "input_ids of the wrong type"),
        ("/generate", json.dumps({"input_ids": s.probe[:8], "sampling_params": {"max_new_tokens": -1}}).encode(),
         "application/json", "max_new_tokens -1"),
        ("/generate", ok_body, "text/plain", "a valid body sent as text/plain"),
        ("/generate", b"", "application/json", "an empty body"),
        ("/abort_request", b'{"rid": ', "application/json", "truncated /abort_request"),
    ]
    answers = []
    for path, body, ctype, what in cases:
        status, resp = s.client.post(path, body, content_type=ctype)
        answers.append({"case": what, "path": path, "status": status, "answer": error_text(resp)[:300]})
    refused = all(400 <= a["status"] < 500 and a["answer"] for a in answers)
    ok, why = s.still_serving()
    listed = "; ".join(f"{a['case']} -> {a['status']} {a['answer'][:80]!r}" for a in answers)
    s.checks.add("serving-malformed-json", "PASS" if refused and ok else "FAIL",
                 f"{sum(400 <= a['status'] < 500 for a in answers)} of {len(answers)} refused with a 4xx: {listed}; "
                 f"afterwards {why}", answers=answers)


def check_empty(s: Session) -> None:
    plain = s.client.generate([], max_new_tokens=4, stream=False)
    streamed = s.client.generate([], max_new_tokens=4, stream=True)
    status, body = s.client.post("/generate", json.dumps({"text": "", "sampling_params": {"max_new_tokens": 4}})
                                 .encode(), timeout_s=120)
    refused = (400 <= plain.status < 500 and plain.error) and (streamed.error and streamed.status in (200, 400))
    text_ok = 200 <= status < 500 and bool(body)  # refused (no tokenizer) or answered: not a crash
    ok, why = s.still_serving()
    s.checks.add("serving-empty-prompt", "PASS" if refused and text_ok and ok else "FAIL",
                 f"input_ids [] -> {plain.status} {plain.error!r}; streamed -> {streamed.status} {streamed.error!r}; "
                 f'text "" -> {_answer(status, body)}; afterwards {why}',
                 plain={"status": plain.status, "error": plain.error},
                 streamed={"status": streamed.status, "error": streamed.error},
                 text={"status": status, "answer": body.decode(errors="replace")[:500]})


def check_zero(s: Session) -> None:
    short = s.client.generate(s.probe, max_new_tokens=0, stream=False)
    long = s.client.generate(s.long_ids, max_new_tokens=0, stream=True)
    good = [r.ok and r.status == 200 and r.output_ids == [] and r.completion_tokens == 0 for r in (short, long)]
    ok, why = s.still_serving()
    desc = lambda r: (f"{r.status} error={r.error!r} output_ids={r.output_ids[:4]} "  # noqa: E731
                      f"completion_tokens={r.completion_tokens} finish={r.meta_info.get('finish_reason')}")
    s.checks.add("serving-zero-new-tokens", "PASS" if all(good) and ok else "FAIL",
                 f"{len(s.probe)}-token prompt -> {desc(short)}; {len(s.long_ids)}-token prompt (streamed) -> "
                 f"{desc(long)}; afterwards {why}")


def check_overlong(s: Session) -> None:
    n = max(s.lim["context_length"], s.lim["max_req_input_len"] + 6) + 16
    ids = s.draw(n)
    plain = s.client.generate(ids, max_new_tokens=4, stream=False)
    streamed = s.client.generate(ids, max_new_tokens=4, stream=True)
    refused = (plain.status >= 400 and plain.error is not None) and streamed.error is not None
    ok, why = s.still_serving()
    s.checks.add("serving-overlong", "PASS" if refused and ok else "FAIL",
                 f"{n}-token prompt -> HTTP {plain.status} {plain.error!r}; streamed -> HTTP {streamed.status} "
                 f"{streamed.error!r}; afterwards {why}", prompt_tokens=n, http_status=plain.status,
                 error=plain.error, streamed_error=streamed.error)


def check_flush(s: Session) -> None:
    sent = time.monotonic()
    t, box = _background(lambda: s.client.generate(s.long_ids, max_new_tokens=s.args.max_new_tokens, ignore_eos=True,
                                                   rid=new_rid()))
    time.sleep(s.args.during_prefill_s)
    now_status, now_msg = s.client.flush_cache_once()
    now_at = time.monotonic()
    wait_status, wait_msg = s.client.flush_cache_once(wait_idle_s=s.args.idle_timeout_s)
    t.join(timeout=s.args.request_timeout_s)
    reply: Reply | None = box.get("reply")
    first_at = sent + reply.ttft_s if reply is not None and reply.ttft_s is not None else None
    during = first_at is not None and now_at < first_at
    exact = reply is not None and reply.ok and reply.output_ids == s.long_ref.output_ids
    ok, why = s.still_serving()
    refused = 400 <= now_status < 500
    if not during and refused and exact and ok:
        status = "INCONCLUSIVE"  # the flush came after the prefill: nothing was shown
    else:
        status = "PASS" if refused and wait_status == 200 and exact and ok and during else "FAIL"
    what = "gave its reference output" if exact else f"differs or failed ({_error_of(reply)})"
    s.checks.add("serving-flush-during-prefill", status,
                 f"/flush_cache {s.args.during_prefill_s:g} s into a {len(s.long_ids)}-token prefill -> {now_status} "
                 f"{now_msg[:80]!r} ({'before' if during else 'after'} its first token); /flush_cache?timeout -> "
                 f"{wait_status} {wait_msg[:60]!r}; the request {what}; afterwards {why}",
                 immediate={"status": now_status, "message": now_msg},
                 deferred={"status": wait_status, "message": wait_msg}, during_prefill=during)


def check_abort(s: Session) -> None:
    rid, other_rid = new_rid(), new_rid()
    ta, box_a = _background(lambda: s.client.generate(s.long_ids, max_new_tokens=s.args.max_new_tokens,
                                                      ignore_eos=True, rid=rid))
    tb, box_b = _background(lambda: s.client.generate(s.other_long, max_new_tokens=s.args.max_new_tokens,
                                                      ignore_eos=True, rid=other_rid))
    time.sleep(s.args.during_prefill_s)
    status, body = s.client.abort_request(rid)
    unknown_status, _ = s.client.abort_request(new_rid())  # nobody's rid: must be harmless
    ta.join(timeout=s.args.request_timeout_s)
    tb.join(timeout=s.args.request_timeout_s)
    a, b = box_a.get("reply"), box_b.get("reply")
    idle, waited, loads = s.client.wait_idle(timeout_s=s.args.idle_timeout_s)
    aborted = a is not None and a.error is not None and "abort" in a.error.lower()
    before_first = a is not None and (a.completion_tokens or 0) == 0  # no token came out before the abort
    other_ok = b is not None and b.ok and b.output_ids == s.other_ref.output_ids
    ok, why = s.still_serving()
    good = status == 200 and unknown_status == 200 and aborted and other_ok and idle and ok
    verdict = ("PASS" if before_first else "INCONCLUSIVE") if good else "FAIL"
    s.checks.add("serving-abort-during-prefill", verdict,
                 f"/abort_request {s.args.during_prefill_s:g} s into a {len(s.long_ids)}-token prefill -> {status}; "
                 f"the request ended with {_error_of(a)!r} after {getattr(a, 'completion_tokens', None)} tokens "
                 f"({'before' if before_first else 'after'} its first token); the concurrent request "
                 f"{'gave its reference output' if other_ok else f'differs or failed ({_error_of(b)})'}; "
                 f"abort of an unknown rid -> {unknown_status}; scheduler idle={idle} after {waited:.1f} s "
                 f"(KV slots held {[d.get('num_used_tokens') for d in loads]}); afterwards {why}",
                 abort_status=status, abort_body=body, loads=loads)


def check_disconnect(s: Session) -> None:
    a = s.args
    ids = s.long_ids[: max(1, min(len(s.long_ids), s.lim["context_length"] - a.abandon_new_tokens - 1))]
    ref = s.long_ref
    # How long the abandoned request would run if nobody aborted it: its prefill, then every new token at
    # the decode speed its reference showed.
    per_token = ((ref.latency_s - ref.ttft_s) / max((ref.completion_tokens or 1) - 1, 1)
                 if ref.ttft_s is not None else 0.0)
    natural_s = (ref.ttft_s or 0.0) + a.abandon_new_tokens * per_token
    rounds = []
    for i in range(a.disconnects):
        after = a.disconnect_after_s[i % len(a.disconnect_after_s)]
        flushed = s.client.flush_cache()  # a full prefill each round, not the prefix earlier rounds cached
        gone = s.client.abandon_generate(ids, after_s=after, max_new_tokens=a.abandon_new_tokens, ignore_eos=True,
                                         rid=new_rid())
        idle, waited, loads = s.client.wait_idle(timeout_s=a.idle_timeout_s)
        since_send = gone["closed_after_s"] + waited
        # Idle in under half the time it would have run: aborted; in 90% of it or more: it ran on; between: unclear.
        rounds.append({**gone, "after_s": after, "flushed": flushed, "idle": idle, "idle_wait_s": waited,
                       "since_send_s": since_send,
                       "used_tokens": [d.get("num_used_tokens") for d in loads],
                       "aborted": idle and since_send < 0.5 * natural_s,
                       "ran_on": not idle or since_send >= 0.9 * natural_s})
    follow = s.alone(s.long_ids)
    ok, why = s.still_serving()
    long_exact = follow.ok and follow.output_ids == ref.output_ids
    mid = all(not r["first_chunk_before_close"] for r in rounds)
    all_idle = all(r["idle"] for r in rounds)
    all_aborted = all(r["aborted"] for r in rounds)
    if not (all_idle and long_exact and ok) or any(r["ran_on"] for r in rounds):
        status = "FAIL"
    else:
        status = "PASS" if mid and all_aborted else "INCONCLUSIVE"
    worst = max((r["since_send_s"] for r in rounds), default=0.0)
    s.checks.add(f"serving-disconnect-x{a.disconnects}", status,
                 f"{len(rounds)} hang-ups of a {len(ids)}-token request after {sorted(set(a.disconnect_after_s))} s: "
                 f"{sum(not r['first_chunk_before_close'] for r in rounds)} before the first token, "
                 f"{sum(r['aborted'] for r in rounds)} aborted, {sum(r['ran_on'] for r in rounds)} ran on, "
                 f"{sum(r['idle'] for r in rounds)} idle with no KV slot held afterwards, the slowest "
                 f"{worst:.1f} s after sending (left alone it would have run ~{natural_s:.0f} s); then the long prompt "
                 f"{'gave its reference output' if long_exact else f'differs or failed ({_error_of(follow)})'}, {why}",
                 rounds=rounds, natural_s=natural_s)


RUNNERS = {"malformed": check_malformed, "empty": check_empty, "zero": check_zero, "overlong": check_overlong,
           "flush": check_flush, "abort": check_abort, "disconnect": check_disconnect}


def cmd_serving(args, checks: Checks, out: dict) -> None:
    wanted = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in RUNNERS]
    if unknown:
        raise SystemExit(f"--checks: {unknown} not in {CHECKS}")
    log = log_path(args, "serving")
    try:
        with server_for(args, args.backend, log_path=log) as srv:
            out["server"] = srv.describe()
            log_start = log_size(srv.log_path)
            client = srv.client(timeout_s=args.request_timeout_s)
            lim = limits(client, args)
            info = lim.pop("info")
            out["limits"] = lim
            vocab = vocab_size(args, info)
            rng = random.Random(f"sgl-minference-serving:{args.seed}")
            low, high = token_id_range(vocab)
            draw = lambda n: [rng.randrange(low, high) for _ in range(n)]  # noqa: E731
            long_n = min(args.long_tokens, lim["longest_input"])
            s = Session(client=client, args=args, checks=checks, out=out, lim=lim, probe=draw(args.short_tokens),
                        probe_ref=Reply(status=0), long_ids=draw(long_n), long_ref=Reply(status=0),
                        other_long=draw(long_n), other_ref=Reply(status=0), rng=rng, vocab=vocab)
            out["warmup"] = probes.warm_up(client, [long_n, args.short_tokens], vocab_size=vocab,
                                           max_new_tokens=args.max_new_tokens)
            s.probe_ref, s.long_ref, s.other_ref = s.alone(s.probe), s.alone(s.long_ids), s.alone(s.other_long)
            bad = {n: r.error for n, r in (("probe", s.probe_ref), ("long", s.long_ref), ("other", s.other_ref))
                   if not r.ok}
            out["references"] = {n: {"ttft_s": r.ttft_s, "latency_s": r.latency_s, "output_ids": r.output_ids}
                                 for n, r in (("probe", s.probe_ref), ("long", s.long_ref), ("other", s.other_ref))}
            if bad:
                checks.add("serving-references", "FAIL", f"requests failed on a fresh server: {bad}")
                return
            for name in wanted:
                RUNNERS[name](s)
            alive = srv.alive()
            problems = log_problems(srv.log_path, log_start)
    except ServerStartError as e:
        server_failed(checks, "serving", e)
        return
    checks.add("serving-crash", "PASS" if alive and not any(problems.values()) else "FAIL",
               f"server alive={alive} after the checks; in its log since they began: {problems}", **problems)
