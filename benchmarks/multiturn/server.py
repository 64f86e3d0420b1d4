"""Start ``python -m sglang.launch_server`` on 127.0.0.1 for the length of a ``with`` block, and always stop it;
or start one that outlives the command (``python -m benchmarks.multiturn.server start``) for later commands to
attach to (``--attach STATE``), and stop it with ``... server stop``.

The server runs in its own session and process group (its scheduler and detokenizer processes join it), logs to
a file, and is stopped by signalling that group: SIGTERM, then SIGKILL after a grace period. A detached server
is what lets one server serve several 10-minute device calls (a machine kills what a command leaves running,
except processes in a session of their own): its first start pays the FlashInfer compile once.

``python -m benchmarks.multiturn.server start --state S [server options]``: start, wait until healthy, write
the state file S (URL, pid, command, log) and exit, leaving the server running. ``stop --state S
[--copy-log-to DIR]``: stop it (only if the pid is still that process). ``status --state S``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from benchmarks.multiturn.client import SGLangClient

CONFIG_ENV_VAR = "SGL_MINFERENCE_CONFIG"  # sgl_minference.config.ENV_VAR; not imported: the client needs no torch


@dataclass(kw_only=True)
class ServerSpec:
    """How to start one SGLang server."""

    model_path: str
    attention_backend: str  # "minference", "flashinfer", ...
    dummy_weights: bool = False  # --load-format dummy --skip-tokenizer-init: random weights, no tokenizer
    chunked_prefill_size: int | None = None
    mem_fraction_static: float | None = None
    context_length: int | None = None  # --context-length (beyond the model's own needs the env switch below)
    model_overrides: dict = field(default_factory=dict)  # --json-model-override-args
    disable_cuda_graph: bool = False
    disable_radix_cache: bool = False  # every request a full prefill (SGLang's default keeps the cache on)
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
        if self.disable_radix_cache:
            cmd += ["--disable-radix-cache"]
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


class ServerHandle(Protocol):
    """What the checks need of a server, whether this command launched it or attached to a detached one."""

    base_url: str
    command: list[str]
    log_path: Path
    startup_s: float

    def client(self, *, timeout_s: float = 600.0) -> SGLangClient: ...

    def alive(self) -> bool: ...

    def describe(self) -> dict: ...


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

    def describe(self) -> dict:
        return {"command": self.command, "startup_s": self.startup_s, "log": str(self.log_path), "attached": False}


@dataclass(kw_only=True)
class AttachedServer:
    """A server started by ``server start`` in an earlier command (see the module docstring)."""

    base_url: str
    command: list[str]
    log_path: Path
    startup_s: float
    pid: int
    backend: str
    state: dict

    @classmethod
    def from_state(cls, path: str | os.PathLike) -> AttachedServer:
        state = json.loads(Path(path).read_text())
        return cls(base_url=state["url"], command=list(state["command"]), log_path=Path(state["log"]),
                   startup_s=float(state["startup_s"]), pid=int(state["pid"]), backend=state["backend"],
                   state=state)

    def client(self, *, timeout_s: float = 600.0) -> SGLangClient:
        return SGLangClient(self.base_url, timeout_s=timeout_s)

    def alive(self) -> bool:
        return _is_the_process(self.pid, self.state.get("proc_start_ticks"))

    def describe(self) -> dict:
        return {**self.state, "attached": True}


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


def log_size(path: Path) -> int:
    """Bytes in the server log now (0 if there is none): later scans start here."""
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


# What SGLang logs when something went wrong inside a running server: a Python traceback (a request's or the
# scheduler's), and its idle-time KV pool self-check (``invariant_checker``: "... memory leak detected!",
# "KV double free", "KV page use-after-free").
LOG_PROBLEMS = {"tracebacks": re.compile(r"Traceback \(most recent call last\)"),
                "kv_leaks": re.compile(r"memory leak detected|double free|use-after-free", re.IGNORECASE)}


def log_problems(path: Path, since: int = 0) -> dict[str, int]:
    """How often each of :data:`LOG_PROBLEMS` appears in the server log after byte ``since``."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        text = ""
    return {name: len(rx.findall(text)) for name, rx in LOG_PROBLEMS.items()}


