"""CPU tests of the shared-context multi-turn workload, its HTTP client and the reliability checks.

The client and runners talk to a fake SGLang server started here on 127.0.0.1 that speaks ``/generate`` as
SGLang 0.5.17 does (SSE ``data:`` lines over chunked transfer, cumulative or incremental ``output_ids``,
``meta_info`` with ``cached_tokens``, error bodies, ``[DONE]``), so the real client code runs end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import socket
import sys
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.multiturn import checks, prompts, reliability, run, server, sessions, stats, workload
from benchmarks.multiturn.client import SGLangClient
from benchmarks.multiturn.tokenization import HFTokenizer
from sgl_minference import gpu_memory

# ----------------------------------------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------------------------------------


class WordTokenizer:
    """Deterministic reversible tokenizer: words, single punctuation marks and whitespace runs are tokens."""

    bos_ids = [1]

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = []
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        out = []
        with self._lock:
            for piece in re.findall(r"\w+|[^\w\s]|\s+", text):
                if piece not in self._ids:
                    self._ids[piece] = len(self._pieces) + 10
                    self._pieces.append(piece)
                out.append(self._ids[piece])
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(self._pieces[i - 10] for i in ids if i >= 10)

    def render_chat(self, messages, *, generation_prompt):
        raise ValueError("tokenizer: has no chat template")


def _prefix_hash(ids: list[int]) -> int:
    h = 0
    for t in ids:
        h = (h * 1000003 + t) % 2**61
    return h


def token_respond(ids: list[int], n: int) -> tuple[None, list[int]]:
    """Dummy-weight stand-in: output ids are a deterministic function of the whole prompt."""
    h = _prefix_hash(ids)
    return None, [100 + (h >> (4 * i)) % 4000 for i in range(n)]


def context_logprobs(ids: list[int], start: int) -> list[float]:
    """A real model's input log-probabilities, as far as the checks care: each position's value depends on
    every token up to it, so another context gives other numbers (in (-10, 0))."""
    h = _prefix_hash(ids[:start])
    out = []
    for t in ids[start:]:
        out.append(-((h * 2654435761 + t) % 1_000_000) / 100_000 - 1e-3)
        h = (h * 1000003 + t) % 2**61
    return out


def token_logprobs(ids: list[int], start: int) -> list[float]:
    """Dummy weights: a position's log-probability depends on its own token alone (attention rounds away)."""
    return [-11.76 - (t % 97) * 1e-6 for t in ids[start:]]


class _Aborted(Exception):
    """The request was aborted (by /abort_request or after its client hung up)."""


class FakeSGLang:
    """A loopback HTTP server mimicking the SGLang 0.5.17 native endpoints the harness uses.

    ``respond(input_ids, max_new_tokens) -> (pieces or None, output_ids)``: the generation (``pieces``: text of
    each output token; None imitates --skip-tokenizer-init). ``cached_tokens`` is the longest prefix shared
    with an earlier prompt+output (at most len - 1, and at most ``logprob_start_len`` when log-probabilities are
    asked for, as SGLang); the first chunk waits ``prefill_s_per_token`` per uncached token, each later one
    ``decode_s_per_token``.

    As SGLang: request checks (empty ``input_ids``, text without a tokenizer, a negative ``max_new_tokens``,
    a prompt over the context length) are errors raised in the response generator, so a streamed request gets
    HTTP 200 with an ``error`` chunk and a plain one 400 ``{"error": {"message"}}``; a body that does not parse
    or validate gets 400 ``{"object": "error", "message", "type", "param", "code"}``. A request runs under its
    ``rid`` (``/abort_request`` aborts every rid starting with the given one); a client that hangs up is
    aborted ``abort_delay_s`` later; ``/flush_cache`` refuses while requests run unless ``?timeout=`` lets it
    wait; ``/v1/loads`` reports running requests and the KV tokens they hold.

    Faults to inject: ``leak_on_abort`` / ``leak_on_finish`` (an aborted / finished request's KV tokens are never
    freed), ``ignore_disconnect``
    (a request whose client left runs to its end), ``swap`` (every request is answered, output ids and
    log-probabilities, from the prompt of the request started before it). ``memory_file``: where the "GPU
    memory" the tests read is written, ``1000 + used_tokens // 100`` MiB.
    """

    def __init__(self, respond, *, context_len: int = 1 << 20, prefill_s_per_token: float = 0.0,
                 decode_s_per_token: float = 0.0, incremental: bool = False, port: int = 0, logprobs=context_logprobs,
                 radix: bool = True, abort_delay_s: float = 0.2, leak_on_abort: bool = False,
                 leak_on_finish: bool = False, ignore_disconnect: bool = False, swap: bool = False,
                 memory_file: str | None = None) -> None:
        self.respond, self.context_len, self.logprobs = respond, context_len, logprobs
        self.prefill_s_per_token, self.decode_s_per_token, self.incremental = (prefill_s_per_token, decode_s_per_token,
                                                                              incremental)
        self.radix, self.abort_delay_s = radix, abort_delay_s
        self.leak_on_abort, self.leak_on_finish = leak_on_abort, leak_on_finish
        self.ignore_disconnect, self.swap, self.memory_file = ignore_disconnect, swap, memory_file
        self.cache: list[list[int]] = []
        self.requests: list[dict] = []
        self.live: dict[str, dict] = {}  # rid -> {"tokens": int, "abort": threading.Event}
        self.leaked = 0
        self.last_started: list[int] | None = None
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self._write_memory()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, status, obj):
                self._bytes(status, json.dumps(obj).encode(), "application/json")

            def _bytes(self, status, body, ctype="text/plain; charset=utf-8"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def _invalid(self, message):  # FastAPI's RequestValidationError, as SGLang's handler reports it
                self._json(400, {"object": "error", "message": message, "type": "Bad Request", "param": None,
                                 "code": 400})

            def do_GET(self):
                path, _, query = self.path.partition("?")
                if path in ("/health", "/health_generate"):
                    self._json(200, {})
                elif path == "/server_info":
                    self._json(200, {"context_length": None, "max_req_input_len": fake.context_len - 6,
                                     "max_total_num_tokens": fake.context_len, "disable_radix_cache": not fake.radix,
                                     "load_format": "dummy" if fake.logprobs is token_logprobs else "auto"})
                elif path == "/v1/loads":
                    with fake.lock:
                        load = {"dp_rank": 0, "num_running_reqs": len(fake.live), "num_waiting_reqs": 0,
                                "num_used_tokens": fake.used_tokens(), "max_total_num_tokens": fake.context_len}
                    self._json(200, {"timestamp": "", "version": "fake", "loads": [load]})
                elif path == "/flush_cache":
                    self._flush(query)
                else:
                    self._json(404, {"detail": "Not Found"})

            def _flush(self, query):
                timeout = float(query.partition("timeout=")[2] or 0) if "timeout=" in query else 0.0
                with fake.idle:
                    if fake.live and timeout > 0:
                        fake.idle.wait_for(lambda: not fake.live, timeout=timeout)
                    busy = bool(fake.live)
                    if not busy:
                        fake.cache.clear()
                if busy:
                    return self._bytes(400, b"Timed out waiting for idle state." if timeout > 0 else
                                       b"Flush cache failed.\n")
                self._bytes(200, b"Cache flushed.\nPlease check backend logs for more details. (When there are "
                                 b"running or waiting requests, the operation will not be performed.)\n")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path, _, query = self.path.partition("?")
                if path == "/flush_cache":
                    return self._flush(query)
                if path not in ("/generate", "/abort_request"):
                    return self._json(404, {"detail": "Not Found"})
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if not body:
                    return self._invalid("[{'type': 'missing', 'loc': ('body',), 'msg': 'Field required'}]")
                if ctype != "application/json":  # FastAPI then validates the raw bytes, which are no object
                    return self._invalid("[{'type': 'dataclass_type', 'loc': ('body',), "
                                         "'msg': 'Input should be a dictionary'}]")
                try:
                    req = json.loads(body)
                except ValueError as e:
                    return self._invalid(f"[{{'type': 'json_invalid', 'loc': ('body', {e.pos}), "
                                         f"'msg': 'JSON decode error', 'ctx': {{'error': {e.msg!r}}}}}]")
                if not isinstance(req, dict):
                    return self._invalid("[{'type': 'dataclass_type', 'loc': ('body',), "
                                         "'msg': 'Input should be a dictionary'}]")
                if path == "/abort_request":
                    fake.abort(str(req.get("rid") or ""), bool(req.get("abort_all")))
                    return self._bytes(200, b"")
                ids = req.get("input_ids")
                if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
                    return self._invalid("[{'type': 'value_error', 'loc': ('body', 'input_ids'), "
                                         "'msg': 'Value error, must be list or null'}]")
                with fake.lock:
                    fake.requests.append(req)
                stream = bool(req.get("stream", False))
                try:
                    fake.validate(req)
                except ValueError as e:
                    if not stream:
                        return self._json(400, {"error": {"message": str(e)}})
                    self._start_stream()
                    err = {"error": {"message": str(e), "type": "invalid_request_error", "code": 400}}
                    self._chunk(b"data: " + json.dumps(err).encode() + b"\n\n")
                    self._chunk(b"data: [DONE]\n\n")
                    return self._chunk(b"")
                try:
                    self._generate(req, stream)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up while we wrote

            def _start_stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()

            def _chunk(self, data: bytes):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _client_gone(self) -> bool:
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

            def _wait(self, seconds: float, state: dict) -> None:
                """Sleep ``seconds`` as a running request: aborted by /abort_request, or after a hang-up."""
                end = time.monotonic() + seconds
                while True:
                    if state["abort"].is_set():
                        raise _Aborted("Abort in waiting queue")
                    if not fake.ignore_disconnect and self._client_gone():
                        time.sleep(fake.abort_delay_s)  # SGLang aborts a disconnected request a little later
                        raise _Aborted("client disconnected")
                    left = end - time.monotonic()
                    if left <= 0:
                        return
                    time.sleep(min(left, 0.01))

            def _generate(self, req, stream):
                ids, sp = req["input_ids"], req.get("sampling_params") or {}
                n = int(sp.get("max_new_tokens", 128))
                rid = str(req.get("rid") or uuid.uuid4().hex)
                start = None
                if req.get("return_logprob"):
                    start = int(req.get("logprob_start_len", -1))
                    start = len(ids) if start < 0 else start
                with fake.lock:
                    source = fake.last_started if fake.swap and fake.last_started is not None else ids
                    fake.last_started = list(ids)
                    cached = max((_lcp(ids, seq) for seq in fake.cache), default=0) if fake.radix else 0
                    cached = min(cached, len(ids) - 1, start if start is not None else len(ids))
                    state = {"tokens": len(ids), "abort": threading.Event()}
                    fake.live[rid] = state
                    fake._write_memory()
                pieces, out = fake.respond(source, n)
                input_lps = None
                if start is not None:
                    # These positions after the context the answer comes from (another request's, with ``swap``).
                    tail = ids[start:]
                    context = source[:max(0, len(source) - len(tail))] if source is not ids else ids[:start]
                    lps = fake.logprobs(context + tail, len(context))
                    input_lps = [[None if start + i == 0 else lp, ids[start + i], None] for i, lp in enumerate(lps)]

                def meta(i, finish=None):
                    m = {"id": rid, "prompt_tokens": len(ids), "cached_tokens": cached, "completion_tokens": i,
                         "reasoning_tokens": 0, "weight_version": "default", "finish_reason": finish}
                    if input_lps is not None:
                        m["input_token_logprobs"] = input_lps
                    return m

                def obj(i, finish=None):
                    o = {"output_ids": out[i - 1:i] if (stream and fake.incremental) else out[:i],
                         "meta_info": meta(i, finish)}
                    if pieces is not None:
                        o["text"] = pieces[i - 1] if (stream and fake.incremental) else "".join(pieces[:i])
                    return o

                produced = 0
                try:
                    if stream:
                        self._start_stream()
                    self._wait(fake.prefill_s_per_token * (len(ids) - cached), state)
                    if stream and n == 0:
                        self._chunk(b"data: " + json.dumps(obj(0, {"type": "length", "length": 0})).encode() + b"\n\n")
                    for i in range(1, n + 1):
                        if i > 1:
                            self._wait(fake.decode_s_per_token, state)
                        produced = i
                        if stream:
                            fin = {"type": "length", "length": i} if i == n else None
                            try:
                                self._chunk(b"data: " + json.dumps(obj(i, fin)).encode() + b"\n\n")
                            except OSError:
                                if not fake.ignore_disconnect:
                                    raise
                    fake.finish(rid, ids + out, aborted=False)
                except _Aborted as e:
                    fake.finish(rid, None, aborted=True)
                    abort = {"type": "abort", "message": str(e), "status_code": None, "err_type": None}
                    o = {"output_ids": out[produced - 1:produced] if produced else [],
                         "meta_info": meta(produced, abort)}
                    if stream:
                        self._chunk(b"data: " + json.dumps(o).encode() + b"\n\n")
                        self._chunk(b"data: [DONE]\n\n")
                        return self._chunk(b"")
                    return self._json(200, o)
                except OSError:
                    fake.finish(rid, None, aborted=True)
                    raise
                if not stream:
                    return self._json(200, obj(n, {"type": "length", "length": n}))
                try:
                    self._chunk(b"data: [DONE]\n\n")
                    self._chunk(b"")
                except OSError:
                    if not fake.ignore_disconnect:
                        raise

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def validate(self, req: dict) -> None:
        """SGLang's request checks (``GenerateReqInput`` normalisation, ``SamplingParams.verify``, the
        tokenizer manager's length checks), as ``ValueError``s with its messages."""
        ids, text = req.get("input_ids"), req.get("text")
        if ids is None and text is None:
            raise ValueError("Either text, input_ids or input_embeds should be provided.")
        if ids is None:
            raise ValueError("The engine initialized with skip_tokenizer_init=True cannot accept text prompts. "
                             "Please provide input_ids or re-initialize the engine with skip_tokenizer_init=False.")
        if len(ids) == 0:
            raise ValueError("input_ids cannot be empty.")
        n = (req.get("sampling_params") or {}).get("max_new_tokens", 128)
        if n is not None and n < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {n}.")
        if len(ids) >= self.context_len:
            raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length "
                             f"({self.context_len} tokens).")
        if n is not None and len(ids) + n > self.context_len:
            raise ValueError(f"Requested token count exceeds the model's maximum context length of "
                             f"{self.context_len} tokens.")

    def used_tokens(self) -> int:
        return sum(s["tokens"] for s in self.live.values()) + self.leaked

    def _write_memory(self) -> None:
        if self.memory_file:  # replaced whole, as a reader must never see a half-written reading
            tmp = Path(f"{self.memory_file}.{threading.get_ident()}.tmp")
            tmp.write_text(f"{1000 + self.used_tokens() // 100}\n")
            os.replace(tmp, self.memory_file)

    def abort(self, rid: str, abort_all: bool) -> None:
        with self.lock:
            for r, state in self.live.items():
                if abort_all or (rid and r.startswith(rid)):
                    state["abort"].set()

    def finish(self, rid: str, sequence: list[int] | None, *, aborted: bool) -> None:
        with self.idle:
            state = self.live.pop(rid, None)
            if state is not None and (self.leak_on_abort if aborted else self.leak_on_finish):
                self.leaked += state["tokens"]
            if sequence is not None and self.radix:
                self.cache.append(sequence)
            self._write_memory()
            self.idle.notify_all()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _lcp(a, b):
    return checks.common_prefix(a, b)


