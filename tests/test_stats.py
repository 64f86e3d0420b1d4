"""The backend's opt-in instruments on CPU: pair counting against ``SparseLayout.to_dense``, the statistics file
(``SGL_MINFERENCE_STATS``) written from a sparse forward, and the synthetic index structure
(``SGL_MINFERENCE_SYNTHETIC``): its draws keep the estimator's contract and budgets, cluster as documented, and
reach the layout the kernel runs; both off by default."""

import dataclasses
import json
import math

import pytest
import torch
from conftest import DEVICE
from random_layouts import brute_visited, random_range_column_layout
from test_planner import DENSE_EQUIVALENT, HK, HQ, D, FakeDense, config, fake_batch, fake_layer

from sgl_minference.backend import stats, synthetic
from sgl_minference.backend.attn_backend import MInferenceAttnBackend, build_layer_heads
from sgl_minference.backend.layer_layout import layer_layout
from sgl_minference.layout import SENTINEL, BatchGeometry, causal_pairs
from sgl_minference.patterns import HeadSet
from sgl_minference.patterns.convert import indices_to_layout
from sgl_minference.testing import masked_attention

# ---- pair counting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_q,prefix", [([130, 64, 1], [170, 0, 96]), ([200], [0]), ([7, 65], [300, 2])])
@pytest.mark.parametrize("seed", [0, 1])
def test_request_pairs_match_the_dense_mask(seq_q, prefix, seed):
    geom = BatchGeometry.build(seq_q, [p + s for p, s in zip(prefix, seq_q)], "cpu")
    layout = random_range_column_layout(geom, heads=3, seed=seed)
    attended, visited = stats.request_pairs(layout, geom)
    assert attended.tolist() == [int(m.sum()) for m in layout.to_dense(geom)]
    assert visited.tolist() == brute_visited(layout, geom)


def test_causal_pairs_count_the_bottom_right_triangle():
    mask = torch.ones(70, 100, dtype=torch.bool).tril(30)
    assert causal_pairs(70, 100, 3) == 3 * int(mask.sum())


# ---- the statistics file ----------------------------------------------------------------------------------------


def backend_for(cfg, pool, req_to_token, environ, num_layers=2):
    layers, all_heads = build_layer_heads(cfg, num_layers=num_layers, num_q_heads=HQ, num_kv_heads=HK,
                                          attn_tp_rank=0, device=DEVICE)
    return MInferenceAttnBackend(dense=FakeDense(), config=cfg, layers=layers, all_heads=all_heads,
                                 token_to_kv_pool=pool, req_to_token=req_to_token, head_dim=D, environ=environ)


SPARSE = dict(default={"type": "a_shape", "sink": 16, "local": 64},
              heads={"0": {"1": {"type": "vertical_slash", "vertical": 8, "slash": 70}}})


def test_instruments_are_off_by_default(monkeypatch):
    monkeypatch.delenv(stats.ENV_VAR, raising=False)
    monkeypatch.delenv(synthetic.ENV_VAR, raising=False)
    batch, _, q, k, v, pool, full = fake_batch([70], [200])
    backend = backend_for(config(), pool, full.req_to_token, environ=None)
    assert backend._stats is None and backend._layer_layout is layer_layout


def test_stats_file_has_one_line_per_sparse_batch(tmp_path):
    path = tmp_path / "stats.jsonl"
    # Request 1 (context 30) is below min_context: the plan gives it an exact dense layout.
    batch, geom, q, k, v, pool, full = fake_batch([130, 30], [150, 0])
    cfg = config(**SPARSE)
    backend = backend_for(cfg, pool, full.req_to_token, environ={stats.ENV_VAR: str(path)})
    plain = backend_for(cfg, pool, full.req_to_token, environ={})
    flat = q.reshape(q.shape[0], -1)
    backend.init_forward_metadata(batch)
    plain.init_forward_metadata(batch)
    outs = [backend.forward_extend(flat, k, v, fake_layer(layer), batch) for layer in (0, 1)]
    assert path.read_text().count("\n") == 1  # written when the last layer ran, without waiting for more
    for layer, out in zip((0, 1), outs):  # recording changes nothing in the result
        assert torch.equal(out, plain.forward_extend(flat, k, v, fake_layer(layer), batch))
    line = json.loads(path.read_text())
    assert line["seq_lens_q"] == [130, 30] and line["seq_lens_k"] == [280, 30] and line["sparse"] == [True, False]
    assert line["structure"] == "dummy" and line["num_q_heads"] == HQ
    assert line["causal_pairs"] == [causal_pairs(130, 280, HQ), causal_pairs(30, 30, HQ)]
    assert line["pool_run"] == (backend._plan.run_start >= 0).tolist()
    assert [e["layer"] for e in line["layers"]] == [0, 1]
    plan = backend._plan
    kv = plan.kv_source(pool.k, pool.v)
    for entry in line["layers"]:
        layout = layer_layout(q, kv, plan, backend.layers[entry["layer"]], cfg, sm_scale=1 / math.sqrt(D))
        assert entry["attended"] == [int(m.sum()) for m in layout.to_dense(geom)]
        assert entry["attended"][1] == line["causal_pairs"][1]  # the dense request keeps every causal pair
        assert entry["attended"][0] < line["causal_pairs"][0]
        assert entry["index_ms"] >= 0 and entry["attn_ms"] > 0
        assert all(vis >= att for vis, att in zip(entry["visited"], entry["attended"]))


