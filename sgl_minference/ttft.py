"""Time to first token of one long prompt, dense (FlashInfer) versus ``minference``, through ``sglang.Engine``.

    python -m sgl_minference.ttft [--lengths 131072 65536] [--model launch/models/llama3-8b] [--out ttft.json]

Each backend gets its own engine (one at a time, shut down before the next): dummy weights, no tokenizer,
prompts as random token ids, distinct for every request so the radix cache never serves a prefix. TTFT is the
wall time of a ``generate`` with ``max_new_tokens=1`` after a warm-up request of the same length (which also
compiles the sparse kernels). GPU memory is read device-wide while the request runs (the engine's scheduler is
another process): ``used_before_gib`` includes the KV pool the engine reserves, ``prefill_peak_gib`` is the
highest use seen during the request. Needs a CUDA GPU, SGLang and this package installed (its entry point).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "launch" / "models" / "llama3-8b"
GIB = 1 << 30


class MemoryWatch:
    """Polls device-wide used memory (``cudaMemGetInfo``) in a thread; ``peak`` is the highest use seen."""

    def __init__(self, torch, interval_s: float = 0.005):
        self.torch, self.interval_s = torch, interval_s
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def random_ids(length: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, vocab) for _ in range(length)]


def measure_backend(backend: str, args, vocab: int, torch) -> list[dict]:
    """Start one engine for ``backend``, time every length, shut it down."""
    import sglang

    kwargs = dict(model_path=str(args.model), load_format="dummy", skip_tokenizer_init=True,
                  attention_backend=backend, context_length=max(args.lengths) + 64,
                  mem_fraction_static=args.mem_fraction_static, log_level="error")
    if args.chunked_prefill_size:
        kwargs["chunked_prefill_size"] = args.chunked_prefill_size
    if backend == "minference":
        kwargs["json_model_override_args"] = json.dumps({"minference": json.loads(args.config)})
    engine = sglang.Engine(**kwargs)
    rows, seed = [], 0
    try:
        sampling = {"max_new_tokens": 1, "temperature": 0.0}
        for length in args.lengths:
            seed += 1
            engine.generate(input_ids=random_ids(length, vocab, seed), sampling_params=sampling)  # warm-up
            times, peak, before = [], 0, 0
            for _ in range(args.repeats):
                seed += 1
                ids = random_ids(length, vocab, seed)
                watch = MemoryWatch(torch)
                before = watch.used()
                with watch:
                    start = time.perf_counter()
                    out = engine.generate(input_ids=ids, sampling_params=sampling)
                    times.append(time.perf_counter() - start)
                peak = max(peak, watch.peak)
                if out["meta_info"].get("cached_tokens", 0):
                    raise RuntimeError(f"{backend}: the radix cache served {out['meta_info']['cached_tokens']} tokens")
            rows.append(dict(backend=backend, length=length, ttft_s=statistics.median(times), ttft_all_s=times,
                             used_before_gib=before / GIB, prefill_peak_gib=peak / GIB))
            print(f"{backend:>11} {length:>8} tokens: TTFT {statistics.median(times):8.3f} s   "
                  f"GPU memory {before / GIB:6.1f} GiB before, {peak / GIB:6.1f} GiB peak", flush=True)
    finally:
        engine.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model directory (dummy weights)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072], help="prompt lengths in tokens")
    parser.add_argument("--backends", nargs="+", default=["flashinfer", "minference"],
                        choices=["flashinfer", "fa3", "triton", "minference"])
    parser.add_argument("--config", default="{}", help='minference config as JSON (default: the built-in one)')
    parser.add_argument("--repeats", type=int, default=2, help="timed requests per length (median reported)")
    parser.add_argument("--chunked-prefill-size", type=int, default=None, help="default: SGLang's choice")
    parser.add_argument("--mem-fraction-static", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("sgl_minference.ttft needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.",
              file=sys.stderr)
        return 2
    if "minference" in args.backends and not any(
            ep.value.startswith("sgl_minference.") for ep in entry_points(group="sglang.srt.plugins")):
        print("the sgl-minference entry point is not installed, so SGLang cannot find the minference backend: "
              "run `pip install --no-deps --no-build-isolation -e .` in the repository", file=sys.stderr)
        return 2
    json.loads(args.config)  # fail before starting an engine
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    rows = []
    for backend in args.backends:
        rows += measure_backend(backend, args, vocab, torch)
    result = dict(device=torch.cuda.get_device_name(), model=str(args.model), date=time.strftime("%Y-%m-%d"),
                  command=" ".join(sys.argv), results=rows)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
