"""End-to-end time to first token (TTFT) through ``sglang.Engine``, dense backends against ``minference``.

Run from the repository root on a GPU host; each invocation appends to one results file and stays within
``--budget-s`` seconds, so a long sweep is split across commands (``--resume`` skips finished cases)::

    python -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference --lengths 8K,32K,128K,256K

Method:

* Weights are random (``load_format="dummy"``, ``skip_tokenizer_init=True``) and prompts are token ids drawn
  at random per request, so the radix cache never hits; each request asks for one new token
  (``max_new_tokens=1``), so its latency is its TTFT. Scenarios: ``single`` (one request per length,
  lengths ascending) and ``mixed`` (one batch, default 4 x 64K + 4 x 2K, timed until the last request's
  first token; per-request latencies from SGLang's ``meta_info["e2e_latency"]``).
* Every engine setting is SGLang's default except: CUDA graphs off for all backends (prefill graphs must be
  off for ``minference``; TTFT with one new token runs no decode step anyway), the context length raised
  to fit the longest prompt (``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1``), and whatever
  ``--engine-args`` adds. ``minference`` runs its default config and default chunked prefill (SGLang's per-GPU
  choice unless ``sgl_minference.plugin.CHUNKED_PREFILL_SIZE`` is set).
* One engine at a time, each in its own subprocess (killed as a process group when the budget runs out),
  so every backend starts on a clean GPU. Warm-up requests (``--warmup-lens``) run before timing.
  Repetitions per case: up to ``--reps``, fewer when the first one is long (``--rep-budget-s``).
* Memory: SGLang allocates in its scheduler process, so device memory is read with NVML (nvidia-smi
  fallback) polled every 50 ms: ``gpu_used_base_mib`` with the engine idle after warm-up (weights, KV
  pool, allocator cache), ``gpu_used_peak_mib`` the highest reading during a case. PyTorch's caching
  allocator keeps what it reserved, so the difference is a high-water mark of activation memory that
  grows monotonically along a backend's sequence of cases.
* A length that fails (context or KV-pool limit, out of memory, engine crash) is recorded with the
  reason and ends that backend's single-request sweep.
* What the sparse path did (``minference`` rows, on unless ``--stats off``): the engine runs with
  ``$SGL_MINFERENCE_STATS`` (``sgl_minference.backend.stats``) and each record's ``sparse_stats`` summarises
  the lines of its median repetition (:func:`summarize_stats`): attended share of causal pairs per layer (mean,
  min, max; chunks the dense side ran count as fully attended), index-building and sparse-attention ms summed
  over chunks and layers, and their sum as a share of the TTFT.
* Index structure (``--structure``): ``dummy`` lets the estimator pick from the dummy weights' near-uniform
  attention; ``synthetic`` replaces its picks with the clustered distribution of
  ``sgl_minference.backend.synthetic`` (``$SGL_MINFERENCE_SYNTHETIC``, value ``--synthetic``). Chunk sizes
  (``--chunk-sizes``) run each backend once per ``chunked_prefill_size``; both are part of a case's key.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (E2ERecord, add_record, add_run, done_keys, load_results, median, parse_lengths,
                               save_results)
from sgl_minference.cli import fail
from sgl_minference.gpu_memory import MemoryPeak, used_mib_reader
from sgl_minference.layout import causal_pairs

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "launch" / "models"
SERVER_KEYS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend", "chunked_prefill_size",
               "max_prefill_tokens", "mem_fraction_static", "context_length", "max_total_num_tokens",
               "max_req_input_len", "page_size", "disable_radix_cache", "json_model_override_args")


@dataclass(kw_only=True)
class Scenario:
    name: str  # "single" or "mixed"
    input_lens: list[int]  # prompt length of each request of the batch


@dataclass(kw_only=True)
class WorkerSpec:
    """Everything one engine subprocess needs (passed as JSON on its command line)."""

    model_dir: str
    model: str
    backend: str
    scenarios: list[dict]  # Scenario fields, in running order
    warmup_lens: list[int]
    reps: int
    rep_budget_s: float
    seed: int
    engine_args: dict = field(default_factory=dict)
    records_path: str  # JSON lines, one per finished case
    structure: str = ""  # minference: "dummy" or "synthetic" ("" for dense backends)
    synthetic: str = "default"  # the value of $SGL_MINFERENCE_SYNTHETIC for structure "synthetic"
    stats_path: str = ""  # $SGL_MINFERENCE_STATS for the engine ("" = no statistics)


# ----------------------------------------------------------------------------------------------------------
# Device memory polling
# ----------------------------------------------------------------------------------------------------------


class GpuMemoryMonitor(MemoryPeak):
    """The package's peak poller on the first visible GPU (MiB, NVML or nvidia-smi), started when built."""

    def __init__(self, interval_s: float = 0.05):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        super().__init__(used_mib_reader(int(visible) if visible.isdigit() else 0), interval_s=interval_s)
        self.start()


