"""benchmarks/structure_capture.py on CPU without a model: its plain-torch estimator scores equal the product's
estimation kernel, its per-head measures read constructed picks as documented, and its chunk share equals the
pair count of the layout the product's conversion builds from the same picks."""

import numpy as np
import pytest
import torch
from conftest import make_geometry, make_qkv

from benchmarks import structure_capture as sc
from sgl_minference.backend.stats import request_pairs
from sgl_minference.kernels.estimate import lastq_scores
from sgl_minference.layout import BatchGeometry, KVSource, causal_pairs
from sgl_minference.patterns.convert import indices_to_layout


def test_estimator_scores_match_the_estimation_kernel():
    geom = make_geometry([200], [0], device="cpu")
    q, k, v = make_qkv(geom, 4, 2, 64, torch.float16, seed=3, device="cpu")
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    heads = torch.arange(4, dtype=torch.int32)
    col, diag = lastq_scores(q, kv, geom, heads, heads // 2, sm_scale=0.125)
    ref_col, ref_diag = sc.estimator_scores(q.transpose(0, 1), k.transpose(0, 1), 0.125)
    torch.testing.assert_close(col[0], ref_col, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(diag[0], ref_diag, atol=2e-3, rtol=1e-3)


def test_head_structure_reads_band_clusters_and_recent_columns():
    n = 4096
    band = np.arange(120)  # forced 100 + 20 more
    far = np.concatenate([np.arange(1000, 1040, 4), np.arange(3000, 3030, 3)])  # two clusters: 10 x 4 apart, 10 x 3
    offsets = np.sort(np.concatenate([band, far]))
    cols = np.sort(np.concatenate([np.arange(30), n - 1 - np.arange(10), [500, 501, 502]]))
    got = sc.head_structure(cols, offsets, n, forced_sink=30, forced_local=100)
    assert got["slash_local"] == pytest.approx(20 / 40)
    assert got["slash_cluster"] == 10 and got["slash_gap"] == pytest.approx(3.5)
    assert got["vertical_recent"] == pytest.approx(10 / 13) and got["vertical_run"] == 3


def test_power_law_fit_recovers_the_exponent():
    rng = np.random.default_rng(0)
    lo, hi = 100, 100000
    for alpha in (0.0, 1.0, 1.5):
        u = rng.random(4000)
        a, c = lo + 1.0, hi + 1.0
        x = a * (c / a) ** u if alpha == 1.0 else (a ** (1 - alpha) + u * (c ** (1 - alpha) - a ** (1 - alpha))) ** (
            1 / (1 - alpha))
        assert sc.power_law_fit(x - 1, lo, hi) == pytest.approx(alpha, abs=0.1)


def test_chunk_share_equals_the_conversions_pair_count():
    n, chunk = 2048, 256
    rng = np.random.default_rng(1)
    cols = np.sort(rng.choice(n, 40, replace=False))
    offs = np.sort(rng.choice(n, 150, replace=False))[::-1].copy()
    geom = BatchGeometry.build([chunk], [n], "cpu")
    layout = indices_to_layout(torch.tensor(cols, dtype=torch.int32).view(1, 1, -1),
                               torch.tensor(offs, dtype=torch.int32).view(1, 1, -1), geom)
    attended = int(request_pairs(layout, geom)[0][0])
    assert sc.chunk_share(cols, offs, n, chunk) == pytest.approx(attended / causal_pairs(chunk, n, 1))
