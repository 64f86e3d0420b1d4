"""Start ``python -m sglang.launch_server`` on 127.0.0.1 for the length of a ``with`` block, and always stop it.

The server runs in its own process group (its scheduler and detokenizer processes join it), logs to a file,
and is stopped by signalling that group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from benchmarks.multiturn.client import SGLangClient

CONFIG_ENV_VAR = "SGL_MINFERENCE_CONFIG"  # sgl_minference.config.ENV_VAR; not imported: the client needs no torch


@dataclass(kw_only=True)
class ServerSpec:
    """How to start one SGLang server (radix cache on: it is SGLang's default and never turned off here)."""

    model_path: str
    attention_backend: str  # "minference", "flashinfer", ...
    dummy_weights: bool = False  # --load-format dummy --skip-tokenizer-init: random weights, no tokenizer
    chunked_prefill_size: int | None = None
    mem_fraction_static: float | None = None
    context_length: int | None = None  # --context-length (beyond the model's own needs the env switch below)
    model_overrides: dict = field(default_factory=dict)  # --json-model-override-args
    disable_cuda_graph: bool = False
    extra_args: list[str] = field(default_factory=list)  # appended verbatim
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", "127.0.0.1", "--port", str(port), "--attention-backend", self.attention_backend]
        if self.dummy_weights:
            cmd += ["--load-format", "dummy", "--skip-tokenizer-init"]
        if self.chunked_prefill_size is not None:
            cmd += ["--chunked-prefill-size", str(self.chunked_prefill_size)]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.context_length is not None:
            cmd += ["--context-length", str(self.context_length)]
        if self.model_overrides:
            cmd += ["--json-model-override-args", json.dumps(self.model_overrides)]
        if self.disable_cuda_graph:
            cmd += ["--disable-cuda-graph"]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.context_length is not None:
            # SGLang refuses a --context-length above the model config's unless told to allow it.
            env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
        env.update(self.env)
        return env


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy; ``log_tail`` holds the end of its output."""

    def __init__(self, msg: str, *, exit_code: int | None, log_tail: str) -> None:
        super().__init__(f"{msg}\n--- server log (tail) ---\n{log_tail}")
        self.exit_code = exit_code
        self.log_tail = log_tail


@dataclass(kw_only=True)
class RunningServer:
    base_url: str
    command: list[str]
    log_path: Path
    startup_s: float
    process: subprocess.Popen

    def client(self, *, timeout_s: float = 600.0) -> SGLangClient:
        return SGLangClient(self.base_url, timeout_s=timeout_s)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, max_lines: int = 60) -> str:
        return log_tail(self.log_path, max_lines)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, max_lines: int = 60) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-max_lines:])


def _group_running(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies are skipped: they hold no memory)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int | None:
    """Stop the process group led by ``proc`` (the server we started) and wait until none of it runs;
    returns the server's exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    # Leftover children (a scheduler stuck in CUDA) would keep GPU memory from the next server.
    deadline = time.monotonic() + grace_s
    while _group_running(proc.pid) and time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return None


def _start(spec: ServerSpec, log_path: Path) -> tuple[subprocess.Popen, list[str], str]:
    port = free_port()
    cmd = spec.command(port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=spec.environment(), start_new_session=True)
    return proc, cmd, f"http://127.0.0.1:{port}"


def _wait_healthy(proc: subprocess.Popen, base_url: str, deadline: float) -> bool:
    """True once ``/health_generate`` answers 200; False if the process exits or the deadline passes."""
    client = SGLangClient(base_url, timeout_s=30)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if client.healthy(timeout_s=min(30.0, max(deadline - time.monotonic(), 1.0))):
            return True
        time.sleep(1.0)
    return False


@contextmanager
def launched_server(spec: ServerSpec, *, log_path: Path, startup_timeout_s: float = 600.0) -> Iterator[RunningServer]:
    """Start the server, wait until it generates, yield it, and stop it whatever happens."""
    t0 = time.monotonic()
    proc, cmd, url = _start(spec, log_path)
    try:
        if not _wait_healthy(proc, url, t0 + startup_timeout_s):
            code = proc.poll()
            # On a fresh machine FlashInfer compiles its kernels on first use, inside SGLang's own warm-up request
            # (measured on an H100, 2026-11-24: no answer after 90 s); /health_generate says 503 until it is done.
            why = (f"exited with code {code}" if code is not None else
                   f"not healthy after {startup_timeout_s:.0f} s (a first start on a fresh machine may still be "
                   f"compiling FlashInfer kernels in its warm-up request: allow several minutes)")
            raise ServerStartError(f"server {why}: {' '.join(cmd)}", exit_code=code, log_tail=log_tail(log_path))
        yield RunningServer(base_url=url, command=cmd, log_path=log_path, startup_s=time.monotonic() - t0, process=proc)
    finally:
        _stop(proc)


@dataclass(kw_only=True)
class StartupOutcome:
    """What became of a server start that is expected to fail."""

    command: list[str]
    became_healthy: bool  # it served a generation (a bad config was accepted)
    exit_code: int | None  # None: still running at the deadline (then stopped)
    elapsed_s: float
    log_path: Path


def attempt_startup(spec: ServerSpec, *, log_path: Path, timeout_s: float) -> StartupOutcome:
    """Start the server and wait until it exits, becomes healthy or ``timeout_s`` passes; then stop it."""
    t0 = time.monotonic()
    proc, cmd, url = _start(spec, log_path)
    try:
        healthy = _wait_healthy(proc, url, t0 + timeout_s)
        code = proc.poll()
    finally:
        _stop(proc)
    return StartupOutcome(command=cmd, became_healthy=healthy, exit_code=code, elapsed_s=time.monotonic() - t0,
                          log_path=log_path)


# ----------------------------------------------------------------------------------------------------------
# Command-line options shared by run.py and reliability.py
# ----------------------------------------------------------------------------------------------------------


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--model", help="model folder (dummy: launch/models/llama3.2-1b; real: a gguf_loader output)")
    g.add_argument("--dummy", action="store_true", help="--load-format dummy --skip-tokenizer-init (token-id mode)")
    g.add_argument("--minference-config", help="config file for the minference backend (passed as config_path)")
    g.add_argument("--config-via", choices=("override", "env"), default="override",
                   help=f"pass --minference-config through --json-model-override-args or ${CONFIG_ENV_VAR}")
    g.add_argument("--json-model-override-args", default=None,
                   help="extra JSON merged into --json-model-override-args")
    g.add_argument("--chunked-prefill-size", type=int)
    g.add_argument("--mem-fraction-static", type=float)
    g.add_argument("--context-length", type=int, help="--context-length (sets SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN)")
    g.add_argument("--disable-cuda-graph", action="store_true")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra launch_server argument, repeatable (e.g. --server-arg=--log-level=warning)")
    g.add_argument("--startup-timeout-s", type=float, default=300.0)
    g.add_argument("--log-dir", default="benchmarks/results/logs", help="server logs go here")


def spec_from_args(args: argparse.Namespace, backend: str, *, config_path: str | None = None) -> ServerSpec:
    """The :class:`ServerSpec` the shared options describe, for ``backend``; ``config_path`` replaces
    ``--minference-config`` (the fault checks pass broken files this way)."""
    if not args.model:
        raise ValueError("--model: needed to launch a server")
    overrides = json.loads(args.json_model_override_args) if args.json_model_override_args else {}
    if not isinstance(overrides, dict):
        raise ValueError("--json-model-override-args: expected a JSON object")
    env = {}
    path = config_path or args.minference_config
    if path:
        if args.config_via == "env":
            env[CONFIG_ENV_VAR] = str(Path(path).resolve())
        else:
            overrides = {**overrides, "minference": {**overrides.get("minference", {}),
                                                     "config_path": str(Path(path).resolve())}}
    return ServerSpec(model_path=args.model, attention_backend=backend, dummy_weights=args.dummy,
                      chunked_prefill_size=args.chunked_prefill_size, mem_fraction_static=args.mem_fraction_static,
                      context_length=args.context_length, model_overrides=overrides,
                      disable_cuda_graph=args.disable_cuda_graph, extra_args=list(args.server_arg), env=env)


def model_config(model_path: str) -> dict:
    """The model folder's ``config.json`` (text part of a multimodal config), or {} when there is none."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg
