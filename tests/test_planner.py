"""The minference backend's planning and routing on fake SGLang batches (SGLang imported for its base class only).

Planner: which requests, layers and heads go sparse, the batch geometry, TP head slicing. Backend: the
sparse ``forward_extend`` on a fake paged KV pool (Triton interpreter on CPU) writes the chunk's KV first and,
with a dense-equivalent config, equals dense attention; everything else reaches the dense backend untouched.
"""

import enum
import inspect
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE, consecutive_pool, make_geometry, make_qkv, paged_kv

from sgl_minference.backend.attn_backend import MInferenceAttnBackend, build_layer_heads
from sgl_minference.backend.layer_layout import overlay_query_blocks
from sgl_minference.backend.planner import layer_heads, plan_batch
from sgl_minference.config import MInferenceConfig
from sgl_minference.patterns import HeadSet, build_a_shape, build_dense
from sgl_minference.testing import dense_attention

# After the backend module: it makes SGLang importable next to a CPU-only torch.
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend  # noqa: E402  (isort: skip)

HQ, HK, D = 4, 2, 64


def config(**fields):
    return MInferenceConfig.model_validate({"min_context": 200, "min_chunk": 16, **fields})


ALL_HEADS = HeadSet.build(list(range(HQ)), num_q_heads=HQ, num_kv_heads=HK, device=DEVICE)


def plan(cfg, seq_q, seq_k, r2t, idx):
    return plan_batch(cfg, seq_lens_q=seq_q, seq_lens_k=seq_k, req_to_token=r2t, req_pool_indices=idx,
                      all_heads=ALL_HEADS)


def pool_tables(num_requests, max_context=512):
    req_to_token = torch.zeros(num_requests + 2, max_context, dtype=torch.int32, device=DEVICE)
    return req_to_token, torch.arange(num_requests, dtype=torch.int64, device=DEVICE) + 1


# ---- planner --------------------------------------------------------------------------------------------------


def test_no_plan_when_every_request_is_below_the_gates():
    r2t, idx = pool_tables(3)
    # short context; long context but a 10-token chunk (< min_chunk); exactly at neither threshold
    assert plan(config(), [100, 10, 15], [150, 400, 199], r2t, idx) is None


def test_ragged_batch_with_prefixes_plans_every_request():
    r2t, idx = pool_tables(3)
    seq_q, seq_k = [70, 200, 16], [270, 200, 300]
    p = plan(config(), seq_q, seq_k, r2t, idx)
    assert p.sparse_requests == [True, True, True]
    assert p.dense_layout is None and p.dense_blocks is None
    expected = make_geometry(seq_q, [200, 0, 284])
    for name in ("cu_seqlens_q", "seq_lens_k", "prefix_lens", "qb_request", "qb_row"):
        assert torch.equal(getattr(p.geom, name), getattr(expected, name)), name
    assert p.geom.seq_lens_q_cpu == seq_q and p.geom.seq_lens_k_cpu == seq_k
    assert p.req_to_token is r2t and p.req_pool_indices is idx


def test_mixed_batch_routes_short_requests_to_dense_layouts():
    r2t, idx = pool_tables(4)
    # long; short context; short extend (8 new tokens) against a long prefix; long
    seq_q, seq_k = [130, 70, 8, 64], [330, 70, 1000, 64 + 300]
    p = plan(config(), seq_q, seq_k, r2t, idx)
    assert p.sparse_requests == [True, False, False, True]
    # query blocks: request 0 -> 0..2, request 1 -> 3..4, request 2 -> 5, request 3 -> 6
    assert p.dense_blocks.tolist() == [3, 4, 5]
    assert p.geom.num_query_blocks == 7
    sub = make_geometry([70, 8], [0, 992])  # the short requests alone: every causal key
    dense = build_dense(sub, ALL_HEADS)
    for got, want in zip(p.dense_layout.to_dense(sub), dense.to_dense(sub)):
        assert torch.equal(got, want) and bool(want[:, :, -1].any())


def test_thresholds_are_inclusive():
    r2t, idx = pool_tables(1)
    assert plan(config(), [16], [200], r2t, idx).sparse_requests == [True]


