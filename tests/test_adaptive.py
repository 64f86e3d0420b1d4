"""The adaptive patterns (XAttention, FlexPrefill) against plain-torch readings of their definitions, and the
sparse kernel on their layouts against the masked reference (Triton interpreter on CPU, small shapes).

Ragged batches with cached prefixes (chunked prefill: bottom-right causal, prefixes not multiples of 64, so two
diagonal blocks), GQA and paged KV, as for the other patterns.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE, make_geometry, make_qkv, paged_kv
from test_patterns import check_invariants
from test_sparse_attention import random_layout
from test_search import tiny_gemma  # noqa: F401 (fixture)

from sgl_minference.config import DEFAULT_ESTIMATION, Estimation
from sgl_minference.kernels.sparse_attention import sparse_attention
from sgl_minference.layout import BLOCK, KVSource
from sgl_minference.patterns import HeadSet
from sgl_minference.patterns.blocks import grid, keep_by_mass, keep_ranked, layout_from_blocks, select_heads
from sgl_minference.patterns.flexprefill import build_flexprefill, js_distance, realise_flexprefill
from sgl_minference.patterns.xattention import build_xattention, realise_xattention
from sgl_minference.testing import masked_attention
from sgl_minference.registry import FlexPrefillSpec, XAttentionSpec

CASES = [  # (chunk lengths, prefixes, Hq, Hk, D, paged)
    ([70, 1, 130], [30, 64, 170], 4, 2, 64, False),
    ([64, 33], [0, 167], 4, 1, 64, True),
    ([129], [0], 2, 2, 128, False),
]


def batch(seq_q, prefix, hq, hk, d, paged, seed=0, dtype=torch.float32):
    geom = make_geometry(seq_q, prefix)
    q, k, v = make_qkv(geom, hq, hk, d, dtype, seed=seed)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu, seed=seed) if paged else KVSource.packed(k, v, geom.seq_lens_k_cpu)
    return geom, q, k, kv


def per_request(geom, q, k):
    """Each request's chunk queries ``[Sq, Hq, D]`` and keys ``[Sk, Hk, D]`` in fp32 on the CPU."""
    out, t0, k0 = [], 0, 0
    for sq, sk in zip(geom.seq_lens_q_cpu, geom.seq_lens_k_cpu):
        out.append((q[t0:t0 + sq].float().cpu(), k[k0:k0 + sk].float().cpu()))
        t0, k0 = t0 + sq, k0 + sk
    return out


def pick_by_mass(mass, candidates, share, forced=(), min_count=0):
    """The definition, one entry at a time: forced entries first, then candidates by descending mass while the
    mass taken so far is below ``share``, and at least ``min_count`` entries."""
    order = list(forced) + sorted((c for c in candidates if c not in forced), key=lambda c: -float(mass[c]))
    kept, taken = [], 0.0
    for c in order:
        if taken < share or len(kept) < min_count or c in forced:
            kept.append(c)
            taken += float(mass[c])
    return kept