def test_layers_the_routing_sends_dense_are_recorded(tmp_path):
    """A batch whose layers the per-layer routing sent to the dense backend is written with ``routed_dense`` and no
    layer entries, and the e2e summary counts those layer-chunks (and only the sparse-run lines' pairs)."""
    from benchmarks.e2e_ttft import summarize_stats

    path = tmp_path / "stats.jsonl"
    batch, _, q, k, v, pool, full = fake_batch([70], [200])
    backend = backend_for(config(**DENSE_EQUIVALENT), pool, full.req_to_token, environ={stats.ENV_VAR: str(path)})
    for _ in range(2):  # dense-equivalent budgets keep every key: the second batch routes both layers dense
        backend.init_forward_metadata(batch)
        for layer_id in (0, 1):
            backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(layer_id), batch)
    backend.init_forward_metadata(batch)  # the second batch never reached a sparse last layer: written now
    first, second = [json.loads(x) for x in path.read_text().splitlines()]
    assert first["routed_dense"] == [] and [e["layer"] for e in first["layers"]] == [0, 1]
    assert second["routed_dense"] == [0, 1] and second["layers"] == [] and second["num_q_heads"] is None
    summary = summarize_stats([first, second], [270], ttft_ms=None)
    assert summary["routed_dense_layer_chunks"] == 2 and summary["batches"] == 1 and summary["layers"] == 2
    assert summary["pool_run_chunk_share"] == float(first["pool_run"][0])
    assert summarize_stats([{**first, "pool_run": [True]}], [270], None)["pool_run_chunk_share"] == 1.0
    assert summarize_stats([{**first, "pool_run": None}], [270], None)["pool_run_chunk_share"] is None
    assert summarize_stats([second], [270], ttft_ms=None) == {"batches": 0, "routed_dense_layer_chunks": 2}


def test_a_batch_that_stops_before_the_last_layer_is_written_at_the_next_batch(tmp_path):
    path = tmp_path / "stats.jsonl"
    batch, _, q, k, v, pool, full = fake_batch([70], [200])
    backend = backend_for(config(**DENSE_EQUIVALENT), pool, full.req_to_token, environ={stats.ENV_VAR: str(path)},
                          num_layers=3)
    flat = q.reshape(q.shape[0], -1)
    backend.init_forward_metadata(batch)
    backend.forward_extend(flat, k, v, fake_layer(0), batch)
    assert not path.exists()
    backend.init_forward_metadata(batch)
    line = json.loads(path.read_text())
    assert [e["layer"] for e in line["layers"]] == [0]
    assert line["layers"][0]["attended"] == line["causal_pairs"]  # dense-equivalent budgets keep every pair


# ---- synthetic structure ----------------------------------------------------------------------------------------


STRUCT = synthetic.Structure(slash_local=0.25, slash_cluster=8, slash_gap=3, slash_alpha=1.0, vertical_recent=0.5,
                             vertical_run=2, vertical_alpha=0.5, source="test")


def vs_heads(vertical, slash):
    return HeadSet.build(list(range(len(vertical))), num_q_heads=len(vertical), num_kv_heads=1, device="cpu",
                         vertical=vertical, slash=slash)


