"""Shared pieces of the benchmark scripts: the results file, timing, memory and attention-work accounting.

Results file (one JSON object, appended to by several commands so long measurements can be split)::

    {"schema": SCHEMA, "kind": "kernel" | "e2e",
     "runs": [{"command", "date", "device", "versions", "settings", "unavailable"}, ...],
     "records": [KernelRecord / E2ERecord as dicts, each naming its run by index]}

When a case was measured more than once, the record of the latest run wins (:func:`latest_records`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.multiturn.results import library_versions  # one reader of the library versions
from sgl_minference.kernels.sparse_attention import AttentionLaunch

SCHEMA = "sgl-minference-bench/1"
STATUSES = ("ok", "skipped", "error", "oom", "timeout")


# ----------------------------------------------------------------------------------------------------------
# Attention launches, as the benchmarks' command lines spell them
# ----------------------------------------------------------------------------------------------------------

LAUNCH_EXAMPLE = "64x4x3,128x8x2h,64x8x3p,64x4x3t,64x4x3d"
_FLAGS = "hptd"


def parse_launch_list(text: str) -> list[AttentionLaunch]:
    """``64x4x3,128x8x2h,64x8x3p,64x4x3t,64x4x3d``: block_n x num_warps x num_stages per attention launch, then
    flags in this order: ``h`` launches a query block's heads next to each other, ``p`` serves two query blocks
    per program, ``t`` reads every key through the slot table (no pool runs, ``AttentionLaunch.pool_runs``), ``d``
    reads full tiles of packed keys through tensor descriptors (``AttentionLaunch.tma``). ``ValueError`` on
    anything else."""
    launches = []
    for item in filter(None, text.split(",")):
        numbers = item.rstrip(_FLAGS)
        flags = item[len(numbers):]
        if list(flags) != sorted(set(flags), key=_FLAGS.index):  # each flag once, in that order
            raise ValueError(f"flags of {item!r} not in the order {_FLAGS!r}")
        try:
            block_n, warps, stages = map(int, numbers.split("x"))
        except ValueError:
            raise ValueError(f"{item!r} is not BLOCK_NxWARPSxSTAGES") from None
        launches.append(AttentionLaunch(block_n, warps, stages, heads_first="h" in flags, pair_blocks="p" in flags,
                                        pool_runs="t" not in flags, tma="d" in flags))
    return launches


def launch_name(launch: AttentionLaunch) -> str:
    """The :func:`parse_launch_list` spelling of ``launch``."""
    return ("x".join(map(str, launch[:3])) + "h" * launch.heads_first + "p" * launch.pair_blocks
            + "t" * (not launch.pool_runs) + "d" * launch.tma)


# ----------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class KernelRecord:
    """One attention call on one input: a dense baseline or a sparse method with its index building."""

    run: int  # index into the file's "runs"
    method: str  # implementation: fa3, sdpa_cudnn, sdpa_flash, flashinfer, ours, sgl_kernel, flashinfer_vbsr
    pattern: str  # dense, vertical_slash, block_sparse, block_sparse_kv_union, a_shape
    seq_q: int  # query rows (the chunk)
    seq_k: int  # keys (prefix + chunk); bottom-right causal
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    dtype: str
    status: str  # one of STATUSES
    reason: str = ""  # why a case was skipped or failed
    attn_ms: float | None = None  # median attention time
    attn_ms_all: list[float] = field(default_factory=list)  # every timed repetition
    index_ms: float | None = None  # median time to build the sparse indices (None for dense)
    index_detail: dict[str, float] = field(default_factory=dict)  # named parts of the index building, ms
    pairs: int | None = None  # (query, key, query head) triples attended after the causal cut
    visited_pairs: int | None = None  # triples the kernel loads: rows x (range lengths + columns)
    density: float | None = None  # pairs / causal pairs
    tflops: float | None = None  # 4 * head_dim * pairs / attn time
    peak_mib: float | None = None  # peak device memory allocated by one attention call beyond its inputs
    index_peak_mib: float | None = None  # same for one index building
    params: dict = field(default_factory=dict)  # budgets and options of the method

    def key(self) -> tuple:
        return (self.method, self.pattern, self.seq_q, self.seq_k, self.head_dim, self.num_q_heads,
                self.num_kv_heads, self.dtype)


@dataclass(kw_only=True)
class E2ERecord:
    """Time to first token of one scenario (one request, or one batch) on one served backend."""

    run: int  # index into the file's "runs"
    model: str  # model directory name under launch/models
    backend: str  # SGLang attention backend
    scenario: str  # "single" (one request) or "mixed" (one batch of several requests)
    input_lens: list[int]  # prompt length of each request
    status: str  # one of STATUSES
    reason: str = ""
    ttft_ms: float | None = None  # median over repetitions of the time until the last request's first token
    ttft_ms_all: list[float] = field(default_factory=list)  # every repetition
    request_ms: list[float | None] = field(default_factory=list)  # per-request latency (median repetition)
    gpu_used_base_mib: float | None = None  # device memory in use with the engine idle (static pools)
    gpu_used_peak_mib: float | None = None  # highest device memory in use seen while this case ran
    params: dict = field(default_factory=dict)  # engine settings as resolved by SGLang, startup time, ...
    structure: str = ""  # minference only: "dummy" (the estimator sees dummy weights) or "synthetic"
    chunked_prefill_size: int | None = None  # as requested (None: the default; the resolved one is in params)
    sparse_stats: dict = field(default_factory=dict)  # minference: what the sparse path did (e2e_ttft.summarize_stats)

    def key(self) -> tuple:
        return (self.model, self.backend, self.scenario, tuple(self.input_lens), self.structure,
                self.chunked_prefill_size)


RECORD_TYPES = {"kernel": KernelRecord, "e2e": E2ERecord}


def record_from_dict(kind: str, d: dict):
    """Rebuild a record of ``kind`` from its JSON dict; ``ValueError`` on unknown, missing or bad fields."""
    cls = RECORD_TYPES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"record: unknown fields {sorted(unknown)} for kind {kind}")
    try:
        rec = cls(**d)
    except TypeError as e:
        raise ValueError(f"record: {e}") from None
    if rec.status not in STATUSES:
        raise ValueError(f"record: status {rec.status!r} not in {STATUSES}")
    return rec


# ----------------------------------------------------------------------------------------------------------
# The results file
# ----------------------------------------------------------------------------------------------------------


def new_results(kind: str) -> dict:
    if kind not in RECORD_TYPES:
        raise ValueError(f"kind: {kind!r} not in {tuple(RECORD_TYPES)}")
    return {"schema": SCHEMA, "kind": kind, "runs": [], "records": []}


def validate_results(results: dict) -> None:
    """Check a loaded results object: schema, kind, runs, and every record's fields and run index."""
    if results.get("schema") != SCHEMA:
        raise ValueError(f"results: schema {results.get('schema')!r}, expected {SCHEMA!r}")
    kind = results.get("kind")
    if kind not in RECORD_TYPES:
        raise ValueError(f"results: kind {kind!r} not in {tuple(RECORD_TYPES)}")
    for i, run in enumerate(results.get("runs", [])):
        missing = {"command", "date", "device", "versions"} - set(run)
        if missing:
            raise ValueError(f"results: run {i} lacks {sorted(missing)}")
    for d in results.get("records", []):
        rec = record_from_dict(kind, d)
        if not 0 <= rec.run < len(results["runs"]):
            raise ValueError(f"results: record names run {rec.run}, file has {len(results['runs'])}")


