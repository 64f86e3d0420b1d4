"""The issue-12 probe kernel (``benchmarks.tile_bench``) computes causal attention in every load mode and tile
shape it is timed in, so its TFLOP/s are those of a correct kernel."""

import pytest
import torch
from conftest import DEVICE, make_geometry, make_qkv

from benchmarks.tile_bench import probe_attention
from sgl_minference.layout import KVSource
from sgl_minference.testing import dense_attention


@pytest.mark.parametrize("load", ["ptr", "gather", "tma"])
@pytest.mark.parametrize("block_m,block_n", [(128, 64), (128, 128), (64, 64)])
def test_probe_matches_dense_causal_attention(load, block_m, block_n):
    geom = make_geometry([256], [0])
    q, k, v = make_qkv(geom, 4, 2, 64, torch.float32, seed=3)
    ref, _ = dense_attention(q, KVSource.packed(k, v, [256]), geom, sm_scale=0.125)
    rows = None
    if load == "gather":  # key j stored at pool row rows[j]
        rows = torch.randperm(256, generator=torch.Generator().manual_seed(1)).to(device=DEVICE, dtype=torch.int32)
        kp, vp = torch.empty_like(k), torch.empty_like(v)
        kp[rows.long()], vp[rows.long()] = k, v
        k, v = kp, vp
    out = probe_attention(q, k, v, sm_scale=0.125, block_m=block_m, block_n=block_n, stages=2, load=load, ws=False,
                          rows=rows)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_m=128, block_n=64, load="ptr"), "seq"),  # 192 tokens: not whole 128-row blocks
    (dict(block_m=64, block_n=64, load="paged"), "load"),
    (dict(block_m=64, block_n=64, load="gather"), "rows"),
])
def test_probe_argument_errors(kwargs, match):
    q = torch.zeros(192, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        probe_attention(q, q, q, sm_scale=1.0, stages=2, ws=False, **kwargs)