def test_synthetic_draws_keep_the_estimator_contract_and_budgets():
    geom = BatchGeometry.build([256, 100], [4096, 150], "cpu")
    heads = vs_heads([40, 300], [200, 1000])
    cols, offs = STRUCT.draw((2, 2, 300), (2, 2, 1000), geom, heads, layer_id=0, forced_sink=10, forced_local=20)
    assert cols.shape == (2, 2, 300) and offs.shape == (2, 2, 1000) and cols.dtype == offs.dtype == torch.int32
    for b, sk in enumerate((4096, 150)):
        for h, (v_budget, s_budget) in enumerate(((40, 200), (300, 1000))):
            c = cols[b, h][cols[b, h] != SENTINEL]
            o = offs[b, h][offs[b, h] >= 0]
            assert bool((cols[b, h][len(c):] == SENTINEL).all()) and bool((offs[b, h][len(o):] == -1).all())
            assert bool((c.diff() > 0).all()) and bool((o.diff() < 0).all())  # sorted, unique
            assert c.numel() <= min(v_budget, sk) and o.numel() <= min(s_budget, sk)
            assert c.numel() >= 0.98 * min(v_budget, sk) and o.numel() >= 0.98 * min(s_budget, sk)  # repeats replaced
            assert int(c.max()) < sk and int(o.max()) < sk
            assert set(range(10)) <= set(c.tolist())  # forced sinks
            band = 20 + round(0.25 * (min(s_budget, sk) - 20))
            assert set(range(band)) <= set(o.tolist())  # forced local band + the local share, contiguous


def test_synthetic_far_diagonals_come_in_clusters_of_the_documented_shape():
    geom = BatchGeometry.build([64], [65536], "cpu")
    heads = vs_heads([100], [2000])
    band = 20 + round(0.25 * (2000 - 20))

    def far(alpha):
        structure = dataclasses.replace(STRUCT, slash_alpha=alpha)
        _, offs = structure.draw((1, 1, 100), (1, 1, 2000), geom, heads, layer_id=3, forced_sink=10,
                                 forced_local=20)
        o = offs[0, 0][offs[0, 0] >= 0].flip(0)
        return o[o >= band]

    uniform = far(0.0)
    assert (uniform.diff() == 3).float().mean() > 0.8  # clusters of 8 offsets 3 apart (7 of 8 steps)
    assert 0.35 < uniform.double().median() / 65536 < 0.65
    crowded = far(1.5)  # a steep power law puts most clusters near the band (median ~1741 before repeats)
    assert crowded.double().median() < uniform.double().median() / 8


def test_synthetic_draws_vary_by_layer_and_chunk_and_repeat_exactly():
    heads = vs_heads([100, 100], [500, 500])
    draw = lambda geom, layer: STRUCT.draw((1, 2, 100), (1, 2, 500), geom, heads, layer_id=layer,  # noqa: E731
                                           forced_sink=4, forced_local=8)
    g1, g2 = BatchGeometry.build([64], [8192], "cpu"), BatchGeometry.build([64], [8256], "cpu")
    a, b = draw(g1, 0), draw(g1, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], draw(g1, 1)[1]) and not torch.equal(a[1], draw(g2, 0)[1])
    assert not torch.equal(a[1][0, 0], a[1][0, 1])  # heads differ


def test_structure_from_the_environment(tmp_path):
    assert synthetic.Structure.from_env({}) is None and synthetic.Structure.from_env({synthetic.ENV_VAR: ""}) is None
    assert synthetic.Structure.from_env({synthetic.ENV_VAR: "default"}) == synthetic.DEFAULT
    over = synthetic.Structure.from_env({synthetic.ENV_VAR: '{"slash_cluster": 3}'})
    assert over.slash_cluster == 3 and over.slash_alpha == synthetic.DEFAULT.slash_alpha
    path = tmp_path / "fit.json"
    fields = {k: v for k, v in vars(STRUCT).items() if k not in ("seed", "source")}
    path.write_text(json.dumps({"structure": fields, "other": 1}))
    assert synthetic.Structure.from_env({synthetic.ENV_VAR: str(path)}) == synthetic.Structure(
        **fields, source=str(path))
    with pytest.raises(ValueError, match="slash_local"):
        synthetic.Structure.from_env({synthetic.ENV_VAR: '{"slash_local": 1.5}'})
    with pytest.raises(ValueError, match="slash_gap"):
        synthetic.Structure.from_env({synthetic.ENV_VAR: '{"slash_gap": 65}'})