def load_results(path: str | os.PathLike, kind: str) -> dict:
    """The results in ``path`` (validated, of ``kind``), or a new empty object when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return new_results(kind)
    results = json.loads(path.read_text())
    validate_results(results)
    if results["kind"] != kind:
        raise ValueError(f"{path}: holds {results['kind']} results, expected {kind}")
    return results


def save_results(path: str | os.PathLike, results: dict) -> None:
    """Validate and write atomically (a killed command leaves the previous file intact)."""
    validate_results(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def add_run(results: dict, *, settings: dict, unavailable: dict[str, str] | None = None) -> int:
    """Append this command's environment to ``results["runs"]``; returns its index for the records."""
    results["runs"].append({**environment(), "settings": settings, "unavailable": unavailable or {}})
    return len(results["runs"]) - 1


def add_record(results: dict, record) -> None:
    results["records"].append(dataclasses.asdict(record))


def latest_records(results: dict) -> list:
    """Records as dataclasses, one per case: the one from the latest run (then the last written) wins."""
    best = {}
    for d in results["records"]:
        rec = record_from_dict(results["kind"], d)
        k = rec.key()
        if k not in best or rec.run >= best[k].run:
            best[k] = rec
    return list(best.values())


def done_keys(results: dict) -> set[tuple]:
    """Keys of the cases whose latest record succeeded (a resumed command skips them)."""
    return {r.key() for r in latest_records(results) if r.status == "ok"}


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def environment() -> dict:
    """Device, date, command line and library versions of this process."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        cc = torch.cuda.get_device_capability()
        device_info = {"capability": f"{cc[0]}.{cc[1]}", "cuda": torch.version.cuda,
                       "memory_mib": torch.cuda.get_device_properties(0).total_memory / 2**20}
    else:
        device, device_info = f"cpu ({platform.processor() or platform.machine()})", {}
    return {
        "command": shlex.join([Path(sys.executable).name] + sys.orig_argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_info": device_info,
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def parse_lengths(text: str) -> list[int]:
    """``"8K,16k,1M,4096"`` -> ``[8192, 16384, 1048576, 4096]`` (K = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        scale = {"K": 1024, "M": 1024 * 1024}.get(part[-1], 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) <= 0:
            raise ValueError(f"lengths: cannot read {part!r} (use e.g. 8K,16K or 8192)")
        out.append(int(digits) * scale)
    if not out:
        raise ValueError("lengths: empty list")
    return out


# ----------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TimingPlan:
    """How many times to call a function: a warm-up, then repetitions until a time budget is used."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 20
    budget_ms: float = 2000.0  # stop adding repetitions once their total passes this


@dataclass(kw_only=True)
class Measurement:
    times_ms: list[float]  # each timed call
    peak_mib: float  # peak device memory allocated during the first timed call beyond what was allocated before
    result: object  # what the first timed call returned (for output checks)


def measure(fn: Callable[[], object], plan: TimingPlan) -> Measurement:
    """Time ``fn`` with CUDA events around each call (synchronised after each) and record its peak memory.

    Long calls (a dense 256K prefill takes about a second) get ``min_reps`` repetitions; short ones are
    repeated until ``budget_ms`` is spent, at most ``max_reps`` times. The peak-memory counter is reset on
    the host around the first timed call, so measuring memory costs no extra call.
    """
    for _ in range(plan.warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    peak_mib, first = 0.0, None
    while len(times) < plan.max_reps and (len(times) < plan.min_reps or sum(times) < plan.budget_ms):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if not times:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        if not times:
            peak_mib, first = (torch.cuda.max_memory_allocated() - before) / 2**20, result
        del result
        times.append(start.elapsed_time(end))
    return Measurement(times_ms=times, peak_mib=peak_mib, result=first)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------------------------------------
# Attention work accounting
# ----------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class PairCount:
    attended: int  # (query, key, head) triples inside the pattern and the causal cut
    visited: int  # rows x (range lengths + columns): what the kernel loads, causal cut not applied


def layout_pairs(layout, geom) -> PairCount:
    """Totals of :meth:`sgl_minference.layout.SparseLayout.pairs` for a one-request ``BatchGeometry``."""
    if geom.num_requests != 1:
        raise ValueError(f"geom: layout_pairs counts one request, got {geom.num_requests}")
    attended, visited = layout.pairs(geom)
    return PairCount(attended=int(attended.sum()), visited=int(visited.sum()))


def attention_tflops(pairs: int, head_dim: int, ms: float) -> float:
    """Effective TFLOP/s: two matmuls of ``2 * head_dim`` flops per attended (query, key, head) triple."""
    return 4.0 * head_dim * pairs / (ms * 1e-3) / 1e12