def test_layer_heads_group_by_pattern_with_budgets():
    cfg = config(heads={"1": {"0": {"type": "a_shape", "sink": 4, "local": 64}, "2": {"type": "dense"},
                              "3": {"type": "block_sparse", "topk": 3}}},
                 default={"type": "vertical_slash", "vertical": 10, "slash": 20})
    lh = layer_heads(cfg, layer_id=1, head_start=0, num_q_heads=HQ, num_kv_heads=HK, device=DEVICE)
    groups = {g.kind: g.heads for g in lh.groups}
    assert set(groups) == {"a_shape", "vertical_slash", "dense", "block_sparse"}
    assert groups["a_shape"].heads == [0] and groups["a_shape"].budget_max == {"sink": 4, "local": 64}
    assert groups["vertical_slash"].heads == [1] and groups["vertical_slash"].budgets["slash"].tolist() == [20]
    assert groups["block_sparse"].budgets["topk"].tolist() == [3]
    assert groups["block_sparse"].kv_head.tolist() == [1]  # GQA: query head 3 of 4 reads KV head 1 of 2
    assert not lh.all_dense
    assert layer_heads(cfg, layer_id=0, head_start=0, num_q_heads=HQ, num_kv_heads=HK, device=DEVICE).groups[0].kind \
        == "vertical_slash"


def test_all_dense_layer_is_marked():
    cfg = config(heads={"0": {str(h): {"type": "dense"} for h in range(HQ)}})
    assert layer_heads(cfg, layer_id=0, head_start=0, num_q_heads=HQ, num_kv_heads=HK, device=DEVICE).all_dense
    assert not layer_heads(cfg, layer_id=1, head_start=0, num_q_heads=HQ, num_kv_heads=HK, device=DEVICE).all_dense


def test_tensor_parallel_ranks_slice_global_heads():
    # 8 global query heads over 2 attention-TP ranks: rank 1 holds global heads 4..7 as local 0..3
    cfg = config(num_layers=2, num_heads=8, heads={"1": {"5": {"type": "dense"}, "2": {"type": "dense"}}})
    rank0, _ = build_layer_heads(cfg, num_layers=2, num_q_heads=4, num_kv_heads=1, attn_tp_rank=0, device=DEVICE)
    rank1, heads1 = build_layer_heads(cfg, num_layers=2, num_q_heads=4, num_kv_heads=1, attn_tp_rank=1,
                                      device=DEVICE)
    assert heads1.heads == [0, 1, 2, 3] and heads1.kv_head.tolist() == [0, 0, 0, 0]
    dense0 = [g.heads.heads for g in rank0[1].groups if g.kind == "dense"]
    dense1 = [g.heads.heads for g in rank1[1].groups if g.kind == "dense"]
    assert dense0 == [[2]] and dense1 == [[1]]
    assert [g.kind for g in rank1[0].groups] == ["vertical_slash"]


def test_overlay_replaces_only_the_given_query_blocks():
    geom = make_geometry([130, 70], [200, 0])
    a_shape = build_a_shape(geom, HeadSet.build(list(range(HQ)), num_q_heads=HQ, num_kv_heads=HK, device=DEVICE,
                                                sink=[2] * HQ, local=[64] * HQ))
    sub = make_geometry([70], [0])
    dense = build_dense(sub, HeadSet.build(list(range(HQ)), num_q_heads=HQ, num_kv_heads=HK, device=DEVICE))
    merged = overlay_query_blocks(a_shape, torch.tensor([3, 4], device=DEVICE), dense)
    masks, base = merged.to_dense(geom), a_shape.to_dense(geom)
    assert torch.equal(masks[0], base[0])
    assert torch.equal(masks[1], dense.to_dense(sub)[0])
    assert torch.equal(masks[1], torch.ones(HQ, 70, 70, dtype=torch.bool).tril())  # every causal key


# ---- backend on a fake SGLang batch ---------------------------------------------------------------------------


class Mode(enum.Enum):
    EXTEND = 1
    DECODE = 2
    TARGET_VERIFY = 3


class FakePool:
    """SGLang's MHA token pool as the backend uses it: one ``[slots, Hk, D]`` K and V buffer per layer."""

    def __init__(self, k, v):
        self.k, self.v, self.writes = k, v, []

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, k_scale=None, v_scale=None):
        self.writes.append(layer.layer_id)
        self.k[loc.long()] = cache_k
        self.v[loc.long()] = cache_v

    def get_kv_buffer(self, layer_id):
        return self.k, self.v


class FakeDense:
    """Records what reaches the dense backend."""

    def __init__(self):
        self.calls, self.forward_metadata, self.needs_cpu_seq_lens = [], "dense-metadata", True

    def init_forward_metadata(self, forward_batch):
        self.calls.append("init_forward_metadata")

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("forward_extend", layer.layer_id, tuple(kwargs)))
        return torch.full_like(q, -7.0)

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("forward", layer.layer_id))
        return torch.full_like(q, -7.0)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.calls.append(("forward_decode", layer.layer_id))
        return torch.full_like(q, -7.0)


def fake_layer(layer_id, **over):
    fields = dict(layer_id=layer_id, tp_q_head_num=HQ, tp_k_head_num=HK, head_dim=D, qk_head_dim=D, v_head_dim=D,
                  scaling=1 / math.sqrt(D), logit_cap=0.0, sliding_window_size=-1, is_cross_attention=False,
                  attn_type=SimpleNamespace(value="decoder"), k_scale=None, v_scale=None)
    return SimpleNamespace(**{**fields, **over})


