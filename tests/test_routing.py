"""Per-layer routing to the dense backend (backend/routing.py): the cost model, the non-blocking counters, and
the backend sending a measured-dense layer of the next batch to the dense backend."""

import time

import pytest
import torch
from conftest import DEVICE, make_geometry, requires_cuda
from test_planner import DENSE_EQUIVALENT, HQ, config, fake_batch, fake_layer, make_backend

from sgl_minference.backend.routing import DenseRouter, causal_keys_per_block
from sgl_minference.patterns import HeadSet, build_a_shape
from sgl_minference.testing import causal_masks, full_layout


@pytest.mark.parametrize("seq_q,prefix", [([64], [0]), ([70, 1, 130], [130, 64, 5]), ([200], [1000])])
def test_causal_keys_per_block_counts_every_causal_pair(seq_q, prefix):
    """The mean over query blocks of the keys each row of the block sees (what a row of a dense layout loads)."""
    geom = make_geometry(seq_q, prefix)
    per_block = [float(m.squeeze(0)[row: row + 64].sum()) / min(64, m.shape[-2] - row)
                 for m in causal_masks(geom, 1) for row in range(0, m.shape[-2], 64)]
    assert len(per_block) == geom.num_query_blocks
    assert causal_keys_per_block(seq_q, geom.seq_lens_k_cpu) == pytest.approx(sum(per_block) / len(per_block))


def a_shape(geom, local=64):
    heads = HeadSet.build(list(range(HQ)), num_q_heads=HQ, num_kv_heads=HQ, device=DEVICE,
                          sink=[16] * HQ, local=[local] * HQ)
    return build_a_shape(geom, heads)


def run(router, layer_id, layout, *, index_s=0.0, attn_s=0.003):
    """One sparse layer through the router's wrappers: building ``layout`` takes ``index_s``, attending ``attn_s``.

    No sleep for a quick index: ``time.sleep(0)`` releases the GIL, and another thread of the test process may hold
    it for the switch interval (5 ms), which made a "quick" index as slow as the attention."""
    def build():
        if index_s:
            time.sleep(index_s)
        return layout

    timed_build, timed_attend = router.timed(layer_id, build, lambda _: time.sleep(attn_s))
    timed_attend(timed_build())


def test_a_layer_measured_dense_goes_dense_and_a_sparse_one_stays():
    router = DenseRouter([0, 1], cost_ratio=2.5, device=DEVICE)
    geom = make_geometry([256], [768])  # 1024 keys
    assert router.plan(geom) == set()  # nothing measured yet: both run sparse
    run(router, 0, full_layout(geom, HQ, DEVICE))
    run(router, 1, a_shape(geom))
    assert router.plan(make_geometry([256], [1024])) == {0}
    # layer 0 kept every causal key: 896 per query block on average; layer 1 one range + the sink columns
    assert router.keys_per_block[0] == pytest.approx(causal_keys_per_block([256], [1024]) + 32, abs=64)
    assert router.keys_per_block[1] < 300


def test_a_layer_whose_index_outweighs_what_its_layout_saves_goes_dense():
    """Few keys, but an index that takes 10x the attention: the index time, in keys at the attention's measured
    rate, tips the cost over dense; the same layout with a quick index stays sparse."""
    router = DenseRouter([0, 1], cost_ratio=2.5, device=DEVICE)
    geom = make_geometry([256], [768])
    router.plan(geom)
    run(router, 0, a_shape(geom), attn_s=0.005)
    run(router, 1, a_shape(geom), index_s=0.05, attn_s=0.005)
    assert router.plan(make_geometry([256], [1024])) == {1}
    assert router.index_keys[0] < 0.2 * router.keys_per_block[0]
    assert router.index_keys[1] > 5 * router.keys_per_block[1]


