"""Pattern builders feeding the sparse kernel: the output is exactly the attention the built layout means."""

import math

import pytest
import torch
from conftest import DEVICE, make_geometry, make_qkv

from sgl_minference.kernels import sparse_attention
from sgl_minference.layout import KVSource
from sgl_minference.patterns import (HeadSet, build_a_shape, build_block_sparse, build_dense, build_vertical_slash,
                                     concat_heads)
from sgl_minference.testing import dense_attention, masked_attention

HQ, HK, D = 8, 2, 64


def batch(seq_q, prefix, seed=0):
    geom = make_geometry(seq_q, prefix)
    q, k, v = make_qkv(geom, HQ, HK, D, torch.float16, seed=seed)
    return geom, q, KVSource.packed(k, v, geom.seq_lens_k_cpu)


def heads(ids, **budgets):
    return HeadSet.build(ids, num_q_heads=HQ, num_kv_heads=HK, device=DEVICE, **budgets)


def assert_matches_layout(q, kv, geom, layout):
    o, lse = sparse_attention(q, kv, layout, geom, sm_scale=1 / math.sqrt(D))
    ref_o, ref_lse = masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=1 / math.sqrt(D))
    torch.testing.assert_close(o.float(), ref_o.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)


BATCHES = [([1, 70, 130], [99, 0, 170]), ([200], [0]), ([64, 3], [64, 300])]


@pytest.mark.parametrize("seq_q,prefix", BATCHES)
def test_dense_layout_reproduces_dense_attention(seq_q, prefix):
    geom, q, kv = batch(seq_q, prefix)
    o, lse = sparse_attention(q, kv, build_dense(geom, heads(list(range(HQ)))), geom, sm_scale=1 / math.sqrt(D))
    ref_o, ref_lse = dense_attention(q, kv, geom, sm_scale=1 / math.sqrt(D))
    torch.testing.assert_close(o.float(), ref_o.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("seq_q,prefix", BATCHES)
def test_each_pattern_through_the_kernel(seq_q, prefix):
    geom, q, kv = batch(seq_q, prefix, seed=1)
    vs = build_vertical_slash(q, kv, geom, heads(list(range(HQ)), vertical=[5] * HQ, slash=[3, 9] * (HQ // 2)),
                              sm_scale=1 / math.sqrt(D), forced_sink=2, forced_local=2)
    assert_matches_layout(q, kv, geom, vs)
    a = build_a_shape(geom, heads(list(range(HQ)), sink=[4] * HQ, local=[70] * HQ))
    assert_matches_layout(q, kv, geom, a)
    b = build_block_sparse(q, kv, geom, heads(list(range(HQ)), topk=[2] * HQ))
    assert_matches_layout(q, kv, geom, b)


def test_mixed_patterns_in_one_layer():
    geom, q, kv = batch([130, 5], [40, 200], seed=2)
    groups = [[0, 5, 6], [1, 2], [3, 4, 7]]
    parts = [build_vertical_slash(q, kv, geom, heads(groups[0], vertical=[8] * 3, slash=[4] * 3),
                                  sm_scale=1 / math.sqrt(D)),
             build_a_shape(geom, heads(groups[1], sink=[16, 64], local=[64, 100])),
             build_block_sparse(q, kv, geom, heads(groups[2], topk=[1, 2, 3]))]
    assert_matches_layout(q, kv, geom, concat_heads(parts, groups, HQ))