def fake_batch(seq_q, prefix, *, mode=Mode.EXTEND, seed=0, runs=None):
    """A ForwardBatch-like extend batch over a shuffled pool whose chunk slots hold NaN until written; the requests
    ``runs`` marks get consecutive slots instead (``conftest.consecutive_pool``)."""
    geom = make_geometry(seq_q, prefix)
    q, k, v = make_qkv(geom, HQ, HK, D, torch.float16, seed=seed)
    full = paged_kv(k, v, geom.seq_lens_k_cpu, seed=seed)
    if runs is not None:
        full = consecutive_pool(full, geom, runs)
    r2t, idx = full.req_to_token, full.req_pool_indices
    out_cache_loc = torch.cat([r2t[idx[r], p: p + s] for r, (p, s) in enumerate(zip(prefix, seq_q))]).long()
    pool = FakePool(full.k.clone(), full.v.clone())
    pool.k[out_cache_loc] = float("nan")
    pool.v[out_cache_loc] = float("nan")
    chunk = torch.cat([torch.arange(s0, s0 + s) for s0, s in zip(
        [sum(geom.seq_lens_k_cpu[:r]) + prefix[r] for r in range(len(seq_q))], seq_q)])
    batch = SimpleNamespace(forward_mode=mode, extend_seq_lens_cpu=list(seq_q),
                            seq_lens_cpu=torch.tensor(geom.seq_lens_k_cpu), req_pool_indices=idx,
                            out_cache_loc=out_cache_loc)
    return batch, geom, q, k[chunk.to(k.device)], v[chunk.to(k.device)], pool, full


def make_backend(cfg, pool, req_to_token, num_layers=2):
    layers, all_heads = build_layer_heads(cfg, num_layers=num_layers, num_q_heads=HQ, num_kv_heads=HK,
                                          attn_tp_rank=0, device=DEVICE)
    return MInferenceAttnBackend(dense=FakeDense(), config=cfg, layers=layers, all_heads=all_heads,
                                 token_to_kv_pool=pool, req_to_token=req_to_token, head_dim=D)


# Every pattern type with budgets covering the whole context: exact dense attention.
DENSE_EQUIVALENT = dict(default={"type": "vertical_slash", "vertical": 4096, "slash": 4096}, forced_sink=2,
                        forced_local=2, heads={"0": {"1": {"type": "a_shape", "sink": 4096, "local": 4096},
                                                     "2": {"type": "block_sparse", "topk": 64},
                                                     "3": {"type": "dense"}}})


@pytest.mark.parametrize("seq_q,prefix,runs", [([130, 30], [150, 0], None), ([64, 8, 100], [200, 300, 120], None),
                                               ([64, 8, 100], [200, 300, 120], [True, False, True])])
def test_sparse_forward_extend_equals_dense_attention(seq_q, prefix, runs):
    batch, geom, q, k, v, pool, full = fake_batch(seq_q, prefix, runs=runs)
    backend = make_backend(config(**DENSE_EQUIVALENT), pool, full.req_to_token)
    backend.init_forward_metadata(batch)
    assert backend.dense.calls == ["init_forward_metadata"]
    assert (backend._plan.run_start >= 0).tolist() == (runs or [False] * len(seq_q))  # the plan found the runs
    for layer_id in (0, 1):
        out = backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(layer_id), batch)
        assert out.shape == (q.shape[0], HQ * D)
        ref, _ = dense_attention(q, full, geom, sm_scale=1 / math.sqrt(D))
        torch.testing.assert_close(out.view_as(q).float(), ref.float(), atol=2e-3, rtol=2e-3)
    assert pool.writes == [0, 1]  # the chunk went into the pool before the pool was read
    assert torch.equal(pool.k[batch.out_cache_loc], k) and torch.equal(pool.v[batch.out_cache_loc], v)
    assert backend.dense.calls == ["init_forward_metadata"]


