"""Index builders: online estimation kernels and the layouts each pattern emits, against plain-torch meanings."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_minference.kernels import estimate, select  # noqa: E402
from sgl_minference.kernels.estimate import LastqLaunch, _head_slots, lastq_scores, pool_keys  # noqa: E402
from sgl_minference.layout import BLOCK, SENTINEL, BatchGeometry, KVSource  # noqa: E402
from sgl_minference.patterns import (HeadSet, build_a_shape, build_block_sparse, build_dense,  # noqa: E402
                                     build_vertical_slash, concat_heads, estimate_vertical_slash)
from sgl_minference.patterns.convert import indices_to_layout  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16


def make_batch(seq_q, seq_k, hq, hk, d, *, paged=False, seed=0):
    """Random packed q and K/V for a ragged batch; ``paged`` puts K/V in a shuffled pool read via a token table."""
    g = torch.Generator().manual_seed(seed)
    geom = BatchGeometry.build(seq_q, seq_k, DEV)
    q = torch.randn(sum(seq_q), hq, d, generator=g).to(DEV, DTYPE)
    k = torch.randn(sum(seq_k), hk, d, generator=g).to(DEV, DTYPE)
    v = torch.randn(sum(seq_k), hk, d, generator=g).to(DEV, DTYPE)
    if not paged:
        return geom, q, KVSource.packed(k, v, seq_k)
    slots = sum(seq_k) + 7
    perm = torch.randperm(slots, generator=g)[: sum(seq_k)]
    kb = torch.zeros(slots, hk, d, dtype=DTYPE)
    vb = torch.zeros(slots, hk, d, dtype=DTYPE)
    kb[perm], vb[perm] = k.cpu(), v.cpu()
    table = torch.zeros(len(seq_k) + 2, max(seq_k) + 5, dtype=torch.int32)
    pool_idx = torch.randperm(len(seq_k) + 2, generator=g)[: len(seq_k)]
    start = 0
    for r, sk in enumerate(seq_k):
        table[pool_idx[r], :sk] = perm[start:start + sk].int()
        start += sk
    return geom, q, KVSource(k=kb.to(DEV), v=vb.to(DEV), req_to_token=table.to(DEV),
                             req_pool_indices=pool_idx.to(DEV, torch.int64))


def heads_of(hq, hk, heads=None, **budgets):
    """All ``hq`` heads in order, or the listed subset ``heads`` (any order)."""
    heads = list(range(hq)) if heads is None else heads
    return HeadSet.build(heads, num_q_heads=hq, num_kv_heads=hk, device=DEV, **budgets)


def request_qk(q, kv, geom, r):
    cu = geom.cu_seqlens_q.tolist()
    k, _ = kv.gather(r, geom.seq_lens_k_cpu[r])
    return q[cu[r]:cu[r + 1]].float().cpu(), k.float().cpu()


def causal(sq, sk):
    return torch.arange(sk).view(1, -1) <= torch.arange(sk - sq, sk).view(-1, 1)


def check_invariants(layout, geom):
    """The SparseLayout contract of sgl_minference.layout's docstring, entry by entry."""
    bs, be, bc, fc = (t.cpu() for t in (layout.block_start, layout.block_end, layout.block_count, layout.full_count))
    ci, cc = layout.col_index.cpu(), layout.col_count.cpu()
    for qb, (r, row) in enumerate(zip(geom.qb_request.tolist(), geom.qb_row.tolist())):
        sk, sq = geom.seq_lens_k_cpu[r], geom.seq_lens_q_cpu[r]
        r0 = sk - sq + row
        p_last = r0 + min(BLOCK, sq - row) - 1
        for h in range(layout.num_heads):
            n, nf = int(bc[qb, h]), int(fc[qb, h])
            assert 0 <= nf <= n
            starts, ends = bs[qb, h, :n].tolist(), be[qb, h, :n].tolist()
            for i, (s, e) in enumerate(zip(starts, ends)):
                assert 0 < e - s <= BLOCK and e > 0 and s <= p_last, (qb, h, i, s, e, p_last)  # no range without a key
                is_full = e - s == BLOCK and s >= 0 and e - 1 <= r0
                assert is_full == (i < nf), (qb, h, i, s, e, r0, nf)
            assert starts[:nf] == sorted(starts[:nf]) and starts[nf:] == sorted(starts[nf:])
            spans = sorted(zip(starts, ends))
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "ranges overlap"
            cols = ci[qb, h, : int(cc[qb, h])].tolist()
            assert cols == sorted(set(cols)) and all(0 <= c < sk for c in cols)
            assert not any(s <= c < e for c in cols for s, e in spans), "column inside a range"


