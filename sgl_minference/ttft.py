"""Time to first token of one long prompt: SGLang's default dense backend for this GPU versus ``minference``.

    python -m sgl_minference.ttft [--lengths 131072 65536] [--backends auto minference] [--out ttft.json]

``auto`` (the default dense side) is the backend SGLang itself picks for dense attention on this GPU: ``fa3`` on
Hopper when FA3 is installed, else ``flashinfer`` (:func:`sgl_minference.plugin.resolve_dense_backend`), so the
printed ratio (dense TTFT / minference TTFT, per length) is against what a user runs without this package.
``minference`` keeps the same backend for what it leaves dense.

Each backend gets its own engine (one at a time, shut down before the next): an embedded Llama-3-8B-shaped model
(``sgl_minference/models/llama3-8b``, config only) with dummy weights, no tokenizer, prompts as random token ids,
distinct for every request so the radix cache never serves a prefix. TTFT is the wall time of a ``generate``
with ``max_new_tokens=1`` after a warm-up request of the same length. Every other engine setting is SGLang's
default (``--engine-args`` adds to them). Each step prints a line with the time elapsed since the command
started, and every 30 s while it lasts: an engine start takes tens of seconds, and on a fresh machine the first
start and warm-up compile kernels (FlashInfer's, Triton's), which can take minutes. GPU memory is read
device-wide while the request runs (the engine's scheduler is another process): ``used_before_gib`` includes
the KV pool the engine reserves, ``prefill_peak_gib`` is the highest use seen during the request.
Needs a CUDA GPU, SGLang and this package installed (``pip install -e ".[sglang]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path

from .cli import fail
from .gpu_memory import MemoryPeak

PROG = "python -m sgl_minference.ttft"
DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "llama3-8b"
DENSE_CHOICES = ("auto", "fa3", "flashinfer", "triton")
GIB = 1 << 30
HEARTBEAT_S = 30.0


class Progress:
    """Progress lines on stdout, each stamped with the seconds since the command started."""

    def __init__(self, heartbeat_s: float = HEARTBEAT_S, out=None):
        self.t0, self.heartbeat_s, self.out = time.perf_counter(), heartbeat_s, out

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {message}", file=self.out or sys.stdout, flush=True)

    @contextlib.contextmanager
    def step(self, label: str, note: str = "") -> Iterator[None]:
        """``label ...`` now, ``label: still running (N s)`` every ``heartbeat_s``, ``label: done in N s`` at the end."""
        start, done = time.perf_counter(), threading.Event()
        self.say(f"{label} ..." + (f" ({note})" if note else ""))

        def beat():
            while not done.wait(self.heartbeat_s):
                self.say(f"{label}: still running ({time.perf_counter() - start:.0f} s)")

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
        self.say(f"{label}: done in {time.perf_counter() - start:.1f} s")


def random_ids(length: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, vocab) for _ in range(length)]


def engine_kwargs(backend: str, args) -> dict:
    kwargs = dict(model_path=str(args.model), load_format="dummy", skip_tokenizer_init=True,
                  attention_backend=backend, context_length=max(args.lengths) + 64,
                  mem_fraction_static=args.mem_fraction_static, log_level="error")
    if args.chunked_prefill_size:
        kwargs["chunked_prefill_size"] = args.chunked_prefill_size
    if backend == "minference":
        kwargs["json_model_override_args"] = json.dumps({"minference": args.overrides})
    return {**kwargs, **args.engine_args}


def measure_backend(backend: str, args, vocab: int, *, engine_cls, used_memory: Callable[[], int],
                    progress: Progress) -> list[dict]:
    """Start one engine for ``backend``, time every length, shut it down."""
    with progress.step(f"{backend}: starting engine", f"model {args.model.name}, dummy weights"):
        engine = engine_cls(**engine_kwargs(backend, args))
    rows, seed = [], 0
    try:
        sampling = {"max_new_tokens": 1, "temperature": 0.0}
        for i, length in enumerate(args.lengths):
            seed += 1
            note = "a first run on this machine compiles kernels (FlashInfer, Triton): can take minutes" if i == 0 else ""
            with progress.step(f"{backend}: warm-up request of {length} tokens", note):
                engine.generate(input_ids=random_ids(length, vocab, seed), sampling_params=sampling)
            times, peak, before = [], 0, 0
            for _ in range(args.repeats):
                seed += 1
                ids = random_ids(length, vocab, seed)
                watch = MemoryPeak(used_memory, interval_s=0.005)
                before = used_memory()
                with watch:
                    start = time.perf_counter()
                    out = engine.generate(input_ids=ids, sampling_params=sampling)
                    times.append(time.perf_counter() - start)
                peak = max(peak, watch.peak)
                if out["meta_info"].get("cached_tokens", 0):
                    raise RuntimeError(f"{backend}: the radix cache served {out['meta_info']['cached_tokens']} tokens")
            rows.append(dict(backend=backend, length=length, ttft_s=statistics.median(times), ttft_all_s=times,
                             used_before_gib=before / GIB, prefill_peak_gib=peak / GIB))
            progress.say(f"{backend:>11} {length:>8} tokens: TTFT {statistics.median(times):8.3f} s   "
                         f"GPU memory {before / GIB:6.1f} GiB before, {peak / GIB:6.1f} GiB peak")
    finally:
        with progress.step(f"{backend}: shutting the engine down"):
            engine.shutdown()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per length and dense backend: dense TTFT / minference TTFT (> 1: minference is faster)."""
    sparse = {r["length"]: r["ttft_s"] for r in rows if r["backend"] == "minference"}
    return [dict(length=r["length"], dense=r["backend"], dense_ttft_s=r["ttft_s"],
                 minference_ttft_s=sparse[r["length"]], ratio=r["ttft_s"] / sparse[r["length"]])
            for r in rows if r["backend"] != "minference" and r["length"] in sparse]