def test_no_save_kv_cache_leaves_the_pool_alone():
    batch, geom, q, k, v, pool, full = fake_batch([70], [200])
    pool.k.copy_(full.k)
    pool.v.copy_(full.v)
    backend = make_backend(config(**DENSE_EQUIVALENT), pool, full.req_to_token)
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(0), batch, save_kv_cache=False)
    assert pool.writes == []
    ref, _ = dense_attention(q, full, geom, sm_scale=1 / math.sqrt(D))
    torch.testing.assert_close(out.view_as(q).float(), ref.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("layer_over,kwargs", [
    (dict(logit_cap=30.0), {}),
    (dict(sliding_window_size=128), {}),
    (dict(is_cross_attention=True), {}),
    (dict(attn_type=SimpleNamespace(value="encoder_only")), {}),
    (dict(v_head_dim=32), {}),
    (dict(head_dim=96, qk_head_dim=96, v_head_dim=96), {}),  # the kernels have no 96: never reach them
    ({}, {"sinks": torch.zeros(HQ)}),
])
def test_unsupported_layers_run_dense(layer_over, kwargs):
    batch, _, q, k, v, pool, full = fake_batch([70], [200])
    backend = make_backend(config(), pool, full.req_to_token)
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(0, **layer_over), batch, **kwargs)
    assert bool((out == -7).all()) and pool.writes == []
    assert backend.dense.calls[-1] == ("forward_extend", 0, tuple(kwargs))


def test_dense_routing_for_short_batches_dense_layers_and_other_modes():
    batch, _, q, k, v, pool, full = fake_batch([70], [20])  # context 90 < min_context
    cfg = config(heads={"1": {str(h): {"type": "dense"} for h in range(HQ)}})
    backend = make_backend(cfg, pool, full.req_to_token)
    backend.init_forward_metadata(batch)
    flat = q.reshape(q.shape[0], -1)
    backend.forward_extend(flat, k, v, fake_layer(0), batch)
    long_batch = fake_batch([70], [200])[0]
    backend.init_forward_metadata(long_batch)
    backend.forward_extend(flat, k, v, fake_layer(1), long_batch)  # every head of layer 1 is dense
    backend.forward_extend(flat, k, v, fake_layer(0), batch)  # a batch the plan was not made for
    verify = SimpleNamespace(**{**vars(long_batch), "forward_mode": Mode.TARGET_VERIFY})
    backend.init_forward_metadata(verify)
    backend.forward_extend(flat, k, v, fake_layer(0), verify)
    backend.forward_decode(flat, k, v, fake_layer(0), verify)
    backend.forward(flat, k, v, fake_layer(0), verify)
    assert [c for c in backend.dense.calls if c != "init_forward_metadata"] == [
        ("forward_extend", 0, ()), ("forward_extend", 1, ()), ("forward_extend", 0, ()), ("forward_extend", 0, ()),
        ("forward_decode", 0), ("forward", 0)]
    assert pool.writes == []


def test_the_attributes_sglang_uses_are_the_dense_backends():
    pool = FakePool(torch.zeros(1, HK, D), torch.zeros(1, HK, D))
    backend = make_backend(config(), pool, torch.zeros(1, 8, dtype=torch.int32, device=DEVICE))
    assert backend.forward_metadata == "dense-metadata" and backend.needs_cpu_seq_lens
    backend.prefill_attention_backend_str = "minference"  # SGLang stamps this after construction
    assert backend.dense.prefill_attention_backend_str == "minference"
    with pytest.raises(AttributeError):
        backend.no_such_attribute
    backend.forward_metadata = None  # SGLang's eager runner resets it after a forward
    assert backend.dense.forward_metadata is None


def test_other_attributes_are_not_forwarded_to_the_dense_backend():
    pool = FakePool(torch.zeros(1, HK, D), torch.zeros(1, HK, D))
    backend = make_backend(config(), pool, torch.zeros(1, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(AttributeError):
        backend.calls  # the dense backend has it; this class does not name it
    backend.scratch = 1
    assert backend.scratch == 1 and not hasattr(backend.dense, "scratch")


class FullDense(FakeDense):
    """Every method of SGLang's base class, each recording its name and arguments."""

    def __getattr__(self, name):
        if not hasattr(AttentionBackend, name) or name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs)) or name


def test_every_base_class_method_reaches_the_dense_backend():
    pool = FakePool(torch.zeros(1, HK, D), torch.zeros(1, HK, D))
    backend = make_backend(config(), pool, torch.zeros(1, 8, dtype=torch.int32, device=DEVICE))
    backend.dense = FullDense()
    own = {"init_forward_metadata", "forward", "forward_extend", "forward_decode"}  # tested above
    methods = [n for n, f in vars(AttentionBackend).items() if callable(f) and not n.startswith("_") and n not in own]
    assert methods  # the base class of SGLang 0.5.17 has a dozen
    for name in methods:
        params = [p for p in inspect.signature(getattr(AttentionBackend, name)).parameters.values()][1:]
        args = [f"arg-{p.name}" for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
        kwargs = {p.name: f"kw-{p.name}" for p in params if p.kind is p.KEYWORD_ONLY}
        assert getattr(backend, name)(*args, **kwargs) == name, name
        called, got_args, got_kwargs = backend.dense.calls[-1]
        assert called == name and set(got_args) | set(got_kwargs.values()) >= set(args) | set(kwargs.values()), name