def oracle(tok: WordTokenizer, contexts: list[workload.SharedContext]):
    """A fake model that answers the last question of a plain-format prompt correctly."""
    answers = {q.question: q.answers for c in contexts for q in c.queries}

    def respond(ids, n):
        text = tok.decode(ids)
        question = re.findall(r"Question: (.*?)\nAnswer:", text)[-1]
        reply = " " + ", ".join(answers[question])
        out = tok.encode(reply)
        return [tok.decode([i]) for i in out], out

    return respond


@pytest.fixture
def tok():
    return WordTokenizer()


# ----------------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", workload.TEXT_TASKS)
def test_text_contexts_are_seeded(task, tok):
    a = workload.make_contexts(task=task, target_tokens=3000, count=2, seed=7, tokenizer=tok)
    b = workload.make_contexts(task=task, target_tokens=3000, count=2, seed=7, tokenizer=WordTokenizer())
    c = workload.make_contexts(task=task, target_tokens=3000, count=2, seed=8, tokenizer=tok)
    assert [x.context for x in a] == [x.context for x in b]
    assert [x.queries for x in a] == [x.queries for x in b]
    assert a[0].context != a[1].context  # indices differ
    assert a[0].context != c[0].context  # seeds differ
    assert len({x.context_id for x in a + c}) == 4


@pytest.mark.parametrize("task", workload.TEXT_TASKS)
@pytest.mark.parametrize("target", [800, 5000, 40000])
def test_text_context_length_hits_target(task, target, tok):
    ctx = workload.text_context(task=task, target_tokens=target, tokenizer=tok, seed=1)
    assert ctx.context_ids == tok.encode(ctx.context)
    # One filler unit short at most: a word (+ space + full stop) or, for kv, one key-value pair.
    pair = f', "{"0" * 8}-{"0" * 4}-{"0" * 4}-{"0" * 4}-{"0" * 12}": "{"0" * 8}-{"0" * 4}-{"0" * 4}-{"0" * 4}-{"0" * 12}"'
    unit = len(tok.encode(pair)) if task == "kv" else 3
    assert target - unit < ctx.context_tokens <= target


@pytest.mark.parametrize("task", workload.TEXT_TASKS)
def test_text_queries_are_answerable_from_context(task, tok):
    for ctx in workload.make_contexts(task=task, target_tokens=6000, count=3, seed=3, tokenizer=tok):
        assert len(ctx.queries) == workload.QUERIES_PER_CONTEXT
        assert len({q.question for q in ctx.queries}) == workload.QUERIES_PER_CONTEXT
        for q in ctx.queries:
            assert q.answers and all(ctx.context.count(a) >= 1 for a in q.answers)
        if task == "kv":
            data = json.loads(ctx.context[ctx.context.index("{"):])
            for q in ctx.queries:
                key = re.search(r'"(.+)"', q.question).group(1)
                assert data[key] == q.answers[0]
        if task == "vt":
            for q in ctx.queries:
                value = re.search(r"value (\d+)", q.question).group(1)
                first, *rest = q.answers
                pos = ctx.context.index(f"VAR {first} = {value}.")
                for prev, name in zip(q.answers, rest):  # each copy comes after what it copies
                    nxt = ctx.context.index(f"VAR {name} = VAR {prev}.")
                    assert nxt > pos
                    pos = nxt


def test_needles_are_spread_over_the_context(tok):
    ctx = workload.text_context(task="passkey", target_tokens=20000, tokenizer=tok, seed=5)
    where = sorted(ctx.context.index(q.answers[0]) / len(ctx.context) for q in ctx.queries)
    # one needle per fifth of the context
    assert [int(w * 5) for w in where] == [0, 1, 2, 3, 4]


