"""A small blocking HTTP client for SGLang's native API (standard library only, one connection per call).

``POST /generate`` with ``input_ids`` and greedy sampling; with ``"stream": true`` SGLang answers
``text/event-stream`` lines ``data: {json}`` (one per emitted token step) and ``data: [DONE]``. Each JSON chunk
holds ``output_ids`` (the whole output so far; only the new ids with ``--incremental-streaming-output``),
``text`` (absent under ``--skip-tokenizer-init``) and ``meta_info`` (``prompt_tokens``, ``cached_tokens``,
``completion_tokens``, ``finish_reason``, ...). The time to the first chunk is the time to first token.
Errors: a non-200 status with ``{"error": {"message"}}`` (or ``{"message"}``); inside a stream, a chunk with an
``error`` object or a ``finish_reason`` of type ``abort``. SGLang raises its request checks (empty ``input_ids``,
a prompt over the context length, a negative ``max_new_tokens``) inside the response generator, so a streamed
request gets them as HTTP 200 with one ``error`` chunk and a plain one as HTTP 400; a body FastAPI cannot parse
(malformed JSON, wrong field types) gets 400 ``{"object": "error", "message", "type", "code"}``.

With ``return_logprob`` and ``logprob_start_len = L``, ``meta_info.input_token_logprobs`` lists
``[logprob, token_id, text]`` for the prompt positions from ``L`` on: the log-probability the model gave each
of those input tokens after the tokens before it (None where it has none). SGLang recomputes those positions,
so at most ``L`` prompt tokens come from the radix cache.

Control endpoints: ``POST /flush_cache[?timeout=S]`` (200 once the cache is emptied; 400 while requests run,
or, with a timeout, after waiting that long for the server to go idle); ``POST /abort_request`` with
``{"rid": ..., "abort_all": false}`` (200; the scheduler aborts every request whose rid *starts with* the given
one, so rids here are fixed-length hex); ``GET /v1/loads?include=core`` (per scheduler: running and waiting
requests, ``num_used_tokens`` = KV slots held by live requests, radix-cache entries not counted).

Only loopback servers are accepted: the benchmarks and load checks must never leave the machine.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

from sgl_minference.checks import check

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True)
class Reply:
    """The outcome of one ``/generate`` call."""

    status: int  # HTTP status; 0 when the connection failed
    error: str | None = None  # server or transport error; None on success
    text: str | None = None  # generated text (None under --skip-tokenizer-init)
    output_ids: list[int] = field(default_factory=list)  # generated token ids
    meta_info: dict = field(default_factory=dict)  # the last chunk's meta_info
    ttft_s: float | None = None  # send -> first streamed chunk (None for a non-streamed call)
    latency_s: float = 0.0  # send -> response complete
    chunks: int = 0  # streamed chunks received

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def cached_tokens(self) -> int | None:
        return self.meta_info.get("cached_tokens")

    @property
    def prompt_tokens(self) -> int | None:
        return self.meta_info.get("prompt_tokens")

    @property
    def completion_tokens(self) -> int | None:
        return self.meta_info.get("completion_tokens")

    @property
    def input_logprobs(self) -> list[tuple[float | None, int]]:
        """``(logprob, token id)`` of the prompt positions from ``logprob_start_len`` on ([] when not asked)."""
        return [(entry[0], int(entry[1])) for entry in self.meta_info.get("input_token_logprobs") or []]


def error_text(body: bytes) -> str:
    """The message of an SGLang error body, or the raw body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:2000]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
    return json.dumps(data)[:2000]


def new_rid() -> str:
    """A request id no other one starts with (SGLang aborts by rid prefix)."""
    return uuid.uuid4().hex


def _abort_message(meta_info: dict) -> str | None:
    reason = meta_info.get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        return str(reason.get("message") or "aborted")
    return None