# ----------------------------------------------------------------------------------------------------------
# Sparse-path statistics
# ----------------------------------------------------------------------------------------------------------


def read_new_lines(path: str, offset: int) -> tuple[list[dict], int]:
    """JSON lines appended to ``path`` since byte ``offset``, and the new offset (no file yet: none)."""
    if not path or not os.path.exists(path):
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # a line still being written stays for the next read
    return [json.loads(x) for x in data[:end].splitlines() if x.strip()], offset + end


def summarize_stats(lines: list[dict], input_lens: list[int], ttft_ms: float | None) -> dict:
    """What the sparse path did over one repetition of a case, from its ``SGL_MINFERENCE_STATS`` lines.

    Per layer, the attended share of the causal (query, key, head) triples of the whole prompt(s): pairs the
    sparse layouts kept, plus every pair of the chunks the dense backend ran (no line: below the length
    gates, or the layers the per-layer routing sent dense); also the share over the sparse-run chunks alone. Times
    are sums over chunks and layers. ``routed_dense_layer_chunks``: the (layer, chunk) pairs routing sent dense.
    ``pool_run_chunk_share``: the share of sparse request-chunks whose KV slots were one run (read without the
    slot table; ``None`` when no line says).
    """
    if not lines:
        return {"batches": 0}
    routed = sum(len(line.get("routed_dense", ())) for line in lines)  # layer-chunks sent to the dense backend
    lines = [line for line in lines if line["layers"]]
    if not lines:  # every batch routed whole to the dense backend
        return {"batches": 0, "routed_dense_layer_chunks": routed}
    heads = lines[0]["num_q_heads"]
    whole = sum(causal_pairs(n, n, heads) for n in input_lens)  # one layer, every request
    said = [(run, sparse) for line in lines if line.get("pool_run") is not None
            for run, sparse in zip(line["pool_run"], line["sparse"]) if sparse]
    runs = sum(run for run, _ in said) / len(said) if said else None
    attended: dict[int, int] = {}
    covered: dict[int, int] = {}  # causal pairs of the chunks that ran sparse, per layer
    visited: dict[int, int] = {}
    index_ms = attn_ms = 0.0
    layer_index_ms: list[float] = []  # per chunk-layer: a first-use compile shows as an outlier here
    for line in lines:
        for layer in line["layers"]:
            layer_index_ms.append(layer["index_ms"])
            lid = layer["layer"]
            attended[lid] = attended.get(lid, 0) + sum(layer["attended"])
            visited[lid] = visited.get(lid, 0) + sum(layer["visited"])
            covered[lid] = covered.get(lid, 0) + sum(line["causal_pairs"])
            index_ms += layer["index_ms"]
            attn_ms += layer["attn_ms"]
    share = {lid: (attended[lid] + whole - covered[lid]) / whole for lid in sorted(attended)}
    sparse_share = [attended[lid] / covered[lid] for lid in sorted(attended)]
    shares = list(share.values())
    return {"batches": len(lines), "routed_dense_layer_chunks": routed, "structure": lines[0]["structure"],
            "layers": len(share), "pool_run_chunk_share": runs,
            "share_mean": sum(shares) / len(shares), "share_min": min(shares), "share_max": max(shares),
            "share_per_layer": [round(x, 5) for x in shares],
            "sparse_chunk_share_mean": sum(sparse_share) / len(sparse_share),
            "visited_share_mean": sum(visited[lid] / covered[lid] for lid in visited) / len(visited),
            "index_ms": index_ms, "attn_ms": attn_ms, "sparse_ms": index_ms + attn_ms,
            "index_ms_layer_median": median(layer_index_ms), "index_ms_layer_max": max(layer_index_ms),
            "sparse_share_of_ttft": (index_ms + attn_ms) / ttft_ms if ttft_ms else None}


