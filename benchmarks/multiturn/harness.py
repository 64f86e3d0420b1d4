"""What the reliability subcommands share around their checks: the model's vocabulary and input limit, log
paths, warm-up, and the "back to idle" check after a run (no request left, no KV slot held, GPU memory back
to where it was before the run)."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.multiturn.checklist import Checks
from benchmarks.multiturn.client import SGLangClient
from benchmarks.multiturn.server import ServerStartError, model_config
from sgl_minference import gpu_memory


def server_failed(checks: Checks, name: str, err: ServerStartError) -> None:
    checks.add(name, "FAIL", f"server did not start or serve (exit code {err.exit_code}): {str(err).splitlines()[0]}",
               log_tail=err.log_tail)


def vocab_size(args: argparse.Namespace, info: dict | None = None) -> int:
    """``--vocab-size``, else the ``vocab_size`` of the model's ``config.json`` (``--model``, or the folder the
    server says it loaded)."""
    model = args.model or (info or {}).get("model_path") or ""
    vocab = args.vocab_size or model_config(model).get("vocab_size")
    if not vocab:
        raise SystemExit("--vocab-size: needed (no config.json with vocab_size in --model)")
    return int(vocab)


def dummy_weights(args: argparse.Namespace, info: dict) -> bool:
    """Whether the server runs random weights (asked here, or found in the attached server's arguments)."""
    return bool(args.dummy or info.get("load_format") == "dummy")


# The server arguments that shape a run, kept in every results file (the attached server's included).
SERVER_ARGS_KEPT = ("model_path", "load_format", "attention_backend", "chunked_prefill_size", "max_prefill_tokens",
                    "max_running_requests", "disable_radix_cache", "mem_fraction_static", "context_length",
                    "cuda_graph_max_bs", "json_model_override_args")


def limits(client: SGLangClient, args: argparse.Namespace) -> dict:
    """The server's context length and the longest ``input_ids`` a request with ``args.max_new_tokens`` new
    tokens may send (SGLang refuses ``input >= context`` and, by default, ``input + max_new_tokens > context``)."""
    info = client.server_info()
    max_input = int(info["max_req_input_len"])
    context = int(info.get("context_length") or model_config(args.model or info.get("model_path") or "")
                  .get("max_position_embeddings") or max_input + 1)
    longest = min(max_input, context - args.max_new_tokens - 1)
    return {"info": info, "max_req_input_len": max_input, "context_length": context, "longest_input": longest,
            "max_total_num_tokens": info.get("max_total_num_tokens"),
            "server_args": {k: info.get(k) for k in SERVER_ARGS_KEPT}}


def log_path(args: argparse.Namespace, what: str) -> Path:
    return Path(args.log_dir) / f"reliability_{what}_{args.backend}_{time.strftime('%Y%m%d_%H%M%S')}.log"


def idle_memory(*, gpu: int, samples: int = 3, interval_s: float = 1.0) -> tuple[int | None, list[int], str | None]:
    """GPU memory in use with the server idle: the median of a few ``nvidia-smi`` readings (None, with the
    reason, when there is no GPU to read)."""
    readings = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval_s)
            readings.append(gpu_memory.parse_memory_used(gpu_memory.read_memory_text())[gpu])
    except Exception as e:  # noqa: BLE001 - whatever nvidia-smi does, the check reports it
        return None, readings, f"{type(e).__name__}: {e}"
    return int(statistics.median(readings)), readings, None


def back_to_idle(checks: Checks, name: str, client: SGLangClient, *, gpu: int, idle_mib: int | None,
                 slack_mib: int, timeout_s: float) -> dict:
    """After a run: the scheduler has no request and holds no KV slot for one (``/v1/loads``), a cache flush
    succeeds (SGLang flushes only when fully idle, and then returns its allocator's cached blocks to the
    driver), and ``nvidia-smi`` memory comes back to at most ``idle_mib + slack_mib`` (``idle_mib`` read the
    same way, after a flush, before the run). Each wait is bounded by ``timeout_s``."""
    idle, waited, loads = client.wait_idle(timeout_s=timeout_s)
    flush_status, flush_msg = client.flush_cache_once(wait_idle_s=timeout_s)
    result = {"scheduler_idle": idle, "idle_wait_s": waited, "loads": loads, "flush_status": flush_status,
              "flush_message": flush_msg, "idle_mib": idle_mib}
    used = [d.get("num_used_tokens") for d in loads]
    kv = (f"scheduler idle after {waited:.1f} s, KV slots held {used}" if idle else
          f"scheduler not idle after {waited:.0f} s: {loads}")
    flushed = flush_status == 200
    kv += f"; /flush_cache -> {flush_status}"
    if idle_mib is None:
        result["memory_reached"] = None
        status = "INCONCLUSIVE" if idle and flushed else "FAIL"
        checks.add(name, status, f"{kv}; GPU memory not measured (no nvidia-smi reading before the run)", **result)
        return result
    reached, readings, mem_wait = gpu_memory.wait_for_memory(gpu_memory.read_memory_text, gpu=gpu,
                                                             limit_mib=idle_mib + slack_mib, timeout_s=timeout_s)
    result.update(memory_reached=reached, memory_readings=readings, memory_wait_s=mem_wait)
    last = readings[-1] if readings else None
    mem = (f"GPU memory {last} MiB after {mem_wait:.1f} s vs {idle_mib} MiB idle before the run "
           f"(allowed +{slack_mib})")
    status = "PASS" if idle and flushed and reached else "FAIL"
    checks.add(name, status, f"{kv}; {mem}", **result)
    return result