def test_synthetic_indices_cost_fewer_ranges_than_scattered_picks():
    geom = BatchGeometry.build([128], [16384], "cpu")
    heads = vs_heads([100, 100], [800, 800])
    cols, offs = STRUCT.draw((1, 2, 100), (1, 2, 800), geom, heads, layer_id=0, forced_sink=10, forced_local=20)
    gen = torch.Generator().manual_seed(0)
    scattered = torch.rand(1, 2, 16384, generator=gen).topk(800, dim=-1).indices.sort(
        dim=-1, descending=True).values.to(torch.int32)
    clustered = indices_to_layout(cols, offs, geom)
    noisy = indices_to_layout(cols, scattered, geom)
    assert clustered.block_count.sum() * 3 < noisy.block_count.sum()
    share = lambda lay: int(stats.request_pairs(lay, geom)[0].sum()) / causal_pairs(128, 16384, 2)  # noqa: E731
    assert share(clustered) * 3 < share(noisy)


def test_backend_in_synthetic_mode_attends_the_synthetic_layout(tmp_path):
    path = tmp_path / "stats.jsonl"
    batch, geom, q, k, v, pool, full = fake_batch([130], [300])
    cfg = config(default={"type": "vertical_slash", "vertical": 12, "slash": 90}, forced_sink=4, forced_local=8,
                 heads={"0": {"0": {"type": "a_shape", "sink": 8, "local": 32}}})
    env = {synthetic.ENV_VAR: json.dumps({"slash_local": 0.0, "slash_cluster": 5, "slash_gap": 2}),
           stats.ENV_VAR: str(path)}
    backend = backend_for(cfg, pool, full.req_to_token, environ=env)
    dummy = backend_for(cfg, pool, full.req_to_token, environ={})
    backend.init_forward_metadata(batch)
    dummy.init_forward_metadata(batch)
    out = backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(0), batch)
    plan = backend._plan
    kv = plan.kv_source(pool.k, pool.v)
    scale = 1 / math.sqrt(D)
    layout = backend._layer_layout(q, kv, plan, backend.layers[0], cfg, sm_scale=scale)
    real = dummy._layer_layout(q, kv, plan, dummy.layers[0], cfg, sm_scale=scale)
    masks, real_masks = layout.to_dense(geom), real.to_dense(geom)
    assert torch.equal(masks[0][0], real_masks[0][0])  # the a_shape head is built as usual
    assert not torch.equal(masks[0][1:], real_masks[0][1:])  # vertical-slash heads: synthetic picks
    ref, _ = masked_attention(q, full, geom, masks, sm_scale=scale)
    torch.testing.assert_close(out.view_as(q).float(), ref.float(), atol=2e-3, rtol=2e-3)
    group = next(g for g in backend.layers[0].groups if g.kind == "vertical_slash")
    cols, offs = backend_structure(env).draw((1, 3, 12), (1, 3, 90), geom, group.heads, layer_id=0, forced_sink=4,
                                             forced_local=8)
    drawn = indices_to_layout(cols, offs, geom).to_dense(geom)[0]
    assert torch.equal(masks[0][1:], drawn)  # exactly the documented draw
    backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(1), batch)
    assert json.loads(path.read_text())["structure"] == "synthetic"


def backend_structure(env):
    return synthetic.Structure.from_env(env)


def test_default_structure_is_the_committed_fit():
    from pathlib import Path

    fit = json.loads((Path(__file__).parents[1] / synthetic.DEFAULT.source).read_text())["structure"]
    for name, value in fit.items():
        if name != "source":
            assert getattr(synthetic.DEFAULT, name) == pytest.approx(value, abs=1e-3), name


def test_a_batch_is_written_after_its_last_layer_that_can_run_sparse(tmp_path):
    path = tmp_path / "stats.jsonl"
    batch, _, q, k, v, pool, full = fake_batch([70], [200])
    cfg = config(heads={"1": {str(h): {"type": "dense"} for h in range(HQ)}})  # layer 1 (the last) is dense
    backend = backend_for(cfg, pool, full.req_to_token, environ={stats.ENV_VAR: str(path)})
    backend.init_forward_metadata(batch)
    backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(0), batch)
    assert [e["layer"] for e in json.loads(path.read_text())["layers"]] == [0]