def reference_scores(q, k, n_last, group):
    """Plain-torch column and diagonal sums of the last-q softmax: ([H, Sk], [H, Sk])."""
    sq, sk, hq = q.shape[0], k.shape[0], q.shape[1]
    n = min(n_last, sq)
    qq = q[sq - n:]
    s = torch.einsum("ahd,jhd->haj", qq, k.repeat_interleave(group, 1)) / math.sqrt(q.shape[-1])
    pos = torch.arange(sk - n, sk).view(-1, 1)
    p = s.masked_fill(torch.arange(sk).view(1, -1) > pos, float("-inf")).softmax(-1)
    col = p.sum(1)
    off = pos - torch.arange(sk).view(1, -1)  # [n, Sk] diagonal of each (row, key)
    diag = torch.zeros(hq, sk).index_put_((torch.arange(hq).view(-1, 1, 1), off.clamp(min=0).expand(hq, -1, -1)),
                                          p * (off >= 0), accumulate=True)
    return col, diag


CASES = [  # (seq_q, seq_k, hq, hk, d, paged)
    ([70, 1, 130], [100, 65, 300], 4, 2, 64, False),
    ([64, 33], [64, 200], 4, 1, 64, True),
    ([129], [129], 8, 1, 128, False),
    ([5, 90], [261, 90], 2, 2, 256, True),
]


LASTQ_CASES = [(*case, None) for case in CASES] + [  # (..., scored heads: None = all, in order)
    ([20, 70], [150, 70], 8, 2, 128, True, [5, 0, 6, 3]),  # subset out of KV order, 2 per KV head
    ([33, 7], [97, 260], 8, 1, 256, False, None),  # GQA 8 at D=256: pairs of heads per program
    ([3], [200], 4, 1, 256, True, [3, 1, 2]),  # odd count: one pair and one padded slot
    ([10, 64], [300, 64], 32, 4, 64, False, [31, 2, 9, 8, 10, 0, 1, 3, 4, 5]),  # GQA 8, 6/3/0/1 heads per KV head
    ([50], [120], 4, 4, 128, False, [2, 0]),  # MHA subset
]