# ----------------------------------------------------------------------------------------------------------
# Worker: one engine, one backend
# ----------------------------------------------------------------------------------------------------------


def engine_kwargs(spec: WorkerSpec, context_length: int) -> dict:
    return {"model_path": spec.model_dir, "load_format": "dummy", "skip_tokenizer_init": True,
            "attention_backend": spec.backend, "context_length": context_length, "disable_cuda_graph": True,
            "random_seed": spec.seed, "log_level": "error", **spec.engine_args}


class RequestRejected(Exception):
    """SGLang refused or aborted a request (length limits); the engine keeps serving."""


def abort_reason(out: dict) -> str | None:
    reason = out.get("meta_info", {}).get("finish_reason") or {}
    if isinstance(reason, dict) and reason.get("type") == "abort":
        return str(reason.get("message", "aborted"))
    return None


def worker(spec: WorkerSpec) -> None:
    """Start one engine, warm it up, time every scenario in order, append one JSON line per case."""
    import numpy as np

    os.environ.setdefault("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    # Read by the backend when the scheduler subprocess builds it (inherited environment).
    os.environ["SGL_MINFERENCE_STATS"] = spec.stats_path
    os.environ["SGL_MINFERENCE_SYNTHETIC"] = spec.synthetic if spec.structure == "synthetic" else ""
    import sglang

    scenarios = [Scenario(**s) for s in spec.scenarios]
    longest = max([max(s.input_lens) for s in scenarios] + spec.warmup_lens)
    vocab = json.loads((Path(spec.model_dir) / "config.json").read_text()).get("vocab_size", 32000)
    rng = np.random.default_rng(spec.seed)

    def prompts(lens: list[int]) -> list[list[int]]:
        # Ids away from the special tokens at both ends; distinct per call so no prefix is ever cached.
        return [rng.integers(16, vocab - 16, n).tolist() for n in lens]

    monitor = GpuMemoryMonitor()
    t0 = time.perf_counter()
    engine = sglang.Engine(**engine_kwargs(spec, context_length=longest + 256))
    info = engine.get_server_info()
    params = {k: info.get(k) for k in SERVER_KEYS} | {"startup_s": time.perf_counter() - t0}
    params["engine_args"] = spec.engine_args
    for n in spec.warmup_lens:
        engine.generate(input_ids=prompts([n]), sampling_params=[{"max_new_tokens": 1}])
    base = monitor.reset_peak()

    def emit(rec: dict) -> None:
        with open(spec.records_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    single_failed, stats_offset = False, 0
    for sc in scenarios:
        if sc.name == "single" and single_failed:
            continue  # the parent records it as not run
        rec = {"model": spec.model, "backend": spec.backend, "scenario": sc.name, "input_lens": sc.input_lens,
               "status": "ok", "params": params, "gpu_used_base_mib": base}
        monitor.reset_peak()
        walls, per_request, per_rep_stats, engine_alive = [], [], [], True
        try:
            while len(walls) < spec.reps and (not walls or sum(walls) + walls[-1] <= spec.rep_budget_s):
                batch = prompts(sc.input_lens)
                _, stats_offset = read_new_lines(spec.stats_path, stats_offset)  # skip warm-up / earlier lines
                t = time.perf_counter()
                try:
                    outs = engine.generate(input_ids=batch, sampling_params=[{"max_new_tokens": 1}] * len(batch))
                except ValueError as e:  # validated and refused before scheduling (e.g. context length)
                    raise RequestRejected(str(e)) from None
                walls.append(time.perf_counter() - t)
                reasons = [r for r in map(abort_reason, outs) if r]
                if reasons:
                    raise RequestRejected(f"request aborted: {reasons[0]}")
                per_request.append([1e3 * o["meta_info"]["e2e_latency"] if "e2e_latency" in o["meta_info"]
                                    else None for o in outs])
                per_rep_stats.append(read_new_lines(spec.stats_path, stats_offset)[0])
        except Exception as e:  # record where and why the sweep stops
            rec["status"] = "oom" if "out of memory" in str(e).lower() else "error"
            rec["reason"] = f"{type(e).__name__}: {e}"[:1000]
            single_failed |= sc.name == "single"
            engine_alive = isinstance(e, RequestRejected)
        if rec["status"] == "ok":
            middle = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
            rec |= {"ttft_ms": median(walls) * 1e3, "ttft_ms_all": [w * 1e3 for w in walls],
                    "request_ms": per_request[middle]}
            if spec.stats_path:
                rec["sparse_stats"] = summarize_stats(per_rep_stats[middle], sc.input_lens, 1e3 * walls[middle])
        rec["gpu_used_peak_mib"] = monitor.peak
        emit(rec)
        print(f"[{spec.backend}] {sc.name} {sc.input_lens}: {rec['status']} "
              f"{rec.get('ttft_ms', rec.get('reason'))}", flush=True)
        if not engine_alive:
            break  # anything but a refused request may have left the engine broken: the parent notes the rest
    monitor.stop()
    engine.shutdown()


# ----------------------------------------------------------------------------------------------------------
# Parent: one subprocess per backend, results merged into one file
# ----------------------------------------------------------------------------------------------------------


def parse_mixed(text: str) -> list[int]:
    """``"64Kx4,2Kx4"`` -> four 65536s then four 2048s."""
    lens = []
    for part in text.split(","):
        length, _, count = part.strip().partition("x")
        if not count.isdigit() or int(count) <= 0:
            raise ValueError(f"mixed: cannot read {part!r} (use e.g. 64Kx4,2Kx4)")
        lens += parse_lengths(length) * int(count)
    return lens


def plan_scenarios(lengths: list[int], scenario_names: list[str], mixed: list[int]) -> list[Scenario]:
    out = []
    if "single" in scenario_names:
        out += [Scenario(name="single", input_lens=[n]) for n in sorted(lengths)]
    if "mixed" in scenario_names:
        out.append(Scenario(name="mixed", input_lens=mixed))
    return out


def pending(scenarios: list[Scenario], done: set, model: str, backend: str, structure: str = "",
            chunk: int | None = None) -> list[Scenario]:
    return [s for s in scenarios if (model, backend, s.name, tuple(s.input_lens), structure, chunk) not in done]


def variants(backends: list[str], structures: list[str], chunks: list[int | None]) -> list[tuple[str, str, int | None]]:
    """(backend, structure, chunk size) per engine to start: dense backends once per chunk size, ``minference``
    once per chunk size and structure."""
    return [(b, st, c) for b in backends for c in chunks for st in (structures if b == "minference" else [""])]


def records_for_backend(lines: list[dict], todo: list[Scenario], run: int, *, model: str, backend: str,
                        exit_status: str, exit_note: str, structure: str = "",
                        chunk: int | None = None) -> list[E2ERecord]:
    """Worker lines as records, plus one for each scenario it never reported, saying why.

    ``exit_status``/``exit_note``: how the subprocess ended (``run_worker``'s status and reason);
    the first unreported scenario of a subprocess that did not end cleanly is the one it died on.
    """
    recs = [E2ERecord(run=run, **line, structure=structure, chunked_prefill_size=chunk) for line in lines]
    reported = {(r.scenario, tuple(r.input_lens)) for r in recs}
    single_failed = any(r.status != "ok" and r.scenario == "single" for r in recs)
    blamed = False
    for s in todo:
        if (s.name, tuple(s.input_lens)) in reported:
            continue
        if s.name == "single" and single_failed:
            status, reason = "skipped", "not run: a shorter length already failed"
        elif exit_status != "ok" and not blamed:
            status, reason, blamed = exit_status, exit_note, True
        else:
            status, reason = "skipped", f"not run: {exit_note or 'the engine subprocess ended early'}"
        recs.append(E2ERecord(run=run, model=model, backend=backend, scenario=s.name, input_lens=s.input_lens,
                              status=status, reason=reason, structure=structure, chunked_prefill_size=chunk))
    return recs


def last_error_line(log: str) -> str:
    """The last log line that looks like an error (else the last line), for a failure's reason."""
    lines = [x.strip() for x in log.splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower() or "out of memory" in x.lower()]
    return (errors or lines or [""])[-1][:500]


def run_worker(spec: WorkerSpec, timeout_s: float, log_path: Path) -> tuple[str, str]:
    """Run one engine subprocess, its output going to ``log_path`` (echoed afterwards).

    Returns ("ok", "") or ("timeout" | "oom" | "error", what went wrong).
    """
    if timeout_s <= 0:
        return "timeout", "command budget spent before this backend started"
    cmd = [sys.executable, "-m", "benchmarks.e2e_ttft", "--worker-spec", json.dumps(vars(spec))]
    with open(log_path, "w") as log:  # own process group, so a kill reaches SGLang's scheduler processes too
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    status, note = "ok", ""
    try:
        code = proc.wait(timeout=timeout_s)
        if code != 0:
            status, note = "error", f"engine subprocess exited with code {code}"
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        status, note = "timeout", f"command budget ran out after {timeout_s:.0f} s (engine killed)"
    log = log_path.read_text(errors="replace")
    print("\n".join(log.splitlines()[-200:]), flush=True)
    if status == "error":
        status = "oom" if "out of memory" in log.lower() else status
        note += f"; last error: {last_error_line(log)}"
    return status, note


def resolve_model(name: str) -> tuple[str, Path]:
    path = Path(name)
    if not path.is_dir():
        path = MODELS_DIR / name
    if not (path / "config.json").is_file():
        fail("python -m benchmarks.e2e_ttft", f"--model: no config.json in {path}")
    return path.name, path.resolve()


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when some case succeeded (or none was left to run), 1 when every case failed; the results
    file gets this run only once it has a successful record (a run that only failed leaves the file as it was)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="llama3-8b", help="directory under launch/models, or a path")
    ap.add_argument("--backends", default="fa3,flashinfer,minference")
    ap.add_argument("--lengths", default="8K,16K,32K,64K,128K,256K")
    ap.add_argument("--scenarios", default="single,mixed", help="single and/or mixed")
    ap.add_argument("--mixed", default="64Kx4,2Kx4", help="the mixed batch, e.g. 64Kx4,2Kx4")
    ap.add_argument("--warmup-lens", default="4K,64K", help="untimed requests after start-up")
    ap.add_argument("--reps", type=int, default=3, help="most timed repetitions per case")
    ap.add_argument("--rep-budget-s", type=float, default=30.0, help="no further repetition past this total")
    ap.add_argument("--engine-args", default="{}", help="JSON of extra sglang.Engine arguments (all backends)")
    ap.add_argument("--minference-args", default="",
                    help='JSON for the minference backend, passed as json_model_override_args {"minference": ...}')
    ap.add_argument("--structure", default="dummy",
                    help="minference index structure(s), comma-separated: dummy and/or synthetic")
    ap.add_argument("--synthetic", default="default",
                    help="$SGL_MINFERENCE_SYNTHETIC for --structure synthetic: default, a JSON object, a JSON file")
    ap.add_argument("--chunk-sizes", default="",
                    help="chunked_prefill_size values to run each backend with, e.g. 8192,32768 (default: SGLang's)")
    ap.add_argument("--stats", choices=("on", "off"), default="on",
                    help="record what the sparse path did in minference rows ($SGL_MINFERENCE_STATS)")
    ap.add_argument("--budget-s", type=float, default=520.0, help="wall-clock budget of this whole command")
    ap.add_argument("--resume", action="store_true", help="skip cases the results file already has as ok")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/e2e.json", help="results file (appended to)")
    args = ap.parse_args(argv)
    if args.worker_spec:
        worker(WorkerSpec(**json.loads(args.worker_spec)))
        return 0

    deadline = time.monotonic() + args.budget_s
    model, model_dir = resolve_model(args.model)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    scenarios = plan_scenarios(parse_lengths(args.lengths), args.scenarios.split(","), parse_mixed(args.mixed))
    try:
        engine_args = json.loads(args.engine_args)
        json.loads(args.minference_args or "{}")
    except json.JSONDecodeError as e:
        fail("python -m benchmarks.e2e_ttft", f"--engine-args / --minference-args: not JSON ({e})")
    structures = [x.strip() for x in args.structure.split(",") if x.strip()]
    if not structures or set(structures) - {"dummy", "synthetic"}:
        fail("python -m benchmarks.e2e_ttft", f"--structure: {args.structure!r}, expected dummy and/or synthetic")
    chunks = [int(x) for x in args.chunk_sizes.split(",") if x.strip()] or [engine_args.get("chunked_prefill_size")]
    results = load_results(args.out, "e2e")
    done = done_keys(results) if args.resume else set()
    run = add_run(results, settings={
        "model": model, "backends": backends, "scenarios": [vars(s) for s in scenarios],
        "warmup_lens": parse_lengths(args.warmup_lens), "reps": args.reps, "rep_budget_s": args.rep_budget_s,
        "engine_args": engine_args, "minference_args": args.minference_args, "seed": args.seed,
        "structures": structures, "synthetic": args.synthetic, "chunk_sizes": chunks, "stats": args.stats})
    ran = ok = 0
    for backend, structure, chunk in variants(backends, structures, chunks):
        todo = pending(scenarios, done, model, backend, structure, chunk)
        if not todo:
            continue
        extra = dict(engine_args) | ({} if chunk is None else {"chunked_prefill_size": chunk})
        if backend == "minference" and args.minference_args:
            extra["json_model_override_args"] = json.dumps({"minference": json.loads(args.minference_args)})
        with tempfile.TemporaryDirectory() as tmp:
            spec = WorkerSpec(model_dir=str(model_dir), model=model, backend=backend,
                              scenarios=[vars(s) for s in todo], warmup_lens=parse_lengths(args.warmup_lens),
                              reps=args.reps, rep_budget_s=args.rep_budget_s, seed=args.seed, engine_args=extra,
                              records_path=str(Path(tmp) / "records.jsonl"), structure=structure,
                              synthetic=args.synthetic,
                              stats_path=str(Path(tmp) / "stats.jsonl")
                              if backend == "minference" and args.stats == "on" else "")
            exit_status, exit_note = run_worker(spec, deadline - time.monotonic(), Path(tmp) / "engine.log")
            path = Path(spec.records_path)
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        for rec in records_for_backend(lines, todo, run, model=model, backend=backend, exit_status=exit_status,
                                       exit_note=exit_note, structure=structure, chunk=chunk):
            add_record(results, rec)
            ran, ok = ran + 1, ok + (rec.status == "ok")
        if ok:
            save_results(args.out, results)
    if not ran:
        print(f"nothing to run: every case is already in {args.out}", flush=True)
    elif not ok:
        print(f"e2e_ttft: every one of the {ran} cases failed (see the log above); {args.out} was left as it was",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