def _proc_state(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks after boot) of a process; None if it does not
    exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[2]), int(fields[19])


def _is_the_process(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is alive (not a zombie) and is the process that started at ``started`` (a recycled pid
    starts later). The start time is compared rather than the command line, which SGLang may retitle."""
    st = _proc_state(pid)
    return st is not None and st[0] not in ("Z", "X") and (started is None or st[2] == started)


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


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGKILL what is left of process group ``pgid`` until none of it runs (or ``grace_s`` passes)."""
    # Leftover children (a scheduler stuck in CUDA) would keep GPU memory from the next server.
    deadline = time.monotonic() + grace_s
    while _group_running(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int | None:
    """Stop the process group led by ``proc`` (the server we started) and wait until none of it runs;
    returns the server's exit code."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    _kill_group(proc.pid, grace_s)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        return None


def _stop_detached(server: AttachedServer, grace_s: float = 30.0) -> bool:
    """Stop a detached server's process group (it leads it: started in a session of its own), after checking
    that its pid is still the process that was started. False when it was not running."""
    if not server.alive():
        # The leader is gone, but children left in its group (a scheduler stuck in CUDA) would hold GPU memory;
        # Linux never hands out a pid that is still some group's id, so the group can only be the server's.
        _kill_group(server.pid, grace_s)
        return False
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while server.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill_group(server.pid, grace_s)
    return True


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


def _started(spec: ServerSpec, log_path: Path, startup_timeout_s: float) -> RunningServer:
    """Start the server and wait until it generates; on failure stop it and raise :class:`ServerStartError`."""
    t0 = time.monotonic()
    proc, cmd, url = _start(spec, log_path)
    try:
        healthy = _wait_healthy(proc, url, t0 + startup_timeout_s)
    except BaseException:
        _stop(proc)
        raise
    if not healthy:
        code = proc.poll()
        _stop(proc)
        # On a fresh machine FlashInfer compiles its kernels on first use, inside SGLang's own warm-up request
        # (measured on an H100, 2026-11-24: no answer after 90 s); /health_generate says 503 until it is done.
        why = (f"exited with code {code}" if code is not None else
               f"not healthy after {startup_timeout_s:.0f} s (a first start on a fresh machine may still be "
               f"compiling FlashInfer kernels in its warm-up request: allow several minutes; what it compiled is "
               f"cached on disk, so a second start gets further)")
        raise ServerStartError(f"server {why}: {' '.join(cmd)}", exit_code=code, log_tail=log_tail(log_path))
    return RunningServer(base_url=url, command=cmd, log_path=log_path, startup_s=time.monotonic() - t0, process=proc)


@contextmanager
def launched_server(spec: ServerSpec, *, log_path: Path, startup_timeout_s: float = 600.0) -> Iterator[RunningServer]:
    """Start the server, wait until it generates, yield it, and stop it whatever happens."""
    srv = _started(spec, log_path, startup_timeout_s)
    try:
        yield srv
    finally:
        _stop(srv.process)


@contextmanager
def server_for(args: argparse.Namespace, backend: str, *, log_path: Path) -> Iterator[ServerHandle]:
    """The server the shared options describe: the detached one of ``--attach STATE`` (left running), or one
    launched for the block. Raises :class:`ServerStartError` when it cannot serve."""
    if getattr(args, "attach", None):
        srv = AttachedServer.from_state(args.attach)
        if srv.backend != backend:
            raise SystemExit(f"--attach: {args.attach} runs backend {srv.backend!r}, not {backend!r}")
        if not (srv.alive() and srv.client().healthy(timeout_s=60)):
            raise ServerStartError(f"attached server {srv.base_url} (pid {srv.pid}) is not running or not healthy",
                                   exit_code=None, log_tail=log_tail(srv.log_path))
        yield srv
        return
    with launched_server(spec_from_args(args, backend), log_path=log_path,
                         startup_timeout_s=args.startup_timeout_s) as srv:
        yield srv


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
    g.add_argument("--disable-radix-cache", action="store_true", help="every request a full prefill")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra launch_server argument, repeatable (e.g. --server-arg=--log-level=warning)")
    # A first start on a fresh machine compiles FlashInfer's kernels before /health_generate answers (H100,
    # 2026-11-24: not healthy within 280 s); the default leaves a minute of a 10-minute device call.
    g.add_argument("--startup-timeout-s", type=float, default=540.0,
                   help="bound on a server start, first-start kernel compile included")
    g.add_argument("--attach", metavar="STATE",
                   help="use the detached server of this state file (python -m benchmarks.multiturn.server start) "
                        "instead of launching one; its flags were given to `start`")
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
                      disable_cuda_graph=args.disable_cuda_graph, disable_radix_cache=args.disable_radix_cache,
                      extra_args=list(args.server_arg), env=env)


def model_config(model_path: str) -> dict:
    """The model folder's ``config.json`` (text part of a multimodal config), or {} when there is none."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg


# ----------------------------------------------------------------------------------------------------------
# Detached servers: start / stop / status
# ----------------------------------------------------------------------------------------------------------


def start_detached(spec: ServerSpec, *, backend: str, state_path: Path, log_path: Path,
                   startup_timeout_s: float) -> AttachedServer:
    """Start a server that outlives this process (it already runs in a session of its own), wait until it is
    healthy, and write its state file; raises :class:`ServerStartError` (and stops it) when it does not serve."""
    srv = _started(spec, log_path, startup_timeout_s)
    st = _proc_state(srv.process.pid)
    state = {"url": srv.base_url, "pid": srv.process.pid, "proc_start_ticks": st[2] if st else None,
             "command": srv.command, "log": str(log_path),
             "startup_s": srv.startup_s, "backend": backend, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "disable_radix_cache": spec.disable_radix_cache}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=1) + "\n")
    return AttachedServer.from_state(state_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.multiturn.server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a detached server and write its state file")
    start.add_argument("--state", required=True, help="state file to write (keep it outside $OUT)")
    start.add_argument("--backend", default="minference")
    add_server_arguments(start)
    stop = sub.add_parser("stop", help="stop the detached server of a state file")
    stop.add_argument("--state", required=True)
    stop.add_argument("--copy-log-to", help="copy the server log into this folder first")
    status = sub.add_parser("status", help="is the detached server of a state file running and healthy")
    status.add_argument("--state", required=True)
    args = p.parse_args(argv)

    if args.command == "start":
        if args.attach:
            raise SystemExit("--attach: not for start")
        log = Path(args.log_dir) / f"server_{args.backend}_{time.strftime('%Y%m%d_%H%M%S')}.log"
        try:
            srv = start_detached(spec_from_args(args, args.backend), backend=args.backend, state_path=Path(args.state),
                                 log_path=log, startup_timeout_s=args.startup_timeout_s)
        except ServerStartError as e:
            print(f"FAIL server start: {e}", flush=True)
            return 1
        print(f"server {args.backend} up in {srv.startup_s:.0f} s at {srv.base_url} (pid {srv.pid}, log {log}); "
              f"state {args.state}", flush=True)
        return 0
    srv = AttachedServer.from_state(args.state)
    if args.command == "status":
        alive = srv.alive()
        healthy = alive and srv.client().healthy()
        print(f"server {srv.backend} at {srv.base_url} (pid {srv.pid}): running={alive} healthy={healthy}")
        return 0 if healthy else 1
    if args.copy_log_to:
        Path(args.copy_log_to).mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy(srv.log_path, Path(args.copy_log_to) / srv.log_path.name)
        except OSError as e:
            print(f"could not copy {srv.log_path}: {e}")
    was_running = _stop_detached(srv)
    print(f"server {srv.backend} (pid {srv.pid}) {'stopped' if was_running else 'was not running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