@pytest.mark.parametrize("seq_q,seq_k,hq,hk,d,paged,heads", LASTQ_CASES)
def test_lastq_scores_match_torch(seq_q, seq_k, hq, hk, d, paged, heads):
    geom, q, kv = make_batch(seq_q, seq_k, hq, hk, d, paged=paged)
    hs = heads_of(hq, hk, heads)
    col, diag = lastq_scores(q, kv, geom, hs.q_head, hs.kv_head, sm_scale=1 / math.sqrt(d), last_q=64)
    assert_lastq_matches(q, kv, geom, hs, col, diag, hq // hk)



def assert_lastq_matches(q, kv, geom, hs, col, diag, group):
    assert col.shape == diag.shape == (geom.num_requests, len(hs.heads), geom.max_seqlen_k)
    for r, sk in enumerate(geom.seq_lens_k_cpu):
        qr, kr = request_qk(q, kv, geom, r)
        ref_col, ref_diag = reference_scores(qr, kr, 64, group)
        torch.testing.assert_close(col[r, :, :sk].cpu(), ref_col[hs.heads], atol=3e-3, rtol=1e-3)
        torch.testing.assert_close(diag[r, :, :sk].cpu(), ref_diag[hs.heads], atol=3e-3, rtol=1e-3)
        assert (col[r, :, sk:] == -1).all() and (diag[r, :, sk:] == -1).all()


@pytest.mark.parametrize("seq_q,seq_k,hq,hk,d,paged,heads,stacks", [
    ([70, 1, 130], [300, 65, 400], 8, 2, 64, False, None, (4, 1)),  # GQA 4: a stack per group, single-head pass 2
    ([33, 7], [97, 260], 8, 1, 128, True, [5, 0, 6, 3], (2, 4)),  # GQA 8 subset, pass 2 stacks more than pass 1
    ([5, 64], [261, 64], 4, 4, 256, False, None, (8, 2)),  # MHA: stacks wider than the group are padding lanes
])
@pytest.mark.parametrize("tiles_per_split", [1, 2])
def test_lastq_scores_any_split_and_stack(monkeypatch, seq_q, seq_k, hq, hk, d, paged, heads, stacks,
                                          tiles_per_split):
    """Every split boundary (one or two key tiles per split: pass 2's carried diagonal halves cross each one)
    and head stacks of 1..8, against the torch sums."""
    if DEV == "cuda" and d == 256 and max(stacks) > 1:
        # Failed on the H200 (2026-12-01), most likely out of shared memory: the product stacks one head at
        # head_dim 256 (lastq_launch); wide stacks there are checked in the interpreter only.
        pytest.skip("head stacks > 1 at head_dim 256 do not fit an sm_90 program")
    monkeypatch.setattr(estimate, "MIN_TILES_PER_SPLIT", tiles_per_split)
    geom, q, kv = make_batch(seq_q, seq_k, hq, hk, d, paged=paged, seed=2)
    hs = heads_of(hq, hk, heads)
    launch = LastqLaunch(lse_heads=stacks[0], lse_warps=4, scores_heads=stacks[1], scores_warps=4, num_stages=2,
                         waves=1000)
    col, diag = lastq_scores(q, kv, geom, hs.q_head, hs.kv_head, sm_scale=1 / math.sqrt(d), launch=launch)
    assert_lastq_matches(q, kv, geom, hs, col, diag, hq // hk)


@pytest.mark.parametrize("heads,hq,hk,per_slot", [([31, 2, 9, 8, 10, 0, 1, 3, 4, 5], 32, 4, 4),
                                                  ([5, 0, 6, 3], 8, 2, 4), ([3, 1, 2], 4, 1, 2), ([2, 0], 4, 4, 1)])
def test_head_slots_share_one_kv_head(heads, hq, hk, per_slot):
    """Each slot holds heads of one KV head (lanes filled first), every scored head once, no more slots than
    the KV heads' counts need (the rest all padding)."""
    kv_head = [h // (hq // hk) for h in heads]
    slots = _head_slots(torch.tensor(kv_head, dtype=torch.int32, device=DEV), hk, hq // hk, per_slot).cpu()
    assert slots.shape[1] == per_slot
    assert sorted(i for i in slots.flatten().tolist() if i >= 0) == list(range(len(heads)))
    used = [row for row in slots.tolist() if row[0] >= 0]
    assert all(row[0] < 0 for row in slots.tolist()[len(used):])
    counts = [kv_head.count(k) for k in range(hk)]
    assert len(used) == sum(-(-c // per_slot) for c in counts)
    for row in used:
        lanes = [i for i in row if i >= 0]
        assert row[:len(lanes)] == lanes and len({kv_head[i] for i in lanes}) == 1

def test_pool_keys_excludes_padding():
    geom, q, kv = make_batch([10, 3], [130, 64], 2, 2, 64, paged=True)
    pooled = pool_keys(kv, geom).cpu()
    for r, sk in enumerate(geom.seq_lens_k_cpu):
        k, _ = kv.gather(r, sk)
        for b in range(-(-sk // BLOCK)):
            torch.testing.assert_close(pooled[r, :, b], k[b * BLOCK:(b + 1) * BLOCK].float().mean(0).cpu(),
                                       atol=1e-3, rtol=1e-3)
        assert (pooled[r, :, -(-sk // BLOCK):] == 0).all()


def vertical_slash_mask(columns, offsets, geom, r):
    """What a vertical-slash layout means per 64-row block: the columns plus, for each diagonal o, the keys
    [r0 - o, r0 - o + 64) of the block starting at position r0; causal. Returns [H, Sq, Sk] bool."""
    sq, sk = geom.seq_lens_q_cpu[r], geom.seq_lens_k_cpu[r]
    h = columns.shape[1]
    m = torch.zeros(h, sq, sk, dtype=torch.bool)
    for hh in range(h):
        cols = [c for c in columns[r, hh].tolist() if c < sk]
        offs = [o for o in offsets[r, hh].tolist() if o >= 0]
        for row in range(0, sq, BLOCK):
            r0, rows = sk - sq + row, slice(row, min(row + BLOCK, sq))
            m[hh, rows, cols] = True
            for o in offs:
                m[hh, rows, max(r0 - o, 0):max(r0 - o + BLOCK, 0)] = True
    return m & causal(sq, sk)


def assert_top(scores, chosen, candidates, tol=2e-3):
    """``chosen`` are top entries of ``scores`` among ``candidates`` (up to float ties within ``tol``)."""
    rest = candidates - chosen
    if chosen and rest:
        assert min(float(scores[i]) for i in chosen) >= max(float(scores[i]) for i in rest) - tol


@pytest.mark.parametrize("seq_q,seq_k,hq,hk,d,paged", CASES)
def test_vertical_slash_layout_is_the_pattern(seq_q, seq_k, hq, hk, d, paged):
    geom, q, kv = make_batch(seq_q, seq_k, hq, hk, d, paged=paged, seed=1)
    budgets = dict(vertical=[3, 10, 400, 1, 7, 2, 9, 5][:hq], slash=[2, 20, 1, 500, 3, 4, 1, 6][:hq])
    hs = heads_of(hq, hk, **budgets)
    kw = dict(sm_scale=1 / math.sqrt(d), last_q=64, forced_sink=2, forced_local=1)
    columns, offsets = estimate_vertical_slash(q, kv, geom, hs, **kw)
    layout = build_vertical_slash(q, kv, geom, hs, **kw)
    check_invariants(layout, geom)
    columns, offsets = columns.cpu(), offsets.cpu()
    for r, sk in enumerate(seq_k):
        qr, kr = request_qk(q, kv, geom, r)
        ref_col, ref_diag = reference_scores(qr, kr, 64, hq // hk)
        for h in range(hq):
            cols = [c for c in columns[r, h].tolist() if c < sk]
            offs = [o for o in offsets[r, h].tolist() if o >= 0]
            # budgets clamp to the length; forced sink columns / local diagonals always in; the rest by score
            assert len(cols) == min(budgets["vertical"][h], sk) and len(offs) == min(budgets["slash"][h], sk)
            assert cols == sorted(cols) and offs == sorted(offs, reverse=True)
            assert set(range(min(2, sk, len(cols)))) <= set(cols) and (0 in offs)
            assert_top(ref_col[h], set(cols) - {0, 1}, set(range(2, sk)))
            assert_top(ref_diag[h], set(offs) - {0}, set(range(1, sk)))
        assert torch.equal(layout.to_dense(geom)[r], vertical_slash_mask(columns, offsets, geom, r))


@pytest.mark.parametrize("seq_q,seq_k,n_off,n_col,seed", [
    ([100, 1, 64], [700, 129, 64], 300, 40, 0),  # runs of adjacent diagonals across the 256-entry chunks
    ([130, 37], [2000, 37], 600, 300, 1),  # long prefix: windows left of key 0 and straddling it, per block
    ([7], [400], 3, 1, 2),  # Sq < 64, few entries
])
def test_indices_to_layout_is_the_meaning(seq_q, seq_k, n_off, n_col, seed):
    """Random sorted offsets (duplicates, adjacent runs that merge, far ones left of key 0 for early blocks) and
    columns (some inside ranges, some right of short blocks): the layout is exactly what they mean."""
    g = torch.Generator().manual_seed(seed)
    geom = BatchGeometry.build(seq_q, seq_k, DEV)
    B, H = len(seq_q), 3
    offsets = torch.full((B, H, n_off), -1, dtype=torch.int32)
    columns = torch.full((B, H, n_col), SENTINEL, dtype=torch.int32)
    for r, sk in enumerate(seq_k):
        for h in range(H):
            n = int(torch.randint(1, n_off + 1, (1,), generator=g))
            run = torch.randint(0, sk + 200, (n // 2 + 1,), generator=g)  # offsets past Sk: windows left of key 0
            o = torch.cat([run, (run[: n - len(run)] + torch.randint(0, 70, (n - len(run),), generator=g))])[:n]
            offsets[r, h, :n] = o.sort(descending=True).values.int()
            c = torch.randperm(sk, generator=g)[: max(min(n_col, sk) - h, 0)].sort().values
            columns[r, h, : len(c)] = c.int()
    layout = indices_to_layout(columns.to(DEV), offsets.to(DEV), geom)
    check_invariants(layout, geom)
    for r in range(B):
        assert torch.equal(layout.to_dense(geom)[r], vertical_slash_mask(columns, offsets, geom, r)), r


def test_budgets_beyond_the_sequence_give_dense_causal():
    geom, q, kv = make_batch([1, 77, 200], [150, 77, 260], 4, 4, 64)
    hs = heads_of(4, 4, vertical=[10_000] * 4, slash=[10_000] * 4)
    layout = build_vertical_slash(q, kv, geom, hs, sm_scale=0.125)
    for m, sq, sk in zip(layout.to_dense(geom), geom.seq_lens_q_cpu, geom.seq_lens_k_cpu):
        assert torch.equal(m, causal(sq, sk).expand_as(m))


@pytest.mark.parametrize("seq_q,seq_k", [([1], [1]), ([1, 64, 100], [300, 64, 165]), ([200], [513])])
def test_dense_layout_is_causal(seq_q, seq_k):
    geom = BatchGeometry.build(seq_q, seq_k, DEV)
    layout = build_dense(geom, heads_of(3, 1))
    check_invariants(layout, geom)
    for m, sq, sk in zip(layout.to_dense(geom), seq_q, seq_k):
        assert torch.equal(m, causal(sq, sk).expand_as(m))
    assert layout.sparsity(geom) == 0.0


def test_a_shape_layout():
    seq_q, seq_k = [100, 1, 64], [400, 129, 64]
    sink, local = [1, 64, 100, 3], [1, 64, 65, 500]
    geom = BatchGeometry.build(seq_q, seq_k, DEV)
    layout = build_a_shape(geom, heads_of(4, 2, sink=sink, local=local))
    check_invariants(layout, geom)
    for r, (m, sq, sk) in enumerate(zip(layout.to_dense(geom), seq_q, seq_k)):
        ref = torch.zeros_like(m)
        for h in range(4):
            for row in range(0, sq, BLOCK):
                r0, rows = sk - sq + row, slice(row, min(row + BLOCK, sq))
                ref[h, rows, : sink[h]] = True
                ref[h, rows, max(r0 - local[h] + 1, 0):] = True  # band of the block's first row, onwards
        assert torch.equal(m, ref & causal(sq, sk)), r


@pytest.mark.parametrize("seq_q,seq_k,hq,hk,d,paged,heads,topk", [
    ([130, 1, 64], [400, 129, 100], 4, 2, 64, True, None, [1, 2, 3, 100]),  # ragged batch, GQA 2
    ([200], [900], 8, 2, 128, False, [5, 0, 7, 6], [1, 4, 9, 2]),  # one request (scores in place), subset
    ([70, 3], [70, 300], 8, 1, 64, False, [7, 2, 1], [3, 1, 2]),  # GQA 8, subset out of order
    ([65], [65], 2, 2, 256, True, None, [1, 1]),  # MHA, D 256, a second query block of one row
])
@pytest.mark.parametrize("chunk", [4, 2048])
def test_block_sparse_layout(monkeypatch, seq_q, seq_k, hq, hk, d, paged, heads, topk, chunk):
    monkeypatch.setattr(select, "BLOCK_CHUNK", chunk)  # 4: key blocks in several load steps (carried counts)
    geom, q, kv = make_batch(seq_q, seq_k, hq, hk, d, paged=paged, seed=3)
    q[:, hq - 1] = 0.0  # every score of the last head ties at 0: the lowest blocks win, across load steps
    hs = heads_of(hq, hk, heads, topk=topk)
    layout = build_block_sparse(q, kv, geom, hs)
    check_invariants(layout, geom)
    for r, (m, sq, sk) in enumerate(zip(layout.to_dense(geom), seq_q, seq_k)):
        qr, kr = request_qk(q, kv, geom, r)
        nkb = -(-sk // BLOCK)
        pk = torch.stack([kr[b * BLOCK:(b + 1) * BLOCK].mean(0) for b in range(nkb)])  # [NKB, Hk, D]
        ref = torch.zeros_like(m)
        for row in range(0, sq, BLOCK):
            r0, p_last = sk - sq + row, sk - sq + min(row + BLOCK, sq) - 1
            pq = qr[row:row + BLOCK].mean(0)  # [Hq, D]
            for i, h in enumerate(hs.heads):
                score = pk[:, h // (hq // hk)] @ pq[h]
                cand = [b for b in range(nkb) if b * BLOCK <= p_last]
                diag = [b for b in cand if b >= r0 // BLOCK]
                others = sorted((b for b in cand if b not in diag), key=lambda b: -float(score[b]))
                keep = diag + others[: max(topk[i] - len(diag), 0)]
                for b in keep:
                    ref[i, row:row + BLOCK, b * BLOCK:(b + 1) * BLOCK] = True
        assert torch.equal(m, ref & causal(sq, sk)), r


def test_concat_heads_puts_groups_back():
    geom, q, kv = make_batch([70], [300], 4, 2, 64)
    dense = build_dense(geom, HeadSet.build([1, 3], num_q_heads=4, num_kv_heads=2, device=DEV))
    ashape = build_a_shape(geom, HeadSet.build([2, 0], num_q_heads=4, num_kv_heads=2, device=DEV,
                                               sink=[4, 64], local=[64, 128]))
    joined = concat_heads([dense, ashape], [[1, 3], [2, 0]], 4)
    m, d, a = joined.to_dense(geom)[0], dense.to_dense(geom)[0], ashape.to_dense(geom)[0]
    assert torch.equal(m[[1, 3]], d) and torch.equal(m[[2, 0]], a)
    index = [HeadSet.build(hs, num_q_heads=4, num_kv_heads=2, device=DEV).q_index for hs in ([1, 3], [2, 0])]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        indexed = concat_heads([dense, ashape], [[1, 3], [2, 0]], 4, index=index)
    assert indexed.same_as(joined)
    # the per-layer call converts no index (an int32 one costs an extra launch per use) and copies nothing from the host
    assert not [e.name for e in prof.events() if e.name in ("aten::_to_copy", "aten::lift_fresh")]
    with pytest.raises(ValueError, match="index"):
        concat_heads([dense, ashape], [[1, 3], [2, 0]], 4, index=index[:1])
    with pytest.raises(ValueError, match="heads"):
        concat_heads([dense, ashape], [[1, 3], [2, 2]], 4)
    single = build_a_shape(geom, HeadSet.build([1, 0], num_q_heads=2, num_kv_heads=1, device=DEV,
                                               sink=[4, 64], local=[64, 128]))
    swapped = concat_heads([single], [[1, 0]], 2).to_dense(geom)[0]  # one group, heads out of order
    assert torch.equal(swapped[[1, 0]], single.to_dense(geom)[0])


def test_head_set_validates_budgets():
    with pytest.raises(ValueError, match="vertical"):
        HeadSet.build([0, 1], num_q_heads=2, num_kv_heads=1, device=DEV, vertical=[0, 4])
    with pytest.raises(ValueError, match="heads"):
        HeadSet.build([2], num_q_heads=2, num_kv_heads=1, device=DEV)


# The interpreter warns when a reduction meets the planted NaN row; that NaN is the point of the test.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_estimate_falls_back_to_dense(where):
    """A NaN in one last-64 estimation query (or in one key) must not empty the head's layout: that head runs
    dense (so its output has NaN exactly where dense attention has it), the others keep their sparse layout, and
    the fallback is counted on the device."""
    from sgl_minference.kernels import sparse_attention
    from sgl_minference.patterns.vertical_slash import nan_fallback_counter
    from sgl_minference.testing import dense_attention

    seq_q, seq_k, hq, hk, d = [100, 40], [400, 40], 4, 2, 64
    geom, q, kv = make_batch(seq_q, seq_k, hq, hk, d, seed=5)
    if where == "query":
        q[90, 1, 3] = float("nan")  # request 0, head 1, an estimation row (its last 64 rows are 36..99)
        nan_heads = [1]
    else:
        kv.k[30, 1, 0] = float("nan")  # request 0, key 30 of KV head 1: query heads 2 and 3 read it
        nan_heads = [2, 3]
    before = int(nan_fallback_counter(DEV)[0])
    hs = heads_of(hq, hk, vertical=[2] * hq, slash=[2] * hq)
    layout = build_vertical_slash(q, kv, geom, hs, sm_scale=d ** -0.5, forced_sink=1, forced_local=1)
    assert int(nan_fallback_counter(DEV)[0]) - before == len(nan_heads)
    masks = layout.to_dense(geom)
    for h in range(hq):
        dense = torch.equal(masks[0][h], causal(seq_q[0], seq_k[0]))
        assert dense == (h in nan_heads), h
    out, _ = sparse_attention(q, kv, layout, geom, sm_scale=d ** -0.5)
    ref, _ = dense_attention(q, kv, geom, sm_scale=d ** -0.5)
    rows = slice(0, seq_q[0])
    for h in nan_heads:
        torch.testing.assert_close(out[rows, h].float().cpu(), ref[rows, h].float().cpu(), atol=2e-3, rtol=2e-3,
                                   equal_nan=True)
        assert out[rows, h].isnan().any()
    assert not out[:, [h for h in range(hq) if h not in nan_heads]].isnan().any()


def test_nan_fallback_log_reports_each_fallback_once_without_waiting(caplog):
    from sgl_minference.patterns.vertical_slash import NanFallbackLog, nan_fallback_counter

    log = NanFallbackLog("cpu")
    counter = nan_fallback_counter("cpu")
    start = int(counter[0])
    log.reported = start
    log._snapshot.fill_(start)
    assert log.poll() == 0  # snapshot taken now: nothing new yet
    counter += 3
    assert log.poll() == 0  # the snapshot read here predates the bump (it was asked for by the previous poll)
    with caplog.at_level("WARNING"):
        assert log.poll() == 3
    assert "3 vertical-slash head estimates held a NaN" in caplog.text
    assert log.poll() == 0


@pytest.mark.parametrize("pattern", ["vertical_slash", "block_sparse"])
def test_a_requests_layout_does_not_depend_on_its_batch(pattern):
    """Issue 15's cold-isolation runs: the keys a request's chunk attends are chosen from its own queries and keys
    only. The same chunk (request A: 100 queries over 400 keys) alone and between two other requests of a ragged
    batch gets the same layout, and the same attention output."""
    from sgl_minference.kernels.sparse_attention import sparse_attention

    seq_q, seq_k, hq, hk, d = [70, 100, 5], [300, 400, 90], 4, 2, 64
    geom, q, kv = make_batch(seq_q, seq_k, hq, hk, d, seed=11)
    qa, (ka, va) = q[70:170], (t[300:700] for t in (kv.k, kv.v))
    alone_geom, alone_kv = BatchGeometry.build([100], [400], DEV), KVSource.packed(ka, va, [400])

    def build(q_, kv_, geom_):
        if pattern == "vertical_slash":
            hs = heads_of(hq, hk, vertical=[3, 10, 40, 1], slash=[2, 20, 1, 50])
            return build_vertical_slash(q_, kv_, geom_, hs, sm_scale=1 / math.sqrt(d), last_q=64, forced_sink=2,
                                        forced_local=1)
        return build_block_sparse(q_, kv_, geom_, heads_of(hq, hk, topk=[1, 2, 3, 4]))

    batched, alone = build(q, kv, geom), build(qa, alone_kv, alone_geom)
    assert torch.equal(batched.to_dense(geom)[1], alone.to_dense(alone_geom)[0])
    o_b, lse_b = sparse_attention(q.float(), KVSource.packed(kv.k.float(), kv.v.float(), seq_k), batched, geom,
                                  sm_scale=1 / math.sqrt(d))
    o_a, lse_a = sparse_attention(qa.float(), KVSource.packed(ka.float(), va.float(), [400]), alone, alone_geom,
                                  sm_scale=1 / math.sqrt(d))
    torch.testing.assert_close(o_b[70:170], o_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_b[70:170], lse_a, atol=1e-5, rtol=1e-5)