@pytest.mark.gpu
@requires_cuda
def test_on_the_gpu_the_phases_are_timed_on_the_device_and_read_without_waiting():
    """CUDA events, not host time: the index spins the GPU ~10x longer than the attention while the host returns at
    once; the figures appear only once the device has passed the batch (``poll`` never waits)."""
    geom = make_geometry([256], [768], device="cuda")
    layout = a_shape(geom)
    # one untimed pass first: the first launch of a kernel loads its module (CUDA lazy loading) while the device
    # idles between the marks; on the H200 (2026-12-04) that put ~13 ms into layer 0's 0.1 ms index phase
    warm = DenseRouter([0], cost_ratio=2.5, device="cuda")
    warm.plan(geom)
    build, attend = warm.timed(0, lambda: torch.cuda._sleep(1000) or layout, lambda _: torch.cuda._sleep(1000))
    attend(build())
    router = DenseRouter([0, 1], cost_ratio=2.5, device="cuda")
    router.plan(geom)
    torch.cuda.synchronize()
    spin = 20_000_000  # GPU clock cycles: ~10 ms on an H200
    for layer_id, index_cycles in ((0, spin // 100), (1, 10 * spin)):
        build, attend = router.timed(layer_id, lambda c=index_cycles: torch.cuda._sleep(c) or layout,
                                     lambda _: torch.cuda._sleep(spin))
        attend(build())
    router.poll()  # the device is still spinning: nothing read yet
    assert router.keys_per_block == [None, None]
    torch.cuda.synchronize()
    assert router.plan(make_geometry([256], [1024], device="cuda")) == {1}
    assert router.index_keys[0] < 0.05 * router.keys_per_block[0]
    assert router.index_keys[1] == pytest.approx(10 * router.keys_per_block[1], rel=0.2)


def test_a_dense_routed_layer_runs_sparse_again_once_the_context_outgrows_its_figure():
    router = DenseRouter([0], cost_ratio=2.5, device=DEVICE)
    geom = make_geometry([256], [768])
    router.plan(geom)
    run(router, 0, full_layout(geom, HQ, DEVICE))
    assert router.plan(make_geometry([256], [1500])) == {0}  # 2.5 x ~900 keys > ~1630 causal keys
    assert router.plan(make_geometry([256], [4000])) == set()  # 2.5 x ~900 < ~4130: worth a sparse try


def test_counts_of_a_batch_whose_last_sparse_layer_did_not_run_are_read_at_the_next_plan():
    router = DenseRouter([0, 1], cost_ratio=2.5, device=DEVICE)
    geom = make_geometry([256], [768])
    router.plan(geom)  # layer 1 closes the batch ...
    run(router, 0, full_layout(geom, HQ, DEVICE))  # ... but only layer 0 ran sparse
    assert router.keys_per_block == [None, None]
    assert router.plan(geom) == {0}
    assert router.keys_per_block[1] is None  # never measured: stays sparse


def test_counters_start_afresh_each_batch():
    router = DenseRouter([0], cost_ratio=2.5, device=DEVICE)
    big, small = make_geometry([256], [768]), make_geometry([256], [768])
    router.plan(big)
    run(router, 0, full_layout(big, HQ, DEVICE))
    router.plan(make_geometry([64], [100000]))  # far longer context: layer 0 is tried sparse again
    run(router, 0, a_shape(small))
    router.plan(small)
    assert router.keys_per_block[0] < 300  # the a-shape batch alone, not summed with the dense one


@pytest.mark.parametrize("routing", [True, False])
def test_backend_sends_a_measured_dense_layer_to_the_dense_backend_in_the_next_batch(routing):
    batch, geom, q, k, v, pool, full = fake_batch([70], [200])
    backend = make_backend(config(**DENSE_EQUIVALENT, dense_routing=routing), pool, full.req_to_token)
    for step in range(2):
        backend.init_forward_metadata(batch)
        for layer_id in (0, 1):
            backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(layer_id), batch)
    # Dense-equivalent budgets keep every key: from the second batch on, routing sends both layers dense.
    dense_calls = [c for c in backend.dense.calls if c != "init_forward_metadata"]
    assert dense_calls == ([("forward_extend", 0, ()), ("forward_extend", 1, ())] if routing else [])
