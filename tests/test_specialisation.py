"""No chunk shape compiles kernels of its own: every launch of the per-layer sparse path has the same Triton
specialisation key at every context length, chunk length and batch size.

Why: Triton compiles one variant of a kernel per *specialisation* of its arguments (each int argument: equal
to 1, divisible by 16, 32 or 64 bits; each pointer: 16-byte aligned or not; each ``constexpr`` value). A
variant that depends on the batch's lengths is compiled in the middle of the first request that meets it: on
an H200 (2026-12-02, ``benchmarks.chunk_bench``) a 128K prompt compiled 2-4 variants this way, 1.2-4.9 s each,
inside its TTFT. This test emulates Triton's key on the CPU (the interpreter compiles nothing): it records every
launch of the package's kernels, with the original tensors, across a series of serving-like batches, and
requires one key per kernel.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, INTERPRET, make_geometry, make_qkv, paged_kv

from sgl_minference.backend.attn_backend import build_layer_heads
from sgl_minference.backend.layer_layout import layer_layout
from sgl_minference.backend.planner import plan_batch
from sgl_minference.config import MInferenceConfig
from sgl_minference.kernels import sparse_attention
from sgl_minference.kernels.sparse_attention import AttentionLaunch

pytestmark = pytest.mark.skipif(not INTERPRET, reason="records launches through the Triton interpreter")

HQ, HK, D = 8, 2, 64
PAIRED = AttentionLaunch(64, 8, 3, pair_blocks=True)  # the paired launch's kernel is checked too
# Budgets below every context, as the defaults are below every context the gate lets through in serving.
CONFIG = {"min_context": 512, "min_chunk": 16, "last_q": 64, "forced_sink": 4, "forced_local": 16,
          "default": {"type": "vertical_slash", "vertical": 40, "slash": 20},
          "heads": {"0": {"5": {"type": "block_sparse", "topk": 3}, "6": {"type": "a_shape", "sink": 64,
                                                                         "local": 128}}}}
# Batches (chunk lengths, prefix lengths), ragged and unaligned, one and two requests: each a serving step. The
# long one takes the selection over several shares (> 16K keys) and, with the small slash budget, the dense
# band's width over the budget and past a power of two (the layout's range capacity grows with the context).
BATCHES = [([256], [448]), ([130], [1001]), ([200, 77], [800, 655]), ([256], [1793]), ([61], [1300]),
           ([64], [40000])]


def specialisation(fn, args: tuple, kwargs: dict) -> tuple:
    """Triton's compile key for one launch (as far as the arguments decide it)."""
    skip = set(fn.kwargs.get("do_not_specialize") or ())
    key = []
    for name, value in list(zip(fn.arg_names, args)) + sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or value is None:
            key.append((name, value))
        elif isinstance(value, int):
            bits = 32 if -2 ** 31 <= value < 2 ** 31 else 64
            key.append((name, bits) if name in skip else (name, bits, value == 1, value % 16 == 0))
        elif isinstance(value, float):
            key.append((name, "fp32"))
        else:
            key.append((name, repr(value)))
    return tuple(key)


@pytest.fixture
def launches(monkeypatch):
    """Kernel launches made while the test runs: ``launches[-1]`` maps each kernel name to its keys since the
    last ``launches.append({})``."""
    from triton.runtime.interpreter import InterpretedFunction

    batches: list[dict[str, set]] = [{}]
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("sgl_minference."):
            batches[-1].setdefault(self.fn.__name__, set()).add(specialisation(self, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return batches


def test_one_specialisation_per_kernel_across_batches(launches):
    """Every batch launches each kernel with the same set of keys (a kernel may have several per batch, e.g. one
    per digit level or per head group, but none that a batch's lengths decide)."""
    config = MInferenceConfig.model_validate(CONFIG)
    layers, all_heads = build_layer_heads(config, num_layers=1, num_q_heads=HQ, num_kv_heads=HK, attn_tp_rank=0,
                                          device=DEVICE)
    for i, (seq_q, prefix) in enumerate(BATCHES):
        geom = make_geometry(seq_q, prefix)
        q, k, v = make_qkv(geom, HQ, HK, D, torch.float16, seed=i)
        kv = paged_kv(k, v, geom.seq_lens_k_cpu, seed=i)
        plan = plan_batch(config, seq_lens_q=seq_q, seq_lens_k=geom.seq_lens_k_cpu, req_to_token=kv.req_to_token,
                          req_pool_indices=kv.req_pool_indices, all_heads=all_heads)
        assert plan is not None and all(plan.sparse_requests)
        layout = layer_layout(q, plan.kv_source(kv.k, kv.v), plan, layers[0], config, sm_scale=D ** -0.5)
        sparse_attention(q, plan.kv_source(kv.k, kv.v), layout, plan.geom, sm_scale=D ** -0.5)
        sparse_attention(q, plan.kv_source(kv.k, kv.v), layout, plan.geom, sm_scale=D ** -0.5, launch=PAIRED)
        launches.append({})
    batches = launches[:-1]
    first = batches[0]
    assert {"_lastq_lse_kernel", "_vs_write_kernel", "_materialise_kernel", "_block_select_kernel",
            "_sparse_attention_fwd", "_paired_attention_fwd"} <= set(first), sorted(first)
    varying = {}
    for i, batch in enumerate(batches[1:], start=1):
        assert set(batch) == set(first), f"batch {i} launched other kernels"
        for name, keys in batch.items():
            new = keys - first[name]
            if new:
                fixed = set.intersection(*(set(key) for key in first[name] | keys))
                varying[(i, name)] = sorted({a[0] for key in new for a in key if a not in fixed})
    assert not varying, f"(batch, kernel): arguments whose compile key changed with the batch: {varying}"