class SGLangClient:
    """Calls to one SGLang server at ``base_url`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, base_url: str, *, timeout_s: float = 600.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        check(parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS and parts.port is not None, "base_url",
              f"{base_url!r} is not http://<loopback host>:<port>")
        self.base_url = base_url
        self._host, self._port = parts.hostname, parts.port
        self.timeout_s = timeout_s

    def _connect(self, timeout_s: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout_s or self.timeout_s)

    def get(self, path: str, *, timeout_s: float | None = None) -> tuple[int, bytes]:
        """``GET path``: (status, body); status 0 when the server cannot be reached."""
        conn = self._connect(timeout_s)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            return 0, b""
        finally:
            conn.close()

    def post(self, path: str, body: bytes | None = None, *, content_type: str | None = "application/json",
             timeout_s: float | None = None) -> tuple[int, bytes]:
        """``POST path`` with a raw ``body``: (status, response body); status 0 when the server cannot be reached
        or hung up without answering."""
        conn = self._connect(timeout_s)
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            return 0, b""
        finally:
            conn.close()

    def healthy(self, *, timeout_s: float = 30.0) -> bool:
        """``GET /health_generate``: the server ran (or is running) a one-token generation."""
        return self.get("/health_generate", timeout_s=timeout_s)[0] == 200

    def server_info(self) -> dict:
        """``GET /server_info``: the resolved server arguments plus the scheduler's limits
        (``max_total_num_tokens``, ``max_req_input_len``)."""
        status, body = self.get("/server_info")
        if status != 200:
            raise RuntimeError(f"/server_info answered {status}: {error_text(body)}")
        return json.loads(body)

    def flush_cache_once(self, *, wait_idle_s: float | None = None) -> tuple[int, str]:
        """One ``POST /flush_cache``: (status, SGLang's message). With ``wait_idle_s`` the server waits up to that
        long for its running requests to finish before flushing (``?timeout=``); without, it refuses (400) while
        any request runs."""
        path = "/flush_cache" if wait_idle_s is None else f"/flush_cache?timeout={wait_idle_s:g}"
        status, body = self.post(path, content_type=None, timeout_s=(wait_idle_s or 0) + 60)
        return status, body.decode(errors="replace").strip()

    def abort_request(self, rid: str = "", *, abort_all: bool = False) -> tuple[int, str]:
        """``POST /abort_request``: (status, body text). SGLang answers 200 at once and aborts in the background;
        an empty ``rid`` without ``abort_all`` is ignored."""
        status, body = self.post("/abort_request", json.dumps({"rid": rid, "abort_all": abort_all}).encode())
        return status, body.decode(errors="replace").strip()

    def loads(self) -> list[dict]:
        """``GET /v1/loads?include=core``: one dict per scheduler (``num_running_reqs``, ``num_waiting_reqs``,
        ``num_used_tokens``, ``max_total_num_tokens``, ...)."""
        status, body = self.get("/v1/loads?include=core")
        if status != 200:
            raise RuntimeError(f"/v1/loads answered {status}: {error_text(body)}")
        return list(json.loads(body)["loads"])

    def wait_idle(self, *, timeout_s: float, interval_s: float = 0.25) -> tuple[bool, float, list[dict]]:
        """Poll ``/v1/loads`` until no request runs or waits and no KV slot is held by one (the scheduler
        publishes its load when it goes idle). Returns (idle, seconds waited, the last loads)."""
        t0 = time.monotonic()
        last: list[dict] = []
        while True:
            try:
                last = self.loads()
            except (RuntimeError, ValueError, KeyError):
                last = []
            idle = bool(last) and all(d.get("num_running_reqs", 0) == 0 and d.get("num_waiting_reqs", 0) == 0
                                      and d.get("num_used_tokens", 0) == 0 for d in last)
            waited = time.monotonic() - t0
            if idle or waited >= timeout_s:
                return idle, waited, last
            time.sleep(interval_s)

    def flush_cache(self, timeout_s: float = 60.0) -> bool:
        """``POST /flush_cache``: empties the radix cache. SGLang refuses while requests still run (one that just
        answered may not have left the scheduler yet), so a refusal is retried every 0.5 s up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            conn = self._connect(60)
            try:
                conn.request("POST", "/flush_cache")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    return True
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    @staticmethod
    def payload(
        input_ids: list[int], *, max_new_tokens: int, stop: list[str] | None = None, ignore_eos: bool = False,
        stream: bool = True, rid: str | None = None, logprob_start_len: int | None = None,
    ) -> dict:
        """The ``/generate`` body of a greedy request; ``logprob_start_len`` asks for the input log-probabilities
        from that prompt position on."""
        sampling = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}
        if stop:
            sampling["stop"] = list(stop)
        body = {"input_ids": list(input_ids), "sampling_params": sampling, "stream": stream}
        if rid is not None:
            body["rid"] = rid
        if logprob_start_len is not None:
            body.update(return_logprob=True, logprob_start_len=logprob_start_len)
        return body

    def generate(self, input_ids: list[int], *, max_new_tokens: int, stop: list[str] | None = None,
                 ignore_eos: bool = False, stream: bool = True, rid: str | None = None,
                 logprob_start_len: int | None = None) -> Reply:
        """One greedy ``/generate`` call; never raises for server or transport errors (see ``Reply.error``)."""
        body = json.dumps(self.payload(input_ids, max_new_tokens=max_new_tokens, stop=stop, ignore_eos=ignore_eos,
                                       stream=stream, rid=rid, logprob_start_len=logprob_start_len)).encode()
        conn = self._connect()
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                reply = Reply(status=resp.status, error=error_text(resp.read()))
            elif stream:
                reply = self._read_stream(resp, t0)
            else:
                data = json.loads(resp.read())
                meta = data.get("meta_info", {})
                reply = Reply(status=200, error=_abort_message(meta), text=data.get("text"),
                              output_ids=list(data.get("output_ids") or []), meta_info=meta)
        except (OSError, http.client.HTTPException, ValueError) as e:
            reply = Reply(status=0, error=f"{type(e).__name__}: {e}")
        finally:
            conn.close()
        reply.latency_s = time.perf_counter() - t0
        return reply

    @staticmethod
    def _read_stream(resp: http.client.HTTPResponse, t0: float) -> Reply:
        reply = Reply(status=resp.status)
        ids: list[int] = []
        text = ""
        for raw in iter(resp.readline, b""):
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[len(b"data:"):].strip()
            if data == b"[DONE]":
                resp.read()  # the end of the chunked body: the connection then closes cleanly
                break
            chunk = json.loads(data)
            if reply.ttft_s is None:
                reply.ttft_s = time.perf_counter() - t0
            reply.chunks += 1
            if "error" in chunk:
                err = chunk["error"]
                reply.error = str(err.get("message", err)) if isinstance(err, dict) else str(err)
                continue
            meta = chunk.get("meta_info", {})
            reply.meta_info = meta
            reply.error = reply.error or _abort_message(meta)
            new_ids = list(chunk.get("output_ids") or [])
            # Cumulative chunks (SGLang's default) carry all completion_tokens ids; incremental ones only the new.
            cumulative = len(new_ids) == meta.get("completion_tokens", -1)
            ids = new_ids if cumulative else ids + new_ids
            if chunk.get("text") is not None:
                text = chunk["text"] if cumulative else text + chunk["text"]
                reply.text = text
        reply.output_ids = ids
        return reply

    def abandon_generate(self, input_ids: list[int], *, after_s: float, max_new_tokens: int = 8,
                         ignore_eos: bool = False, rid: str | None = None) -> dict:
        """Send a streamed request and hang up after ``after_s`` seconds (a client leaving mid-prefill).

        Returns ``{"first_chunk_before_close": bool, "closed_after_s": float}``: False means no token had
        arrived, i.e. the server was still prefilling (or queueing) when the connection closed.
        """
        body = json.dumps(self.payload(input_ids, max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                                       rid=rid)).encode()
        conn = self._connect()
        t0 = time.perf_counter()
        got_chunk = False
        try:
            conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
            sock = conn.sock
            sock.settimeout(max(after_s, 1e-3))
            try:
                resp = conn.getresponse()
                while not got_chunk:
                    sock.settimeout(max(after_s - (time.perf_counter() - t0), 1e-3))
                    line = resp.readline()
                    if not line:
                        break
                    got_chunk = line.startswith(b"data:")
            except (socket.timeout, TimeoutError):
                pass
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            conn.close()
        return {"first_chunk_before_close": got_chunk, "closed_after_s": time.perf_counter() - t0}