def ratio_lines(table: list[dict]) -> list[str]:
    return [f"{r['length']:>8} tokens: {r['dense']} {r['dense_ttft_s']:.3f} s, minference {r['minference_ttft_s']:.3f} s"
            f" -> {r['ratio']:.2f}x ({r['dense']} TTFT / minference TTFT)" for r in table]


def resolve_backends(names: list[str], resolve: Callable[[str], str]) -> list[str]:
    """``names`` with ``auto`` replaced by SGLang's choice (``resolve``), duplicates dropped, order kept."""
    out = []
    for name in names:
        name = resolve(name) if name == "auto" else name
        if name not in out:
            out.append(name)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="model folder with a config.json (dummy weights); default: the embedded Llama-3-8B shape")
    p.add_argument("--lengths", type=int, nargs="+", default=[131072], help="prompt lengths in tokens")
    p.add_argument("--backends", nargs="+", default=["auto", "minference"], choices=[*DENSE_CHOICES, "minference"],
                   help="engines to time, in order (default: auto minference; auto = SGLang's dense choice here)")
    p.add_argument("--config", default="{}",
                   help="minference config: a JSON object of overrides or a config file (default: the built-in one)")
    p.add_argument("--repeats", type=int, default=2, help="timed requests per length (median reported)")
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="default: SGLang's choice")
    p.add_argument("--mem-fraction-static", type=float, default=0.8)
    p.add_argument("--engine-args", default="{}", help="further sglang.Engine keyword arguments as JSON (all engines)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Turn the arguments into what the engines take; a bad one is one line on stderr and exit status 2."""
    from .config import ConfigError, MInferenceConfig

    if any(n <= 0 for n in args.lengths) or args.repeats <= 0:
        fail(PROG, "--lengths and --repeats must be positive")
    config_file = args.model / "config.json"
    if not config_file.is_file():
        fail(PROG, f"--model: no config.json in {args.model}")
    model = json.loads(config_file.read_text())
    try:
        overrides = json.loads(args.config)
    except json.JSONDecodeError:
        overrides = {"config_path": str(Path(args.config).resolve())}  # not JSON: a config file
    try:
        config = MInferenceConfig.from_overrides(overrides, source="--config")
        config.validate_for_model(model["num_hidden_layers"], model["num_attention_heads"])
    except ConfigError as e:
        fail(PROG, e)
    try:
        engine_args = json.loads(args.engine_args)
    except json.JSONDecodeError as e:
        fail(PROG, f"--engine-args: not JSON ({e})")
    if not isinstance(engine_args, dict):
        fail(PROG, "--engine-args: expected a JSON object")
    args.overrides, args.engine_args, args.vocab = overrides, engine_args, model["vocab_size"]


def run(args: argparse.Namespace, backends: list[str], *, engine_cls, used_memory: Callable[[], int],
        device: str, progress: Progress) -> dict:
    """Time every backend, print the ratios; the results (``--out``'s JSON)."""
    rows = []
    for backend in backends:
        rows += measure_backend(backend, args, args.vocab, engine_cls=engine_cls, used_memory=used_memory,
                                progress=progress)
    table = ratios(rows)
    for line in ratio_lines(table):
        print(line, flush=True)
    return dict(device=device, model=str(args.model), date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
                backends=backends, results=rows, ratios=table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    import torch

    if not torch.cuda.is_available():
        print(f"{PROG}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    if "minference" in args.backends and not any(
            ep.value.startswith("sgl_minference.") for ep in entry_points(group="sglang.srt.plugins")):
        print(f"{PROG}: the sgl-minference entry point is not installed, so SGLang cannot find the minference "
              'backend: run `pip install -e ".[sglang]"` in the repository', file=sys.stderr)
        return 2
    progress = Progress()
    with progress.step("importing SGLang"):
        import sglang

        from .plugin import resolve_dense_backend

        backends = resolve_backends(args.backends, resolve_dense_backend)
    progress.say(f"device {torch.cuda.get_device_name()}; backends {', '.join(backends)} "
                 f"(SGLang's dense choice here: {resolve_dense_backend('auto')})")

    def used_memory() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    result = run(args, backends, engine_cls=sglang.Engine, used_memory=used_memory,
                 device=torch.cuda.get_device_name(), progress=progress)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        progress.say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