def block_ranges(sq, sk):
    """Per query block of a chunk: (chunk rows, first row position, candidate key blocks, diagonal key blocks)."""
    out = []
    for row in range(0, sq, BLOCK):
        r0, p_last = sk - sq + row, sk - sq + min(row + BLOCK, sq) - 1
        cand = [b for b in range(-(-sk // BLOCK)) if b * BLOCK <= p_last]
        out.append((slice(row, min(row + BLOCK, sq)), r0, cand, [b for b in cand if b >= r0 // BLOCK]))
    return out


def causal(sq, sk):
    return torch.arange(sk).view(1, -1) <= torch.arange(sk - sq, sk).view(-1, 1)


def blocks_mask(kept_per_block, sq, sk):
    """``[Sq, Sk]`` bool: each query block's kept key blocks, causal."""
    m = torch.zeros(sq, sk, dtype=torch.bool)
    for (rows, _, _, _), kept in zip(block_ranges(sq, sk), kept_per_block):
        for b in kept:
            m[rows, b * BLOCK:(b + 1) * BLOCK] = True
    return m & causal(sq, sk)


# ---- XAttention -----------------------------------------------------------------------------------------------


def antidiagonal_mass(qh, kh, stride, sm_scale):
    """Per query block of a chunk, each key block's share of the strided softmax, straight from the definition:
    strided row g scores key group t by the antidiagonal sum of q[gS+S-1-s] . k[tS+s]."""
    sq, sk = qh.shape[0], kh.shape[0]
    prefix = sk - sq
    pad = lambda x, n: torch.cat([x, x.new_zeros(n - x.shape[0], x.shape[1])])  # noqa: E731
    qp, kp = pad(qh, -(-sq // BLOCK) * BLOCK), pad(kh, -(-sk // BLOCK) * BLOCK)
    out = []
    for rows, r0, cand, _ in block_ranges(sq, sk):
        mass = torch.zeros(-(-sk // BLOCK))
        for g in range(rows.start // stride, -(-rows.stop // stride)):
            t_max = (prefix + g * stride) // stride  # key groups starting at or before the row group's first key
            score = torch.stack([sum(qp[g * stride + stride - 1 - s] @ kp[t * stride + s] for s in range(stride))
                                 for t in range(t_max + 1)]) * sm_scale / stride
            p = score.softmax(0)
            for t in range(t_max + 1):
                mass[t * stride // BLOCK] += p[t]
        out.append(mass / mass.sum())
    return out


@pytest.mark.parametrize("seq_q,prefix,hq,hk,d,paged", CASES)
def test_xattention_layout_is_the_pattern(seq_q, prefix, hq, hk, d, paged):
    geom, q, k, kv = batch(seq_q, prefix, hq, hk, d, paged, seed=1)
    thresholds = [0.5, 0.9, 0.3, 1.0][:hq]
    heads = HeadSet.build(list(range(hq)), num_q_heads=hq, num_kv_heads=hk, device=DEVICE, threshold=thresholds,
                          stride=[8] * hq)
    layout = build_xattention(q, kv, geom, heads, sm_scale=1 / math.sqrt(d), est=DEFAULT_ESTIMATION)
    check_invariants(layout, geom)
    assert layout.block_start.shape[2] == -(-geom.max_seqlen_k // BLOCK)  # capacity: every key block
    masks = layout.to_dense(geom)
    for r, (qr, kr) in enumerate(per_request(geom, q, k)):
        sq, sk = qr.shape[0], kr.shape[0]
        for h in range(hq):
            mass = antidiagonal_mass(qr[:, h], kr[:, h // (hq // hk)], 8, 1 / math.sqrt(d))
            kept = [pick_by_mass(m, cand, thresholds[h], forced=sorted({0, *diag}))
                    for m, (_, _, cand, diag) in zip(mass, block_ranges(sq, sk))]
            assert torch.equal(masks[r][h], blocks_mask(kept, sq, sk)), (r, h)


def test_xattention_subset_of_heads_out_of_order_and_fp16():
    """Scored heads in any order (runs of one KV head) in the model dtype: the same blocks as in fp32 except where
    the cumulative share sits at the threshold."""
    geom, q, k, kv = batch([100, 64], [60, 200], 8, 2, 64, True, seed=2)
    order = [5, 0, 6, 3]
    heads = HeadSet.build(order, num_q_heads=8, num_kv_heads=2, device=DEVICE, threshold=[0.7] * 4, stride=[16] * 4)
    exact = build_xattention(q, kv, geom, heads, sm_scale=0.125, est=DEFAULT_ESTIMATION).to_dense(geom)
    half = KVSource(k=kv.k.half(), v=kv.v.half(), req_to_token=kv.req_to_token, req_pool_indices=kv.req_pool_indices)
    approx = build_xattention(q.half(), half, geom, heads, sm_scale=0.125, est=DEFAULT_ESTIMATION).to_dense(geom)
    for r, (qr, kr) in enumerate(per_request(geom, q, k)):
        sq, sk = qr.shape[0], kr.shape[0]
        for i, h in enumerate(order):
            mass = antidiagonal_mass(qr[:, h], kr[:, h // 4], 16, 0.125)
            kept = [pick_by_mass(m, cand, 0.7, forced=sorted({0, *diag}))
                    for m, (_, _, cand, diag) in zip(mass, block_ranges(sq, sk))]
            assert torch.equal(exact[r][i], blocks_mask(kept, sq, sk)), (r, h)
        assert (approx[r] != exact[r]).float().mean() < 0.05


def test_xattention_offline_realisation_matches_the_online_builder():
    n, d = 300, 64
    geom, q, k, kv = batch([n], [0], 1, 1, d, False, seed=3)
    spec = XAttentionSpec(threshold=0.6, stride=4)
    heads = HeadSet.build([0], num_q_heads=1, num_kv_heads=1, device=DEVICE, threshold=[0.6], stride=[4])
    online = build_xattention(q, kv, geom, heads, sm_scale=0.125, est=DEFAULT_ESTIMATION).to_dense(geom)[0][0]
    sel = realise_xattention(spec, q[:, 0].cpu(), k[:, 0].cpu(), sm_scale=0.125, est=DEFAULT_ESTIMATION, softcap=None)
    assert torch.equal(sel.row_mask(0, n) & causal(n, n), online.cpu())


# ---- FlexPrefill ----------------------------------------------------------------------------------------------


def last_rows_attention(qh, kh, sm_scale, last_q):
    """The last ``min(last_q, Sq)`` rows' causal softmax ``[n, Sk]`` (bottom-right causal)."""
    sq, sk = qh.shape[0], kh.shape[0]
    n = min(last_q, sq)
    s = (qh[sq - n:] @ kh.T) * sm_scale
    pos = torch.arange(sk - n, sk).view(-1, 1)
    return s.masked_fill(torch.arange(sk).view(1, -1) > pos, float("-inf")).softmax(-1), pos


def flexprefill_reference(qh, kh, spec, sm_scale, est):
    """(uses blocks?, [Sq, Sk] kept mask) of one head and request, from the definition."""
    sq, sk = qh.shape[0], kh.shape[0]
    nkb = -(-sk // BLOCK)
    p, pos = last_rows_attention(qh, kh, sm_scale, est.last_q)
    n = p.shape[0]
    col = p.sum(0) / n
    offsets = (pos - torch.arange(sk).view(1, -1)).clamp(min=0)
    diag = torch.zeros(sk).index_add_(0, offsets.flatten(), p.flatten()) / n
    true_blocks = torch.stack([col[b * BLOCK:(b + 1) * BLOCK].sum() for b in range(nkb)])
    pooled_k = torch.stack([kh[b * BLOCK:(b + 1) * BLOCK].mean(0) for b in range(nkb)])
    est_blocks = (pooled_k @ qh[sq - n:].mean(0) * sm_scale).softmax(0)
    m = (true_blocks + est_blocks) / 2
    kl = lambda a: float((a * (a / m).log()).nan_to_num().sum())  # noqa: E731
    js = math.sqrt(max(0.5 * kl(true_blocks) + 0.5 * kl(est_blocks), 0.0))
    if js < spec.tau:
        kept = []
        for rows, r0, cand, dg in block_ranges(sq, sk):
            score = (pooled_k[cand] @ qh[rows].mean(0) * sm_scale).softmax(0)
            mass = dict(zip(cand, score.tolist()))
            kept.append(pick_by_mass(mass, cand, spec.gamma, forced=dg, min_count=-(-spec.min_budget // BLOCK)))
        return True, blocks_mask(kept, sq, sk), js
    cols = pick_by_mass(col, range(sk), spec.gamma, forced=range(min(est.forced_sink, sk)),
                        min_count=spec.min_budget)
    offs = pick_by_mass(diag, range(sk), spec.gamma, forced=range(min(est.forced_local, sk)),
                        min_count=spec.min_budget)
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    for rows, r0, _, _ in block_ranges(sq, sk):
        mask[rows, cols] = True
        for o in offs:
            mask[rows, max(r0 - o, 0):max(r0 - o + BLOCK, 0)] = True
    return False, mask & causal(sq, sk), js


@pytest.mark.parametrize("seq_q,prefix,hq,hk,d,paged", CASES)
def test_flexprefill_layout_is_the_pattern(seq_q, prefix, hq, hk, d, paged):
    geom, q, k, kv = batch(seq_q, prefix, hq, hk, d, paged, seed=4)
    # tau 0: always vertical-slash; 1: always blocks (the distance is at most sqrt(ln 2)); others by the input
    specs = [FlexPrefillSpec(gamma=0.6, tau=0.0, min_budget=4), FlexPrefillSpec(gamma=0.8, tau=1.0, min_budget=64),
             FlexPrefillSpec(gamma=0.9, tau=0.05, min_budget=130), FlexPrefillSpec(gamma=0.5, tau=0.2, min_budget=1)]
    specs = specs[:hq]
    est = Estimation(last_q=32, forced_sink=2, forced_local=3)
    heads = HeadSet.build(list(range(hq)), num_q_heads=hq, num_kv_heads=hk, device=DEVICE,
                          gamma=[s.gamma for s in specs], tau=[s.tau for s in specs],
                          min_budget=[s.min_budget for s in specs])
    layout = build_flexprefill(q, kv, geom, heads, sm_scale=1 / math.sqrt(d), est=est)
    check_invariants(layout, geom)
    masks = layout.to_dense(geom)
    branches = set()
    for r, (qr, kr) in enumerate(per_request(geom, q, k)):
        for h, spec in enumerate(specs):
            blocks, ref, js = flexprefill_reference(qr[:, h], kr[:, h // (hq // hk)], spec, 1 / math.sqrt(d), est)
            if abs(js - spec.tau) < 1e-4:
                continue  # at the threshold: either branch is right
            branches.add(blocks)
            assert torch.equal(masks[r][h], ref), (r, h, blocks, js)
    assert branches == {True, False}


def test_flexprefill_offline_realisation_matches_the_online_builder():
    n, d = 260, 64
    geom, q, k, kv = batch([n], [0], 2, 1, d, False, seed=5)
    specs = [FlexPrefillSpec(gamma=0.7, tau=0.0, min_budget=16), FlexPrefillSpec(gamma=0.7, tau=1.0, min_budget=16)]
    heads = HeadSet.build([0, 1], num_q_heads=2, num_kv_heads=1, device=DEVICE, gamma=[0.7, 0.7], tau=[0.0, 1.0],
                          min_budget=[16, 16])
    online = build_flexprefill(q, kv, geom, heads, sm_scale=0.125, est=DEFAULT_ESTIMATION).to_dense(geom)[0]
    for h, spec in enumerate(specs):
        sel = realise_flexprefill(spec, q[:, h].cpu(), k[:, 0].cpu(), sm_scale=0.125, est=DEFAULT_ESTIMATION,
                                  softcap=None)
        assert torch.equal(sel.row_mask(0, n) & causal(n, n), online[h].cpu()), h


def test_js_distance_and_keep_by_mass():
    p = torch.tensor([0.5, 0.5, 0.0])
    assert float(js_distance(p, p)) == pytest.approx(0.0, abs=1e-6)
    assert float(js_distance(p, torch.tensor([0.0, 0.0, 1.0]))) == pytest.approx(math.sqrt(math.log(2)), abs=1e-5)
    mass = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.0]])
    valid = torch.tensor([True, True, True, True, False])
    keep = keep_by_mass(mass, valid, torch.tensor([0.65]))
    assert keep[0].tolist() == [False, True, True, False, False]  # 0.4 + 0.3 >= 0.65
    forced = torch.tensor([True, False, False, False, False])
    keep = keep_by_mass(mass, valid, torch.tensor([0.65]), forced=forced, min_count=torch.tensor([4]))
    assert keep[0].tolist() == [True, True, True, True, False]  # forced first, then at least four valid entries



def keep_by_mass_loop(mass, valid, share, forced, min_count):
    """keep_by_mass read off its definition, one row at a time: forced entries first, then valid ones by mass
    (ties by position); an entry is kept while the mass ranked above it is below ``share``, or while fewer than
    ``min_count`` entries are ranked above it; invalid entries never."""
    keep = torch.zeros_like(mass, dtype=torch.bool)
    for r in range(mass.shape[0]):
        order = sorted((j for j in range(mass.shape[1]) if valid[r, j]),
                       key=lambda j: (not forced[r, j], -float(mass[r, j]), j))
        above = 0.0
        for rank, j in enumerate(order):
            keep[r, j] = bool(forced[r, j]) or above < float(share[r]) or rank < int(min_count[r])
            above += float(mass[r, j])
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_by_mass_matches_its_definition(seed):
    g = torch.Generator().manual_seed(seed)
    rows, n = 12, 40
    valid = torch.rand(rows, n, generator=g) < 0.8
    mass = torch.rand(rows, n, generator=g) * valid  # distinct masses: the ranking is unambiguous
    mass = mass / mass.sum(-1, keepdim=True)
    forced = (torch.rand(rows, n, generator=g) < 0.1) & valid
    share = torch.rand(rows, generator=g)
    min_count = torch.randint(0, 6, (rows,), generator=g)
    want = keep_by_mass_loop(mass, valid, share, forced, min_count)
    assert torch.equal(keep_by_mass(mass, valid, share, forced=forced, min_count=min_count), want)
    # keep_ranked, given the priority keep_by_mass builds, and a minimum count in scaled lanes (64 b < budget)
    prio = torch.where(valid, mass + 2.0 * forced, -1.0)
    lanes = torch.arange(n) * BLOCK
    got = keep_ranked(mass, prio, share, forced=True, lanes=lanes, min_lanes=min_count * BLOCK - 5)
    assert torch.equal(got, want)


def test_keep_by_mass_ties_and_nan():
    # four equal masses, share 0.6: the mass above the i-th is 0.25 i, so three are kept whichever order the sort
    # gives the ties
    keep = keep_by_mass(torch.full((1, 4), 0.25), torch.ones(1, 4, dtype=torch.bool), torch.tensor([0.6]))
    assert int(keep.sum()) == 3
    # a row of NaN masses (a head whose scores overflowed) keeps nothing, not even its forced or minimum entries
    nan = torch.full((1, 5), float("nan"))
    keep = keep_by_mass(nan, torch.ones(1, 5, dtype=torch.bool), torch.tensor([0.9]),
                        forced=torch.tensor([[True, False, False, False, False]]), min_count=torch.tensor([3]))
    assert not keep.any()
    keep = keep_ranked(nan[0], nan[0], torch.tensor(0.9), forced=True, lanes=torch.arange(5), min_lanes=torch.tensor(3))
    assert not keep.any()


def test_select_heads_consumes_b_and_matches_per_head_choice():
    geom = make_geometry([70, 130], [30, 170])
    nkb = -(-geom.max_seqlen_k // BLOCK)
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(geom.num_query_blocks, 3, nkb, generator=g) < 0.5).to(DEVICE) & grid(geom, nkb).candidate
    for a, b in ((layout_from_blocks(keep, geom), random_layout(geom, 3, seed=4)),  # b with fewer ranges than a
                 (random_layout(geom, 3, seed=5, max_cols=3), layout_from_blocks(keep, geom))):
        pick = torch.rand(geom.num_query_blocks, 3, generator=g).to(DEVICE) < 0.5
        dense_a, dense_b = a.to_dense(geom), b.to_dense(geom)
        b_start = b.block_start
        out = select_heads(pick, a, b)
        qb0 = 0
        for r, (want_a, want_b, got) in enumerate(zip(dense_a, dense_b, out.to_dense(geom))):
            rows = torch.arange(geom.seq_lens_q_cpu[r]) // BLOCK + qb0
            choose = pick.cpu()[rows].T.unsqueeze(-1)  # [H, Sq_r, 1]
            assert torch.equal(got, torch.where(choose, want_a, want_b)), r
            qb0 += -(-geom.seq_lens_q_cpu[r] // BLOCK)
        if b_start.shape[2] >= a.block_start.shape[2]:  # no padding needed: b's own tensor is written and returned
            assert out.block_start.data_ptr() == b_start.data_ptr()


def test_batch_constants_are_made_once_per_geometry():
    geom = make_geometry([70, 1], [30, 64])
    calls = []
    assert geom.derived(("k",), lambda: calls.append(1) or torch.ones(2)) is geom.derived(("k",), lambda: calls.append(1))
    assert calls == [1]
    assert grid(geom, 4) is grid(geom, 4) and grid(geom, 4) is not grid(geom, 5)
    other = make_geometry([70, 1], [30, 64])
    assert grid(other, 4) is not grid(geom, 4)  # a new batch starts empty
    assert "_derived" not in repr(geom)

# ---- through the sparse kernel ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_q,prefix,hq,hk,d,paged", CASES[:2])
def test_kernel_on_adaptive_layouts_matches_masked_reference(seq_q, prefix, hq, hk, d, paged):
    geom, q, k, kv = batch(seq_q, prefix, hq, hk, d, paged, seed=6, dtype=torch.float16)
    heads = list(range(hq))
    layouts = [
        build_xattention(q, kv, geom, HeadSet.build(heads, num_q_heads=hq, num_kv_heads=hk, device=DEVICE,
                                                    threshold=[0.6] * hq, stride=[8] * hq),
                         sm_scale=1 / math.sqrt(d), est=DEFAULT_ESTIMATION),
        build_flexprefill(q, kv, geom, HeadSet.build(heads, num_q_heads=hq, num_kv_heads=hk, device=DEVICE,
                                                     gamma=[0.7] * hq, tau=[0.0, 1.0] * (hq // 2),
                                                     min_budget=[32] * hq),
                          sm_scale=1 / math.sqrt(d), est=DEFAULT_ESTIMATION),
    ]
    for layout in layouts:
        o, lse = sparse_attention(q, kv, layout, geom, sm_scale=1 / math.sqrt(d))
        ref_o, ref_lse = masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=1 / math.sqrt(d))
        torch.testing.assert_close(o.float(), ref_o.float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)


# ---- planner and backend ---------------------------------------------------------------------------------------


def test_planner_groups_adaptive_heads_and_the_backend_runs_them():
    from test_planner import HK, HQ, D, config, fake_batch, fake_layer, make_backend

    from sgl_minference.backend.layer_layout import layer_layout
    from sgl_minference.backend.planner import layer_heads

    cfg = config(default={"type": "flexprefill", "gamma": 0.8, "tau": 0.1, "min_budget": 64},
                 heads={"0": {"0": {"type": "xattention", "threshold": 0.9, "stride": 8},
                              "2": {"type": "xattention", "threshold": 0.5, "stride": 16},
                              "3": {"type": "xattention", "threshold": 0.7, "stride": 8}}})
    lh = layer_heads(cfg, layer_id=0, head_start=0, num_q_heads=HQ, num_kv_heads=HK, device=DEVICE)
    groups = [(g.kind, g.heads.heads) for g in lh.groups]
    assert groups == [("xattention", [0, 3]), ("flexprefill", [1]), ("xattention", [2])]  # one stride per group
    assert lh.groups[0].heads.budgets["threshold"].tolist() == pytest.approx([0.9, 0.7])
    assert lh.groups[1].heads.budgets["min_budget"].tolist() == [64]

    batch, geom, q, k, v, pool, full = fake_batch([130, 30], [150, 0])
    backend = make_backend(cfg, pool, full.req_to_token)
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q.reshape(q.shape[0], -1), k, v, fake_layer(0), batch)
    plan = backend._plan  # the batch's plan, as the backend built it
    layout = layer_layout(q, plan.kv_source(pool.k, pool.v), plan, lh, cfg, sm_scale=1 / math.sqrt(D))
    ref, _ = masked_attention(q, full, geom, layout.to_dense(geom), sm_scale=1 / math.sqrt(D))
    torch.testing.assert_close(out.view_as(q).float(), ref.float(), atol=2e-3, rtol=2e-3)
    assert pool.writes == [0]



# ---- offline search ----------------------------------------------------------------------------------------------


def varying_blocks_head(n=1024, d=64, seed=7):
    """A head whose query blocks attend to a varying number of key blocks: most to one earlier block, every fourth
    to six (a fixed top-k cannot serve both at the same average cost; a mass threshold can)."""
    nb = n // BLOCK
    gen = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, d, generator=gen))[0][:nb]
    k = centres.repeat_interleave(BLOCK, dim=0) + 0.05 * torch.randn(n, d, generator=gen)
    q = torch.zeros(n, d)
    for qb in range(1, nb):
        targets = torch.randperm(qb, generator=gen)[: (6 if qb % 4 == 0 else 1)]
        q[qb * BLOCK:(qb + 1) * BLOCK] = 12.0 * centres[targets].sum(0) / math.sqrt(len(targets))
    return q, k


@pytest.mark.parametrize("spec", [XAttentionSpec(threshold=0.9, stride=8),
                                  FlexPrefillSpec(gamma=0.9, tau=0.1, min_budget=64)])
def test_fit_meets_the_budget(spec):
    from sgl_minference.tools.search import candidates as cand
    from sgl_minference.patterns.selection import realise, selection_keys

    q, k = varying_blocks_head()
    budget, skip = 150, 256
    fitted = cand.fit(spec, q, k, budget, sm_scale=1.0, row_block=256, skip_rows=skip)
    share = "threshold" if isinstance(spec, XAttentionSpec) else "gamma"

    def keys(s):
        return selection_keys(realise(s, q, k, sm_scale=1.0), row_block=256, skip_rows=skip)

    assert keys(fitted) <= budget < keys(fitted.model_copy(update={share: getattr(fitted, share) + 1e-3}))
    assert keys(spec) > budget  # the published setting would spend more here


def test_search_can_choose_an_adaptive_pattern():
    from sgl_minference.tools.search import candidates as cand
    from sgl_minference.tools.search.capture import LayerQK
    from sgl_minference.tools.search.searcher import ScoreSettings, score_layer

    q, k = varying_blocks_head()
    budget = 192
    specs = cand.candidate_space(budget * 4, types=("block_sparse", "xattention"))  # sized for 768, fitted to 192
    assert [s.type for s in specs] == ["block_sparse", "xattention"]
    specs[0] = specs[0].model_copy(update={"topk": 3})  # 192 keys per row
    qk = LayerQK(layer=0, q=q[None], k=k[None], sm_scale=1.0, softcap=None)
    res = score_layer(qk, lambda _l, _h: specs, ScoreSettings(row_block=256, skip_rows=256), fit_budget=budget)[0]
    best = cand.choose(res.recall, res.keys, budget)
    assert res.keys[1] <= budget and res.specs[best].type == "xattention", (res.recall, res.keys)
    assert res.recall[1] > res.recall[0] + 0.05


# ---- kernel benchmark plumbing -------------------------------------------------------------------------------------


def test_kernel_bench_runs_the_adaptive_cases(monkeypatch):
    from test_benchmarks import cpu_measure

    from benchmarks import common, kernel_bench

    if DEVICE == "cpu":
        monkeypatch.setattr(kernel_bench, "measure", cpu_measure)
    libs, unavailable = kernel_bench.load_libraries()
    assert "ours" in libs, unavailable
    inp = kernel_bench.make_inputs(seq_q=128, seq_k=320, num_q_heads=4, num_kv_heads=2, head_dim=64, seed=1,
                                   device=DEVICE)
    inp.q, inp.k, inp.v = (t.half() for t in (inp.q, inp.k, inp.v))  # the interpreter's bf16 dot is wrong
    inp.kv = kernel_bench.KVSource.packed(inp.k, inp.v, [inp.seq_k])
    budgets = kernel_bench.Budgets(xattn_threshold=0.8, flex_gamma=0.8, flex_min_budget=64)
    for case, param in (("ours_xattn", "stride"), ("ours_flex", "min_budget")):
        rec = kernel_bench.run_case(case, inp, libs, budgets, common.TimingPlan(), {})
        assert 0 < rec["pairs"] <= rec["visited_pairs"] and rec["density"] < 1.0, case
        assert rec["index_ms"] is not None and rec["params"][param] == getattr(budgets.spec(CASE_PATTERN[case]), param)


CASE_PATTERN = {"ours_xattn": "xattention", "ours_flex": "flexprefill"}


def test_streamed_recall_of_adaptive_selections_equals_full_matrix():
    from test_search import full_matrix_recall

    from sgl_minference.patterns.selection import realise
    from sgl_minference.tools.search.recall import head_recall

    n = 450
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(n, 32, generator=gen) * 1.5, torch.randn(n, 32, generator=gen)
    specs = [XAttentionSpec(threshold=0.7, stride=4), FlexPrefillSpec(gamma=0.8, tau=0.0, min_budget=8),
             FlexPrefillSpec(gamma=0.8, tau=1.0, min_budget=8)]
    sels = [realise(s, q, k, sm_scale=0.2) for s in specs]
    assert [s.blocks is not None for s in sels] == [True, False, True]  # both FlexPrefill branches
    rec, keys = head_recall(q, k, sels, sm_scale=0.2, row_block=100, skip_rows=70)
    ref_rec, ref_keys = full_matrix_recall(q, k, sels, 0.2, 70)
    assert rec.tolist() == pytest.approx(ref_rec, abs=1e-5) and keys.tolist() == pytest.approx(ref_keys, abs=1e-9)


def test_recall_curves_script(tiny_gemma, tmp_path):
    import json

    from benchmarks import recall_curves

    out = tmp_path / "curves.json"
    res = recall_curves.main([str(tiny_gemma), "--length", "600", "--densities", "0.2", "0.5", "--shares", "0.8",
                              "0.95", "--min-budget", "64", "--dtype", "float32", "--row-block", "256",
                              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["curves"].keys() == set(recall_curves.PATTERNS) and saved["layers"] == [2]
    assert saved["heads_scored"] == 4 and out.with_suffix(".png").stat().st_size > 0
    for pat, pts in res["curves"].items():
        assert len(pts) == 2 and all(0 < p["recall"] <= 1 + 1e-6 and 0 < p["density"] <= 1 + 1e-6 for p in pts), pat
    for pat in ("xattention", "flexprefill"):  # a larger share keeps more
        assert res["curves"][pat][1]["density"] >= res["curves"][pat][0]["density"]


def test_the_share_fit_bisects_to_the_budget():
    from sgl_minference.patterns.share_fit import MIN_SHARE, largest_share_within

    assert largest_share_within(lambda s: 10 * s, 20, steps=5) == 1.0  # the whole mass fits
    assert largest_share_within(lambda s: 10.0, 5, steps=5) == MIN_SHARE  # nothing fits: the floor
    got = largest_share_within(lambda s: 100 * s, 30, steps=30)
    assert 100 * got <= 30 < 100 * (got + 1e-6)