def test_token_contexts_exact_and_seeded():
    a = workload.make_contexts(task="tokens", target_tokens=4096, count=2, seed=1, vocab_size=128256)
    b = workload.make_contexts(task="tokens", target_tokens=4096, count=2, seed=1, vocab_size=128256)
    low, high = workload.token_id_range(128256)
    assert high <= 128000  # clear of Llama 3's special tokens
    for x, y in zip(a, b):
        assert x.context_tokens == 4096 and x.context_ids == y.context_ids
        assert len(x.queries) == workload.QUERIES_PER_CONTEXT
        assert all(len(q.question_ids) == 32 and not q.answers for q in x.queries)
        assert all(low <= t < high for t in x.context_ids)
    assert a[0].context_ids != a[1].context_ids


def test_fit_units_and_argument_errors(tok):
    # count = 7 + 3n exactly: the largest n with 7 + 3n <= target
    for target in (7, 10, 11, 1000, 123457):
        n = workload.fit_units(lambda n: "x" * (7 + 3 * n), len, target, start=0)
        assert 7 + 3 * n <= target < 7 + 3 * (n + 1)
    with pytest.raises(ValueError, match="target_tokens"):
        workload.text_context(task="kv", target_tokens=20, tokenizer=tok, seed=0)
    with pytest.raises(ValueError, match="task"):
        workload.make_contexts(task="sums", target_tokens=100, count=1, seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        workload.make_contexts(task="kv", target_tokens=100, count=1, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        workload.make_contexts(task="tokens", target_tokens=100, count=1, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Prompt formats (both modes)
# ----------------------------------------------------------------------------------------------------------


def _tiny_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    Tokenizer, models, pre_tokenizers, processors = (tokenizers.Tokenizer, tokenizers.models,
                                                      tokenizers.pre_tokenizers, tokenizers.processors)
    PreTrainedTokenizerFast = transformers.PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 additional_special_tokens=specials[3:])
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return HFTokenizer(hf)


def _check_multiturn_prefixes(fmt, ctx):
    replies, prev = [], None
    for k in range(len(ctx.queries)):
        ids = prompts.multiturn_prompt(fmt, ctx, replies)
        if prev is not None:
            assert ids[: len(prev)] == prev and len(ids) > len(prev)
        assert prompts.multiturn_prompt(fmt, ctx, replies) == ids  # deterministic
        prev = ids
        replies.append((f"reply {k}", [200 + k, 201 + k]))
    with pytest.raises(ValueError, match="replies"):
        prompts.multiturn_prompt(fmt, ctx, replies)


def test_token_format_both_modes():
    ctx = workload.token_context(target_tokens=512, vocab_size=32000, seed=0)
    fmt = prompts.make_format("tokens", "plain", None)
    _check_multiturn_prefixes(fmt, ctx)
    turn2 = prompts.multiturn_prompt(fmt, ctx, [(None, [7, 8, 9])])
    assert turn2 == ctx.context_ids + ctx.queries[0].question_ids + [7, 8, 9] + ctx.queries[1].question_ids
    requests = [fmt.first(ctx, q) for q in ctx.queries]
    assert all(r[:512] == ctx.context_ids for r in requests) and len({tuple(r) for r in requests}) == 5


def test_plain_format_both_modes(tok):
    ctx = workload.text_context(task="kv", target_tokens=2000, tokenizer=tok, seed=0)
    fmt = prompts.make_format("kv", "plain", tok)
    _check_multiturn_prefixes(fmt, ctx)
    first = fmt.first(ctx, ctx.queries[0])
    assert first[:1] == tok.bos_ids and first[1: 1 + ctx.context_tokens] == ctx.context_ids
    assert tok.decode(first).endswith(f"Question: {ctx.queries[0].question}\nAnswer:")
    turn2 = tok.decode(prompts.multiturn_prompt(fmt, ctx, [("  the value \n", [])]))
    assert turn2.endswith(f"Answer: the value\n\nQuestion: {ctx.queries[1].question}\nAnswer:")


def test_chat_format_with_hf_tokenizer():
    hf = _tiny_hf_tokenizer()
    assert hf.bos_ids == [1] and hf.encode("<|end|>") == [5]
    ctx = workload.SharedContext(context_id="c", task="kv", target_tokens=3, context_ids=[0, 0, 0],
                                 queries=[workload.Query(question=f"q{i}", answers=["a"]) for i in range(5)])
    fmt = prompts.make_format("kv", "chat", hf)
    first = fmt.first(ctx, ctx.queries[0])
    # <|user|> + context ids + "\n\nq0" (unknown words -> <unk>) + <|end|><|assistant|>
    assert first[0] == 3 and first[1:4] == [0, 0, 0] and first[-2:] == [5, 4]
    _check_multiturn_prefixes(fmt, ctx)
    # reply "x" (<unk>) <|end|> <|user|> "q1" (<unk>) <|end|> <|assistant|>
    assert fmt.follow("x", [], ctx.queries[1]) == [0, 5, 3, 0, 5, 4]
    with pytest.raises(ValueError, match="chat template"):
        prompts.ChatFormat(WordTokenizer()).first(ctx, ctx.queries[0])


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def test_answer_matching():
    assert checks.score_reply(["123456"], "The pass key is 123456.") == 1.0
    assert checks.score_reply(["123456"], "It is 1234567") == 0.0  # not inside a longer number
    assert checks.score_reply(["ABCDE", "FGHIJ", "KLMNO", "PQRST"], "abcde, FGHIJ and KLMNOP") == 0.5
    assert checks.score_reply(["x"], None) == 0.0
    with pytest.raises(ValueError, match="answers"):
        checks.score_reply([], "text")


def test_cross_request_attribution():
    refs = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [1, 2, 9]}
    verdicts = {
        "exact": checks.attribute("a", [1, 2, 3], refs),
        "drift": checks.attribute("a", [1, 2, 7], refs),
        "cross": checks.attribute("a", [4, 5, 6], refs),
        "error": checks.attribute("b", None, refs, error="HTTP 500"),
    }
    assert {k: v.verdict for k, v in verdicts.items()} == {k: k for k in verdicts}
    assert verdicts["drift"].agree == 2 and verdicts["cross"].other == "b"
    assert checks.cross_check([verdicts["exact"], verdicts["drift"]], refs).status == "PASS"
    bad = checks.cross_check(list(verdicts.values()), refs)
    assert bad.status == "FAIL" and bad.counts["cross"] == 1 and "a<-b" in bad.message
    same = {"a": [1, 1], "b": [1, 1]}
    assert checks.cross_check([checks.attribute("a", [1, 1], same)], same).status == "INCONCLUSIVE"
    with pytest.raises(ValueError, match="request"):
        checks.attribute("zzz", [1], refs)


def test_memory_parsing_and_bounds():
    assert gpu_memory.parse_memory_used("1234\n 5678 \n") == [1234, 5678]
    assert gpu_memory.parse_memory_used("80123 MiB\n") == [80123]
    for bad in ("", "N/A\n", "12.5\n"):
        with pytest.raises(ValueError, match="text"):
            gpu_memory.parse_memory_used(bad)
    flat = stats.bounded_memory([1000, 1200, 1100, 1150, 1190, 1210, 1200, 1205], slack_mib=64)
    assert flat.status == "PASS" and flat.peak_mib == 1210 and flat.early_peak_mib == 1200
    leak = stats.bounded_memory([1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700], slack_mib=64)
    assert leak.status == "FAIL" and leak.late_peak_mib == 1700
    assert stats.bounded_memory([1, 2], slack_mib=0).status == "INCONCLUSIVE"


def test_memory_poller_samples_and_reports_errors():
    readings = iter(["100\n7\n", "300\n7\n", "200\n7\n"] + ["250\n7\n"] * 1000)
    with gpu_memory.MemoryPoller(gpu=0, interval_s=0.01, read=lambda: next(readings)) as mem:
        time.sleep(0.2)
    assert mem.values()[:3] == [100, 300, 200] and mem.error is None
    with gpu_memory.MemoryPoller(gpu=0, interval_s=0.01, read=lambda: "oops\n") as broken:
        broken._thread.join(timeout=30)  # gives up after max_failures readings in a row
    assert broken.values() == [] and "oops" in broken.error and not broken._thread.is_alive()
    flaky = iter(["100\n", "oops\n", "200\n"] + ["300\n"] * 10_000)
    with gpu_memory.MemoryPoller(gpu=0, interval_s=0.01, read=lambda: next(flaky)) as mem:
        deadline = time.monotonic() + 30
        while len(mem.values()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert mem.values()[:3] == [100, 200, 300] and "oops" in mem.error  # one bad reading is skipped


# ----------------------------------------------------------------------------------------------------------
# Client against the fake server
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("incremental", [False, True])
def test_client_streams_and_reads_meta_info(incremental, tok):
    def respond(ids, n):
        out = tok.encode(" the answer is 42")[:n]
        return [tok.decode([i]) for i in out], out

    with FakeSGLang(respond, prefill_s_per_token=2e-4, incremental=incremental) as fake:
        client = SGLangClient(fake.url, timeout_s=30)
        assert client.healthy() and client.server_info()["max_req_input_len"] > 0
        ids = list(range(10, 1010))
        r1 = client.generate(ids, max_new_tokens=8, stop=["\n\n"])
        assert r1.ok and r1.text == " the answer is 42" and r1.output_ids == tok.encode(" the answer is 42")
        assert r1.cached_tokens == 0 and r1.prompt_tokens == 1000 and r1.completion_tokens == len(r1.output_ids)
        assert r1.chunks == len(r1.output_ids) and 0.15 < r1.ttft_s <= r1.latency_s
        r2 = client.generate(ids + [5, 6], max_new_tokens=8)
        assert r2.cached_tokens == 1000 and r2.ttft_s < r1.ttft_s
        assert fake.requests[0]["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": False,
                                                       "stop": ["\n\n"]}
        assert fake.requests[0]["stream"] is True and fake.requests[0]["input_ids"] == ids
        plain = client.generate(ids, max_new_tokens=8, stream=False)
        assert plain.ok and plain.ttft_s is None and plain.output_ids == r1.output_ids
        assert client.flush_cache() and client.generate(ids, max_new_tokens=2).cached_tokens == 0


def test_client_errors_and_disconnects():
    with FakeSGLang(token_respond, context_len=2048, prefill_s_per_token=1e-3) as fake:
        client = SGLangClient(fake.url, timeout_s=30)
        too_long = list(range(100, 2200))
        r = client.generate(too_long, max_new_tokens=4, stream=False)
        assert r.status == 400 and "longer than the model's context length" in r.error and not r.ok
        r = client.generate(too_long, max_new_tokens=4, stream=True)
        assert r.status == 200 and "context length" in r.error
        # 1.9 s of fake prefill: hanging up after 0.2 s leaves before the first token
        gone = client.abandon_generate(list(range(100, 2000)), after_s=0.2)
        assert gone["first_chunk_before_close"] is False and gone["closed_after_s"] < 1.0
        again = client.generate(list(range(100, 200)), max_new_tokens=4)
        assert again.ok and again.output_ids == token_respond(list(range(100, 200)), 4)[1]
        done = client.abandon_generate(list(range(100, 110)), after_s=1.0)
        assert done["first_chunk_before_close"] is True
    dead = SGLangClient(fake.url, timeout_s=2).generate([1, 2], max_new_tokens=1)
    assert dead.status == 0 and not dead.ok and not SGLangClient(fake.url, timeout_s=2).healthy()
    with pytest.raises(ValueError, match="base_url"):
        SGLangClient("http://10.0.0.1:30000")


# ----------------------------------------------------------------------------------------------------------
# Sessions and the run CLI against the fake server
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", workload.TEXT_TASKS)
def test_multiturn_session_hits_cache_and_scores(task, tok):
    ctxs = workload.make_contexts(task=task, target_tokens=3000, count=1, seed=2, tokenizer=tok)
    fmt = prompts.make_format(task, "plain", tok)
    with FakeSGLang(oracle(tok, ctxs), prefill_s_per_token=2e-4) as fake:
        client = SGLangClient(fake.url)
        recs = sessions.run_session("multiturn", client, fmt, ctxs[0], backend="fake", turns=5, max_new_tokens=48)
    assert [r.turn for r in recs] == [1, 2, 3, 4, 5] and all(r.error is None for r in recs)
    assert all(r.accuracy == 1.0 for r in recs)
    for prev, cur in zip(recs, recs[1:]):
        assert cur.cached_tokens >= prev.prompt_tokens  # the whole previous prompt came from the cache
        assert cur.ttft_s < recs[0].ttft_s
    assert recs[0].cached_tokens == 0 and recs[0].context_tokens == ctxs[0].context_tokens
    # turn k's prompt extends turn k-1's prompt + its reply
    sent = [r["input_ids"] for r in fake.requests]
    for k in range(1, 5):
        assert sent[k][: len(sent[k - 1])] == sent[k - 1]
        assert tok.decode(sent[k][len(sent[k - 1]):]).startswith(" " + ", ".join(ctxs[0].queries[k - 1].answers))


def test_multirequest_sessions_share_context(tok):
    ctxs = workload.make_contexts(task="passkey", target_tokens=3000, count=1, seed=4, tokenizer=tok)
    fmt = prompts.make_format("passkey", "plain", tok)
    with FakeSGLang(oracle(tok, ctxs)) as fake:
        recs = sessions.run_multirequest(SGLangClient(fake.url), fmt, ctxs[0], backend="fake", turns=5,
                                         max_new_tokens=16, concurrency=2)
    assert sorted(r.turn for r in recs) == [1, 2, 3, 4, 5] and all(r.accuracy == 1.0 for r in recs)
    assert recs[0].cached_tokens == 0
    assert all(r.cached_tokens >= 1 + ctxs[0].context_tokens for r in recs[1:])
    assert all(len(r["input_ids"]) < 1 + ctxs[0].context_tokens + 40 for r in fake.requests)  # no history
    client = SGLangClient("http://127.0.0.1:9")  # never reached: arguments are checked first
    with pytest.raises(ValueError, match="turns"):
        sessions.run_multiturn(client, fmt, ctxs[0], backend="x", turns=6, max_new_tokens=4)
    with pytest.raises(ValueError, match="concurrency"):
        sessions.run_multirequest(client, fmt, ctxs[0], backend="x", turns=5, max_new_tokens=4, concurrency=0)
    with pytest.raises(ValueError, match="mode"):
        sessions.run_session("chat", client, fmt, ctxs[0], backend="x", turns=5, max_new_tokens=4)


def test_run_cli_token_mode_and_summary(tmp_path):
    outs = {}
    for label, per_token in (("minference", 1e-5), ("flashinfer", 1e-4)):
        with FakeSGLang(token_respond, prefill_s_per_token=per_token) as fake:
            out = tmp_path / f"{label}.json"
            rc = run.main(["--server-url", fake.url, "--backends", label, "--task", "tokens", "--vocab-size", "32000",
                           "--lengths", "4K", "--sessions", "2", "--mode", "multiturn,multirequest", "--turns", "3",
                           "--out", str(out)])
            assert rc == 0
            outs[label] = out
    data = json.loads(outs["minference"].read_text())
    assert {"device", "date", "command", "versions"} <= set(data)
    recs = data["runs"][0]["records"]
    assert len(recs) == 2 * 2 * 3 and {r["mode"] for r in recs} == {"multiturn", "multirequest"}
    assert all(r["context_tokens"] == 4096 and r["error"] is None for r in recs)
    assert all(r["cached_tokens"] >= 4096 for r in recs if r["turn"] > 1)
    joined = run.report([r for p in outs.values() for r in run._records_of(json.loads(p.read_text()))],
                        sparse="minference", dense="flashinfer", exp=sessions.Expectations())
    assert len(joined["comparison"]) == 2 * 3
    assert all(line.startswith("PASS expectation") for line in joined["expectations"]), joined["expectations"]
    slow = sessions.Expectations(min_first_turn_speedup=100.0)
    lines = sessions.expectation_lines(joined["comparison"], slow)
    assert all(line.startswith("FAIL") and "turn-1 speedup" in line for line in lines)
    assert run.main(["--summarize", str(outs["minference"]), str(outs["flashinfer"])]) == 0


# ----------------------------------------------------------------------------------------------------------
# Reliability pieces
# ----------------------------------------------------------------------------------------------------------


def test_load_mix_and_run_load_detects_swapped_answers():
    mix = reliability.load_mix(vocab_size=32000, long_tokens=3000, short_tokens=64, long_contexts=2, variants=3,
                               shorts=4, seed=0)
    assert len(mix) == 10 and len({tuple(r.input_ids) for r in mix}) == 10
    assert mix[0].input_ids[:2968] == mix[1].input_ids[:2968] != mix[3].input_ids[:2968]
    assert all(len(r.input_ids) == 3000 for r in mix[:6]) and all(len(r.input_ids) == 64 for r in mix[6:])
    with pytest.raises(ValueError, match="long_tokens"):
        reliability.load_mix(vocab_size=32000, long_tokens=32, short_tokens=8, long_contexts=1, variants=1,
                             shorts=1, seed=0)
    refs = {r.name: token_respond(r.input_ids, 6)[1] for r in mix}

    with FakeSGLang(token_respond, prefill_s_per_token=1e-6) as fake:
        done = reliability.run_load(SGLangClient(fake.url), mix, clients=8, max_requests=40, duration_s=30,
                                    max_new_tokens=6, seed=0)
    assert len(done) == 40
    ok = checks.cross_check([checks.attribute(n, r.output_ids, refs, r.error) for n, r in done], refs)
    assert ok.status == "PASS" and ok.counts["exact"] == 40

    last, lock = {}, threading.Lock()  # a server bug: every request gets the answer of the one before it

    def swapped(ids, n):
        with lock:
            prev, last["ids"] = last.get("ids", ids), ids
        return token_respond(prev, n)

    with FakeSGLang(swapped) as fake:
        done = reliability.run_load(SGLangClient(fake.url), mix, clients=8, max_requests=40, duration_s=30,
                                    max_new_tokens=6, seed=1)
    bad = checks.cross_check([checks.attribute(n, r.output_ids, refs, r.error) for n, r in done], refs)
    assert bad.status == "FAIL" and bad.counts["cross"] > 0


def test_run_load_stops_at_the_deadline():
    mix = reliability.load_mix(vocab_size=32000, long_tokens=200, short_tokens=16, long_contexts=1, variants=1,
                               shorts=1, seed=0)
    with FakeSGLang(token_respond, prefill_s_per_token=1e-3) as fake:
        t0 = time.monotonic()
        done = reliability.run_load(SGLangClient(fake.url), mix, clients=8, max_requests=10**6, duration_s=0.5,
                                    max_new_tokens=2, seed=0)
    assert 8 <= len(done) < 10**6 and time.monotonic() - t0 < 3.0


def test_config_faults_trip_the_config_layer(tmp_path):
    # The same files the faults check hands to a server, read by the project's config layer as the backend
    # does at startup: each must raise, with a message the check recognises.
    config = pytest.importorskip("sgl_minference.config")
    faults = {f.name: f for f in reliability.config_faults(num_layers=4, num_heads=8)}
    assert sorted(faults) == ["budget", "malformed", "pattern", "shape"]
    for i, (name, fault) in enumerate(sorted(faults.items())):
        path = tmp_path / f"bad_config_{i}.json"
        path.write_text(fault.content)
        with pytest.raises(config.ConfigError) as err:
            config.MInferenceConfig.load(path).validate_for_model(4, 8)
        assert re.search(fault.expect, str(err.value), re.IGNORECASE), (name, str(err.value))
    shape = json.loads(faults["shape"].content)
    assert len(shape) == 6 and len(shape[0]) == 16
    config.MInferenceConfig.load(_write(tmp_path / "good.json", faults["shape"].content)).validate_for_model(6, 16)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_error_line_skips_the_echoed_command():
    log = textwrap.dedent("""\
        $ python -m sglang.launch_server --json-model-override-args {"minference": {"config_path": "/x/layer.json"}}
        [2025] server_args=ServerArgs(model_path='m', json_model_override_args='layer head')
        [2025] Load weight end.
        sgl_minference.config.ConfigError: /x/bad_config_1.json: layer 4, field 'num_layers': out of range
        """)
    assert reliability.error_line(log, r"layer|head").startswith("sgl_minference.config.ConfigError")
    assert reliability.error_line(log, r"diagonal_magic") is None


def test_error_line_prefers_the_exception_over_the_raise_statement():
    # As SGLang logs a scheduler's traceback (H100 run, 2026-11-24): the quoted source line comes first.
    log = textwrap.dedent("""\
          File "/site/sgl_minference/config.py", line 316, in load
            raise ConfigError(f"{source}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        sgl_minference.config.ConfigError: /x/bad_config_0.json: not JSON (Expecting value at line 1, column 11969)
        """)
    line = reliability.error_line(log, r"not json|expecting")
    assert line.startswith("sgl_minference.config.ConfigError: /x/bad_config_0.json: not JSON")


# ----------------------------------------------------------------------------------------------------------
# Server launching (with a stand-in for sglang.launch_server)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class ScriptSpec(server.ServerSpec):
    """Runs ``script PORT OVERRIDES_JSON MODEL_PATH`` instead of ``python -m sglang.launch_server``."""

    script: str = ""

    def command(self, port):
        return ([sys.executable, self.script, str(port), json.dumps(self.model_overrides), self.model_path]
                + (["--disable-radix-cache"] if self.disable_radix_cache else []))


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "fake_launch.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_launched_server_waits_for_health_and_always_stops(tmp_path):
    script = _script(tmp_path, """\
        import subprocess, sys, time
        from http.server import BaseHTTPRequestHandler, HTTPServer
        # a child in the same process group, as SGLang's scheduler, deaf to SIGTERM
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        print("child", child.pid, flush=True)
        time.sleep(0.5)  # startup
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/health_generate" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()
            def log_message(self, *a):
                pass
        HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
        """)
    spec = ScriptSpec(model_path="m", attention_backend="minference", script=script)
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match="inside"):
        with server.launched_server(spec, log_path=log, startup_timeout_s=30) as srv:
            assert srv.alive() and srv.client().healthy() and srv.startup_s >= 0.5
            proc = srv.process
            raise RuntimeError("inside")
    assert proc.poll() is not None
    child = int(re.search(r"child (\d+)", log.read_text()).group(1))
    assert not server._group_running(proc.pid)
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()


def test_attempt_startup_reports_exit_code_and_log(tmp_path):
    script = _script(tmp_path, """\
        import sys
        print("sgl_minference.config.ConfigError: bad_config_0.json: layer 0, head 0, field 'type': "
              "unknown pattern type 'diagonal_magic'", flush=True)
        sys.exit(3)
        """)
    spec = ScriptSpec(model_path="m", attention_backend="minference", script=script)
    outcome = server.attempt_startup(spec, log_path=tmp_path / "f.log", timeout_s=30)
    assert outcome.exit_code == 3 and not outcome.became_healthy
    assert "diagonal_magic" in reliability.error_line((tmp_path / "f.log").read_text(), "diagonal_magic")
    with pytest.raises(server.ServerStartError, match="exited with code 3") as err:
        with server.launched_server(spec, log_path=tmp_path / "g.log", startup_timeout_s=30):
            pass
    assert err.value.exit_code == 3 and "diagonal_magic" in err.value.log_tail


def test_server_command_and_shared_options(tmp_path):
    parser = run.build_parser()
    cfg = tmp_path / "cfg.json"
    args = parser.parse_args(["--model", "launch/models/llama3.2-1b", "--dummy", "--minference-config", str(cfg),
                              "--json-model-override-args", '{"rope_scaling": null}', "--chunked-prefill-size",
                              "8192", "--mem-fraction-static", "0.8", "--disable-cuda-graph", "--context-length",
                              "262144", "--server-arg=--log-level=warning"])
    spec = server.spec_from_args(args, "minference")
    cmd = spec.command(12345)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    for pair in (["--host", "127.0.0.1"], ["--port", "12345"], ["--attention-backend", "minference"],
                 ["--load-format", "dummy"], ["--chunked-prefill-size", "8192"], ["--mem-fraction-static", "0.8"],
                 ["--context-length", "262144"]):
        i = cmd.index(pair[0])
        assert cmd[i: i + 2] == pair
    assert "--skip-tokenizer-init" in cmd and "--disable-cuda-graph" in cmd and cmd[-1] == "--log-level=warning"
    override = json.loads(cmd[cmd.index("--json-model-override-args") + 1])
    assert override == {"rope_scaling": None, "minference": {"config_path": str(cfg.resolve())}}
    assert spec.environment()["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] == "1"
    env_args = parser.parse_args(["--model", "m", "--minference-config", str(cfg), "--config-via", "env"])
    env_spec = server.spec_from_args(env_args, "flashinfer")
    assert "--json-model-override-args" not in env_spec.command(1)
    assert env_spec.environment()[server.CONFIG_ENV_VAR] == str(cfg.resolve())
    port = server.free_port()
    assert 0 < port < 65536


# ----------------------------------------------------------------------------------------------------------
# Reliability subcommands end to end, with stand-ins for the server
# ----------------------------------------------------------------------------------------------------------

TESTS_DIR = Path(__file__).resolve().parent

SERVE_SCRIPT = f"""\
import json, os, sys
sys.path[:0] = [{str(TESTS_DIR.parent)!r}, {str(TESTS_DIR)!r}]
from test_multiturn import FakeSGLang, context_logprobs, token_logprobs, token_respond
port, model = int(sys.argv[1]), sys.argv[3]
context_len = json.load(open(model + "/config.json"))["max_position_embeddings"]
env, faults = os.environ, os.environ.get("FAKE_FAULTS", "").split(",")
FakeSGLang(token_respond, context_len=context_len, port=port, radix="--disable-radix-cache" not in sys.argv,
           prefill_s_per_token=float(env["FAKE_PREFILL_S_PER_TOKEN"]),
           decode_s_per_token=float(env.get("FAKE_DECODE_S_PER_TOKEN", "0")),
           logprobs=token_logprobs if env.get("FAKE_WEIGHTS") == "dummy" else context_logprobs,
           leak_on_abort="leak" in faults, leak_on_finish="leak_finished" in faults,
           ignore_disconnect="ignore_disconnect" in faults, swap="swap" in faults,
           memory_file=env.get("FAKE_MEMORY_FILE")).httpd.serve_forever()
"""

# What the minference backend does at startup with its config; serves /health_generate when it is usable.
CONFIG_SCRIPT = f"""\
import json, sys
sys.path[:0] = [{str(TESTS_DIR.parent)!r}]
from http.server import BaseHTTPRequestHandler, HTTPServer
from sgl_minference.config import ConfigError, resolve
port, overrides, model = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cfg = json.load(open(model + "/config.json"))
try:
    resolve({{**cfg, **overrides}}, model).validate_for_model(cfg["num_hidden_layers"], cfg["num_attention_heads"])
except ConfigError as e:
    print(f"sgl_minference.config.ConfigError: {{e}}", flush=True)
    sys.exit(1)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def tiny_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_attention_heads": 8,
                                                   "vocab_size": 32000, "max_position_embeddings": 8192}))
    return model


REAL_SPEC_FROM_ARGS = server.spec_from_args


def _stand_in(monkeypatch, tmp_path, body: str) -> None:
    """Every server the reliability commands start runs ``body`` (with the command's options) instead."""
    script = tmp_path / "stand_in.py"
    script.write_text(body)

    def spec(args, backend, **kw):
        base = REAL_SPEC_FROM_ARGS(args, backend, **kw)
        return ScriptSpec(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, script=str(script))

    monkeypatch.setattr(reliability, "spec_from_args", spec)  # the faults check
    monkeypatch.setattr(server, "spec_from_args", spec)  # server_for, which every other check uses


def _statuses(out: Path) -> dict[str, str]:
    data = json.loads(out.read_text())
    assert {"device", "date", "command", "checks"} <= set(data)
    return {c["name"]: c["status"] for c in data["checks"]}


def test_reliability_load_end_to_end(monkeypatch, tmp_path, tiny_model):
    _stand_in(monkeypatch, tmp_path, SERVE_SCRIPT)
    monkeypatch.setenv("FAKE_PREFILL_S_PER_TOKEN", "2e-5")
    readings = iter(["900\n", "900\n"] + ["1000\n", "1100\n"] * 10_000)
    monkeypatch.setattr(reliability, "MemoryPoller",
                        lambda **kw: gpu_memory.MemoryPoller(**kw, read=lambda: next(readings)))
    out = tmp_path / "load.json"
    rc = reliability.main(["load", "--model", str(tiny_model), "--out", str(out), "--long-tokens", "3000",
                           "--short-tokens", "64", "--max-requests", "24", "--duration-s", "20",
                           "--memory-interval-s", "0.005", "--log-dir", str(tmp_path / "logs"), "--startup-timeout-s", "60"])
    assert rc == 0
    assert _statuses(out) == {"load-crash": "PASS", "load-cross-request": "PASS", "load-memory": "PASS"}
    data = json.loads(out.read_text())
    assert data["load"]["requests"] == 24 and len(data["attributions"]) == 24
    assert data["memory"]["peak_mib"] == 1100 and data["memory"]["idle_mib"][:2] == [900, 900]
    other = tmp_path / "dense.json"
    other.write_text(json.dumps({"kind": "reliability-load", "memory": {"peak_mib": 1000}}))
    cmp_out = tmp_path / "cmp.json"
    assert reliability.main(["compare", "--sparse", str(out), "--dense", str(other), "--memory-slack-mib", "64",
                             "--out", str(cmp_out)]) == 1
    assert _statuses(cmp_out) == {"memory-vs-dense": "FAIL"}
    assert reliability.main(["compare", "--sparse", str(out), "--dense", str(other), "--out", str(cmp_out)]) == 0


SERVING_CHECKS = ["serving-malformed-json", "serving-empty-prompt", "serving-zero-new-tokens", "serving-overlong",
                  "serving-flush-during-prefill", "serving-abort-during-prefill", "serving-disconnect-x4",
                  "serving-crash"]


def _serving(monkeypatch, tmp_path, tiny_model, *extra, faults=""):
    _stand_in(monkeypatch, tmp_path, SERVE_SCRIPT)
    # A 3000-token prompt prefills for 1.2 s; an abandoned request's 4096 new tokens would take 4 s more.
    monkeypatch.setenv("FAKE_PREFILL_S_PER_TOKEN", "4e-4")
    monkeypatch.setenv("FAKE_DECODE_S_PER_TOKEN", "1e-3")
    monkeypatch.setenv("FAKE_FAULTS", faults)
    out = tmp_path / "serving.json"
    rc = reliability.main(["serving", "--model", str(tiny_model), "--out", str(out), "--short-tokens", "64",
                           "--long-tokens", "3000", "--disconnects", "4", "--disconnect-after-s", "0.3",
                           "--during-prefill-s", "0.3", "--idle-timeout-s", "8", "--log-dir", str(tmp_path / "logs"),
                           "--startup-timeout-s", "60", *extra])
    return rc, out, {c["name"]: c for c in json.loads(out.read_text())["checks"]}


def test_reliability_serving_end_to_end(monkeypatch, tmp_path, tiny_model):
    rc, out, got = _serving(monkeypatch, tmp_path, tiny_model)
    assert [c for c in got] == SERVING_CHECKS and rc == 0, {n: c["message"] for n, c in got.items()}
    assert all(c["status"] == "PASS" for c in got.values())
    assert got["serving-overlong"]["http_status"] == 400 and got["serving-overlong"]["prompt_tokens"] > 8192
    assert all(a["status"] == 400 for a in got["serving-malformed-json"]["answers"])
    assert got["serving-flush-during-prefill"]["immediate"]["status"] == 400
    assert got["serving-flush-during-prefill"]["deferred"]["status"] == 200
    rounds = got["serving-disconnect-x4"]["rounds"]
    assert len(rounds) == 4 and all(r["aborted"] and r["used_tokens"] == [0] for r in rounds)
    assert all(r["flushed"] for r in rounds)  # each round a full prefill, not the prefix the last one cached


def test_reliability_serving_catches_leaked_kv_and_unaborted_requests(monkeypatch, tmp_path, tiny_model):
    # Aborted requests whose KV is never freed: the scheduler never reports zero held slots.
    rc, _, got = _serving(monkeypatch, tmp_path, tiny_model, "--checks", "abort,disconnect", "--disconnects", "1",
                          "--idle-timeout-s", "3", faults="leak")
    assert rc == 1
    assert got["serving-abort-during-prefill"]["status"] == "FAIL"
    assert got["serving-disconnect-x1"]["status"] == "FAIL"
    # Hung-up requests that run to their end: still busy when the (shorter) idle bound runs out.
    rc, _, got = _serving(monkeypatch, tmp_path, tiny_model, "--checks", "disconnect", "--disconnects", "1",
                          "--idle-timeout-s", "1.5", faults="ignore_disconnect")
    assert rc == 1 and got["serving-disconnect-x1"]["status"] == "FAIL"
    assert got["serving-disconnect-x1"]["rounds"][0]["idle"] is False


def test_reliability_faults_end_to_end(monkeypatch, tmp_path, tiny_model):
    _stand_in(monkeypatch, tmp_path, CONFIG_SCRIPT)
    out = tmp_path / "faults.json"
    args = ["faults", "--model", str(tiny_model), "--out", str(out), "--log-dir", str(tmp_path / "logs"),
            "--startup-timeout-s", "30"]
    assert reliability.main(args) == 0
    assert _statuses(out) == {f"fault-{n}": "PASS" for n in ("malformed", "shape", "pattern", "budget")}
    faults = json.loads(out.read_text())["faults"]
    assert all(f["exit_code"] == 1 and "ConfigError" in f["message"] for f in faults)
    assert reliability.main(args + ["--config-via", "env", "--faults", "pattern"]) == 0
    # A backend that ignores its config starts fine: the check must fail.
    lenient = CONFIG_SCRIPT.replace("resolve({**cfg, **overrides}, model).validate_for_model(", "print(")
    _stand_in(monkeypatch, tmp_path, lenient)
    assert reliability.main(args + ["--faults", "budget"]) == 1
    assert "started and served" in json.loads(out.read_text())["checks"][0]["message"]


# ----------------------------------------------------------------------------------------------------------
# cold and soak end to end (stand-in servers; "GPU memory" follows the KV tokens the fake holds)
# ----------------------------------------------------------------------------------------------------------


def _fake_gpu(monkeypatch, tmp_path) -> Path:
    """nvidia-smi for the stand-in: the memory the fake server writes (1000 MiB + held KV tokens / 100)."""
    path = tmp_path / "fake_gpu_mib"
    monkeypatch.setenv("FAKE_MEMORY_FILE", str(path))
    monkeypatch.setattr(gpu_memory, "read_memory_text", lambda: path.read_text() if path.exists() else "1000\n")
    return path


def _cold(monkeypatch, tmp_path, tiny_model, *extra, weights="real", faults=""):
    _stand_in(monkeypatch, tmp_path, SERVE_SCRIPT)
    _fake_gpu(monkeypatch, tmp_path)
    monkeypatch.setenv("FAKE_PREFILL_S_PER_TOKEN", "1e-4")
    monkeypatch.setenv("FAKE_WEIGHTS", weights)
    monkeypatch.setenv("FAKE_FAULTS", faults)
    out = tmp_path / "cold.json"
    rc = reliability.main(["cold", "--model", str(tiny_model), "--out", str(out), "--clients", "4",
                           "--long-prompts", "8", "--long-range", "2000-3000", "--short-prompts", "8",
                           "--short-range", "64-128", "--continuation-tokens", "8", "--max-new-tokens", "4",
                           "--memory-interval-s", "0.05", "--idle-timeout-s", "20", "--log-dir",
                           str(tmp_path / "logs"), "--startup-timeout-s", "60", *extra])
    data = json.loads(out.read_text())
    return rc, data, {c["name"]: c for c in data["checks"]}


COLD_CHECKS = ["cold-idle", "cold-errors", "cold-prefills", "cold-isolation", "cold-equal-alone", "cold-crash"]


def test_reliability_cold_end_to_end(monkeypatch, tmp_path, tiny_model):
    rc, data, got = _cold(monkeypatch, tmp_path, tiny_model)
    assert list(got) == COLD_CHECKS and rc == 0, {n: c["message"] for n, c in got.items()}
    assert all(c["status"] == "PASS" for c in got.values())
    assert data["compare"]["mode"] == "tokens" and data["radix_cache"] is True  # real weights: output ids decide
    assert got["cold-prefills"]["peak_long_overlap"] >= 2 and got["cold-prefills"]["max_cached_tokens"] == 0
    assert len(data["outcomes"]) == 16 and data["schedule"][0][0] == "long00"
    assert all(2000 <= p["prompt_tokens"] <= 3000 for p in data["probes"] if p["kind"] == "long")
    perf = data["performance"]
    assert perf["long_ttft_s"]["n"] == 8 and perf["short_ttft_s"]["n"] == 8 and perf["prefill_tokens_per_s"] > 0
    idle = got["cold-idle"]
    assert idle["scheduler_idle"] and idle["flush_status"] == 200 and idle["memory_reached"]
    assert data["memory"]["peak_mib"] > data["idle_memory"]["mib"] == 1000  # the load held KV, then let it go
    # Both witnesses agree on a healthy run.
    assert data["comparison"]["logprobs"]["status"] == "PASS" and data["comparison"]["tokens"]["status"] == "PASS"


def test_reliability_cold_dummy_weights_radix_off_is_inconclusive(monkeypatch, tmp_path, tiny_model):
    rc, data, got = _cold(monkeypatch, tmp_path, tiny_model, "--disable-radix-cache", "--dummy", weights="dummy")
    assert data["radix_cache"] is False and data["compare"]["mode"] == "logprobs"
    # A context does not move a dummy model's log-probabilities: equality proves nothing, and says so.
    assert got["cold-isolation"]["status"] == "INCONCLUSIVE" and got["cold-equal-alone"]["status"] == "INCONCLUSIVE"
    assert "cannot tell requests apart" in got["cold-isolation"]["message"]
    assert all(got[n]["status"] == "PASS" for n in ("cold-idle", "cold-errors", "cold-prefills", "cold-crash"))
    assert rc == 0


def test_reliability_cold_catches_crossed_answers_and_leaks(monkeypatch, tmp_path, tiny_model):
    rc, data, got = _cold(monkeypatch, tmp_path, tiny_model, "--compare", "logprobs", "--idle-timeout-s", "2",
                          "--memory-slack-mib", "64",
                          faults="swap,leak_finished")
    assert rc == 1 and got["cold-isolation"]["status"] == "FAIL" and got["cold-equal-alone"]["status"] == "FAIL"
    assert got["cold-isolation"]["counts"]["cross"] > 0 and data["comparison"]["tokens"]["status"] == "FAIL"
    # Finished requests that keep their KV: the scheduler never goes idle and memory never comes back.
    assert got["cold-idle"]["status"] == "FAIL" and not got["cold-idle"]["scheduler_idle"]
    assert got["cold-idle"]["memory_reached"] is False


def _soak_args(tiny_model, tmp_path, out, *extra):
    return ["soak", "--model", str(tiny_model), "--out", str(out), "--clients", "4", "--prompts", "8",
            "--length-range", "500-3000", "--continuation-tokens", "8", "--max-new-tokens", "4",
            "--duration-s", "4", "--max-requests", "2000", "--segment-s", "2", "--memory-interval-s", "0.05",
            "--disable-radix-cache",
            "--idle-timeout-s", "20", "--log-dir", str(tmp_path / "logs"), "--startup-timeout-s", "60", *extra]


def _soak_env(monkeypatch, tmp_path):
    _stand_in(monkeypatch, tmp_path, SERVE_SCRIPT)
    _fake_gpu(monkeypatch, tmp_path)
    monkeypatch.setenv("FAKE_PREFILL_S_PER_TOKEN", "5e-5")
    monkeypatch.setenv("FAKE_WEIGHTS", "real")
    monkeypatch.setenv("FAKE_FAULTS", "")


def test_reliability_soak_runs_in_resumable_segments(monkeypatch, tmp_path, tiny_model):
    _soak_env(monkeypatch, tmp_path)
    out = tmp_path / "soak.json"
    assert reliability.main(_soak_args(tiny_model, tmp_path, out)) == 0
    first = json.loads(out.read_text())
    assert _statuses(out)["soak-progress"] == "INCONCLUSIVE"  # 2 of the 4 s: resume to go on
    assert len(first["segments"]) == 1 and 2.0 <= first["segments"][0]["wall_s"] < 8.0
    assert reliability.main(_soak_args(tiny_model, tmp_path, out, "--resume")) == 0
    data = json.loads(out.read_text())
    got = {c["name"]: c for c in data["checks"]}
    assert [s["index"] for s in data["segments"]] == [0, 1] and data["references"] == first["references"]
    assert got["soak-progress"]["status"] == "PASS", got["soak-progress"]["message"]
    assert all(c["status"] == "PASS" for c in got.values()), {n: c["message"] for n, c in got.items()
                                                              if c["status"] != "PASS"}
    assert got["soak-cross-request"]["mismatches"] == 0 and got["soak-errors"]["errors"] == 0
    total = sum(s["requests"] for s in data["segments"])
    assert got["soak-progress"]["requests"] == total > 8 and data["performance"]["ttft_s"]["all"]["p99"] > 0
    # Each launched segment had its own server: one trend per segment.
    assert [t["series"] for t in got["soak-memory-trend"]["trends"]] == ["segment 0", "segment 1"]
    # Nothing left to send: the checks are recomputed from the file without a server.
    assert reliability.main(_soak_args(tiny_model, tmp_path, out, "--resume")) == 0
    assert len(json.loads(out.read_text())["segments"]) == 2
    with pytest.raises(SystemExit, match="settings differ"):
        reliability.main(_soak_args(tiny_model, tmp_path, out, "--resume", "--prompts", "9", "--duration-s", "9"))


def test_detached_server_serves_several_commands(monkeypatch, tmp_path, tiny_model):
    _soak_env(monkeypatch, tmp_path)
    state = tmp_path / "state" / "srv.json"
    assert server.main(["start", "--state", str(state), "--backend", "minference", "--model", str(tiny_model),
                        "--log-dir", str(tmp_path / "logs"), "--startup-timeout-s", "60"]) == 0
    try:
        srv = server.AttachedServer.from_state(state)
        assert srv.alive() and srv.client().healthy() and server.main(["status", "--state", str(state)]) == 0
        recycled = dataclasses.replace(srv, state={**srv.state, "proc_start_ticks": srv.state["proc_start_ticks"] + 1})
        assert not recycled.alive()  # another process under the same pid is not ours to use or stop
        out = tmp_path / "soak.json"
        for extra in ([], ["--resume"]):
            assert reliability.main(_soak_args(tiny_model, tmp_path, out, "--attach", str(state), *extra)) == 0
        data = json.loads(out.read_text())
        assert all(seg["server"]["attached"] and seg["server"]["pid"] == srv.pid for seg in data["segments"])
        trends = next(c for c in data["checks"] if c["name"] == "soak-memory-trend")["trends"]
        assert [t["series"] for t in trends] == [f"pid {srv.pid} at {srv.base_url}"]  # one series over both
        with pytest.raises(SystemExit, match="backend"):
            reliability.main(_soak_args(tiny_model, tmp_path, tmp_path / "x.json", "--attach", str(state),
                                        "--backend", "fa3"))
    finally:
        assert server.main(["stop", "--state", str(state), "--copy-log-to", str(tmp_path / "kept")]) == 0
    assert not srv.alive() and not server._group_running(srv.pid)
    assert list((tmp_path / "kept").glob("server_minference_*.log"))
    assert server.main(["status", "--state", str(state)]) == 1
    with pytest.raises(server.ServerStartError, match="not running"):
        with server.server_for(reliability.build_parser().parse_args(
                _soak_args(tiny_model, tmp_path, tmp_path / "y.json", "--attach", str(state))), "minference",
                log_path=tmp_path / "unused.log"):
            pass


# ----------------------------------------------------------------------------------------------------------
# Pieces of cold / serving / soak
# ----------------------------------------------------------------------------------------------------------


def test_percentiles_slopes_and_length_ranges():
    from benchmarks.multiturn import argcheck

    assert stats.percentile([3, 1, 2], 50) == 2 and stats.percentile([], 50) is None
    assert stats.percentile(list(range(101)), 99) == 99 and stats.percentile([1, 2], 50) == 1.5
    assert stats.latency_summary([1.0, 3.0])["mean"] == 2.0 and stats.latency_summary([])["p99"] is None
    assert stats.linear_slope([0, 1, 2], [1, 3, 5]) == 2 and stats.linear_slope([1, 1], [0, 5]) is None
    with pytest.raises(ValueError, match="q"):
        stats.percentile([1], 101)
    assert argcheck.parse_range("64K-128K") == (65536, 131072) and argcheck.parse_range("2K") == (2048, 2048)
    assert argcheck.parse_lengths("8k,4096") == [8192, 4096]
    for bad in ("128K-64K", "x-1", ""):
        with pytest.raises(ValueError):
            argcheck.parse_range(bad)


def test_memory_trend_and_waiting_for_memory():
    flat = [(t * 2.0, 1000 + (t % 3)) for t in range(40)]
    leak = [(t * 2.0, 1000 + 10 * t) for t in range(40)]  # 300 MiB/min
    assert stats.memory_trend(flat, slack_mib=64).status == "PASS"
    bad = stats.memory_trend(leak, slack_mib=64)
    assert bad.status == "FAIL" and abs(bad.slope_mib_per_min - 300) < 1e-6 and bad.projected_growth_mib > 64
    # Early growth (pools filling) then flat: only the second half is judged.
    settle = [(t * 2.0, 1000 + min(t, 10) * 50) for t in range(40)]
    assert stats.memory_trend(settle, slack_mib=64).status == "PASS"
    assert stats.memory_trend(flat[:3], slack_mib=64).status == "INCONCLUSIVE"
    readings = iter(["900\n", "700\n", "500\n"])
    reached, seen, _ = gpu_memory.wait_for_memory(lambda: next(readings), gpu=0, limit_mib=600, timeout_s=30,
                                                  interval_s=0.01)
    assert reached and seen == [900, 700, 500]
    reached, seen, waited = gpu_memory.wait_for_memory(lambda: "900\n", gpu=0, limit_mib=600, timeout_s=0.1,
                                                       interval_s=0.01)
    assert not reached and waited >= 0.1
    assert gpu_memory.wait_for_memory(lambda: "oops", gpu=0, limit_mib=1, timeout_s=5)[0] is False


def test_logprob_attribution_and_separation():
    refs = {"a": [None, -1.0, -2.0], "b": [None, -1.5, -2.5], "c": [None, -3.0, -0.5]}
    att = lambda name, values, **kw: checks.attribute_logprobs(name, values, refs, tol=1e-3, **kw)  # noqa: E731
    assert att("a", [None, -1.0, -2.0004]).verdict == "exact"
    assert att("a", [None, -1.2, -2.0]).verdict == "drift"
    crossed = att("a", [None, -1.5, -2.5])
    assert crossed.verdict == "cross" and crossed.other == "b" and crossed.own_distance == pytest.approx(0.5)
    assert att("a", [None, -1.0]).verdict == "drift"  # another length: infinitely far from everything
    assert att("a", [None, float("nan"), -2.0]).verdict == "error"
    assert att("a", [], error=None).verdict == "error" and att("a", None, error="HTTP 500").error == "HTTP 500"
    assert checks.logprob_distance([None, 1.0], [0.5, 1.0]) == float("inf")
    assert checks.separations(refs)["a"] == pytest.approx(0.5)
    good = [att(n, list(v)) for n, v in refs.items()]
    assert checks.logprob_check(good, refs, tol=1e-3).status == "PASS"
    assert checks.logprob_check(good + [crossed], refs, tol=1e-3).status == "FAIL"
    same = {n: [None, -11.76, -11.76] for n in "abc"}  # dummy weights: every context gives the same numbers
    blind = checks.logprob_check([checks.attribute_logprobs(n, v, same, tol=1e-3) for n, v in same.items()], same,
                                 tol=1e-3)
    assert blind.status == "INCONCLUSIVE" and "cannot tell" in blind.message
    with pytest.raises(ValueError, match="tol"):
        checks.attribute_logprobs("a", [None], refs, tol=-1)


def test_probes_are_seeded_and_share_one_continuation():
    from benchmarks.multiturn import cold, probes

    specs = [("long00", "long", 300), ("short00", "short", 20)]
    a = probes.make_probes(specs, vocab_size=32000, seed=3, continuation_tokens=8)
    b = probes.make_probes(list(reversed(specs)), vocab_size=32000, seed=3, continuation_tokens=8)
    assert {p.name: p.prompt for p in a} == {p.name: p.prompt for p in b}  # a prompt depends on its own name only
    assert a[0].continuation == a[1].continuation and len(a[0].continuation) == 8
    assert len(a[0].input_ids) == 308 and a[0].prompt != probes.make_probes(specs, vocab_size=32000, seed=4,
                                                                           continuation_tokens=8)[0].prompt
    with pytest.raises(ValueError, match="distinct"):
        probes.make_probes(specs + specs, vocab_size=32000, seed=0, continuation_tokens=8)
    rng = __import__("random").Random(0)
    lengths = probes.log_uniform_lengths(rng, 2000, 1024, 131072)
    assert min(lengths) >= 1024 and max(lengths) <= 131072
    assert 0.3 < sum(n < 11585 for n in lengths) / len(lengths) < 0.7  # half below the geometric middle
    plan = cold.schedule([f"L{i}" for i in range(16)], [f"S{i}" for i in range(16)], 8)
    assert plan[0] == ["L0", "S0", "L8", "S8"] and all(names[0].startswith("L") for names in plan)
    assert sorted(n for names in plan for n in names) == sorted([f"L{i}" for i in range(16)] +
                                                                 [f"S{i}" for i in range(16)])
    assert cold.peak_overlap([(0, 2), (1, 3), (2, 4), (5, 6)]) == 2 and cold.peak_overlap([]) == 0


def test_client_control_endpoints_and_logprobs():
    from benchmarks.multiturn import probes
    from benchmarks.multiturn.client import new_rid

    with FakeSGLang(token_respond, prefill_s_per_token=2e-3) as fake:
        client = SGLangClient(fake.url, timeout_s=60)
        p = probes.make_probes([("x", "long", 600)], vocab_size=32000, seed=0, continuation_tokens=6)[0]
        o = probes.send(client, p, max_new_tokens=3)
        req = fake.requests[-1]
        assert req["return_logprob"] is True and req["logprob_start_len"] == 600 and len(req["rid"]) == 32
        assert o.ok and len(o.logprobs) == 6 and o.logprobs == context_logprobs(p.input_ids, 600)
        assert o.output_ids == token_respond(p.input_ids, 3)[1] and o.ttft_s > 1.0
        # /flush_cache refuses while a request runs, waits with ?timeout=, and /v1/loads shows the request.
        rid = new_rid()
        t = threading.Thread(target=lambda: client.generate(list(range(100, 1600)), max_new_tokens=2, rid=rid))
        t.start()
        deadline = time.monotonic() + 30
        while not client.loads()[0]["num_running_reqs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        load = client.loads()[0]
        assert load["num_running_reqs"] == 1 and load["num_used_tokens"] == 1500
        assert client.flush_cache_once()[0] == 400
        assert client.flush_cache_once(wait_idle_s=60) == (200, client.flush_cache_once()[1])
        t.join()
        idle, _, loads = client.wait_idle(timeout_s=10)
        assert idle and loads[0]["num_used_tokens"] == 0
        # /abort_request by rid: the streamed request ends with an abort before its first token.
        box = {}
        rid = new_rid()
        t = threading.Thread(target=lambda: box.update(r=client.generate(list(range(100, 2600)), max_new_tokens=2,
                                                                         rid=rid)))
        t.start()
        time.sleep(0.5)
        assert client.abort_request(rid[:8]) == (200, "")  # SGLang matches rids by prefix
        t.join()
        assert "abort" in box["r"].error.lower() and box["r"].completion_tokens == 0
        assert client.abort_request("")[0] == 200 and client.post("/abort_request", b"{")[0] == 400
        # Log-probabilities that do not cover this probe's continuation are an error, not a result.
        fake.logprobs = lambda ids, start: [-1.0, -1.0]
        q = probes.make_probes([("y", "short", 50)], vocab_size=32000, seed=0, continuation_tokens=4)[0]
        bad = probes.send(client, q, max_new_tokens=1)
        assert not bad.ok and "not this request's 4-token continuation" in bad.error


def test_checks_are_saved_as_they_are_made(tmp_path):
    from benchmarks.multiturn.checklist import Checks

    saved = []
    c = Checks(on_add=lambda: saved.append(len(c.items)))
    c.add("a", "PASS", "fine")
    c.add("b", "INCONCLUSIVE", "unsure")
    assert saved == [1, 2] and not c.failed
    c.add("c", "FAIL", "broken", detail=1)
    assert c.failed and c.items[-1]["detail"] == 1
    with pytest.raises(ValueError, match="status"):
        c.add("d", "OK", "not a status")


def test_http_side_imports_no_torch():
    # The client and the harness drive servers from a process that must not need (or pay for) torch: no module
    # here imports torch, directly or through what it imports (the package's torch-free checks, GPU-memory
    # poller and prompt pieces are fine).
    modules = sorted(p.stem for p in (TESTS_DIR.parent / "benchmarks" / "multiturn").glob("*.py")
                     if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import benchmarks.multiturn.{m}\n" for m in modules) +
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers'))\n"
            "print(heavy)\nsys.exit(1 if heavy else 0)\n")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compare_puts_cold_results_side_by_side(tmp_path, capsys):
    def result(backend, peak, p50, statuses):
        return {"kind": "reliability-cold", "args": {"backend": backend}, "memory": {"peak_mib": peak},
                "performance": {"wall_s": 10.0, "long_ttft_s": {"n": 16, "p50": p50, "p99": 2 * p50},
                                "prefill_tokens_per_s": 1e6 / p50},
                "checks": [{"name": n, "status": st, "message": ""} for n, st in statuses.items()]}

    sparse, dense, out = tmp_path / "s.json", tmp_path / "d.json", tmp_path / "c.json"
    dense.write_text(json.dumps(result("fa3", 70000, 3.0, {"cold-errors": "PASS", "cold-equal-alone": "FAIL"})))
    sparse.write_text(json.dumps(result("minference", 70100, 1.5, {"cold-errors": "PASS", "cold-equal-alone": "FAIL"})))
    assert reliability.main(["compare", "--sparse", str(sparse), "--dense", str(dense), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["performance"]["long_ttft_s p50"] == {"sparse": 1.5, "dense": 3.0}
    assert data["statuses"]["cold-equal-alone"] == {"sparse": "FAIL", "dense": "FAIL"}
    assert {c["name"]: c["status"] for c in data["checks"]} == {"memory-vs-dense": "PASS", "checks-vs-dense": "PASS"}
    assert "failing with both: ['cold-equal-alone']" in data["checks"][1]["message"]
    assert "long_ttft_s p50" in capsys.readouterr().out
    sparse.write_text(json.dumps(result("minference", 70100, 1.5, {"cold-errors": "FAIL", "cold-equal-alone": "FAIL"})))
    assert reliability.main(["compare", "--sparse", str(sparse), "--dense", str(dense), "--out", str(out)]) == 1
    message = json.loads(out.read_text())["checks"][1]["message"]
    assert "failing only with the sparse backend: ['cold-errors']" in message
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"kind": "reliability-load", "memory": {"peak_mib": 1}}))
    with pytest.raises(SystemExit, match="reliability-load"):
        reliability.main(["compare", "--sparse", str(load), "--dense", str(dense), "--out", str(out)])


def test_back_to_idle_without_a_gpu_is_inconclusive(monkeypatch):
    from benchmarks.multiturn import harness
    from benchmarks.multiturn.checklist import Checks

    def no_gpu():
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpu_memory, "read_memory_text", no_gpu)
    mib, readings, error = harness.idle_memory(gpu=0, samples=2, interval_s=0.01)
    assert mib is None and readings == [] and "nvidia-smi" in error
    with FakeSGLang(token_respond) as fake:
        c = Checks()
        result = harness.back_to_idle(c, "x-idle", SGLangClient(fake.url), gpu=0, idle_mib=None, slack_mib=64,
                                      timeout_s=10)
    assert c.items[0]["status"] == "INCONCLUSIVE" and result["scheduler_idle"] and result["flush_status"] == 200
