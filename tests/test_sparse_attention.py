"""The sparse attention kernel against exact masked attention (``masked_attention(..., layout.to_dense(geom))``).

On CPU the kernel runs in Triton's interpreter (fp16 / fp32, small shapes); ``-m gpu`` tests run bf16 / fp16 on
a CUDA device at moderate shapes.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import DEVICE, INTERPRET, consecutive_pool, make_geometry, make_qkv, paged_kv, requires_cuda

from sgl_minference.kernels.sparse_attention import (IN_A, IN_B, AttentionLaunch, attention_launch, pair_plan,
                                                     sparse_attention)
from sgl_minference.layout import BLOCK, SENTINEL, BatchGeometry, KVSource, SparseLayout, pool_run_starts
from sgl_minference.testing import causal_masks, dense_attention, full_layout, masked_attention

# (o atol/rtol, lse atol); fp32 on a GPU goes through tf32 tensor cores.
TOLERANCES = {
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (3e-2, 5e-3),
    torch.float32: (1e-4, 1e-4) if INTERPRET else (1e-2, 1e-3),
}
JUNK = 1 << 30  # fills unused layout slots: the kernel must never read them


def random_layout(geom: BatchGeometry, num_heads: int, *, seed: int, keep: float = 0.7, max_cols: int = 80,
                  empty: float = 0.1) -> SparseLayout:
    """A random layout that keeps every invariant of ``sgl_minference.layout`` and exercises every kernel path.

    Per (query block, head): disjoint ranges of random width (mostly 64, some shorter) walking from a start in
    [-63, 0] up to the context end, so some start below 0, some cross or lie past the diagonal; each kept with
    probability ``keep``. Full / partial are split as the invariants define them. Then up to ``max_cols``
    random columns outside every range (some right of the block's rows), and with probability ``empty``
    nothing at all. Unused slots hold ``JUNK``.
    """
    rng = random.Random(seed)
    entries = []
    for r, row in zip(geom.qb_request.tolist(), geom.qb_row.tolist()):
        sq, sk = geom.seq_lens_q_cpu[r], geom.seq_lens_k_cpu[r]
        first = sk - sq + row
        for _ in range(num_heads):
            if rng.random() < empty:
                entries.append(([], [], []))
                continue
            full, partial, covered = [], [], set()
            cur = rng.randint(-BLOCK + 1, 0)
            while cur < sk:
                end = min(cur + (BLOCK if rng.random() < 0.6 else rng.randint(1, BLOCK)), sk)
                if end > 0 and rng.random() < keep:
                    is_full = end - cur == BLOCK and cur >= 0 and end - 1 <= first
                    (full if is_full else partial).append((cur, end))
                    covered.update(range(max(cur, 0), end))
                cur = end + rng.choice([0, 0, 0, rng.randint(1, 2 * BLOCK)])
            free = [j for j in range(sk) if j not in covered]
            cols = sorted(rng.sample(free, min(len(free), rng.randint(0, max_cols))))
            entries.append((full, partial, cols))
    max_ranges = max(1, max(len(f) + len(p) for f, p, _ in entries))
    max_cols_used = max(1, max(len(c) for _, _, c in entries))
    nqb = geom.num_query_blocks
    block_start = torch.full((nqb * num_heads, max_ranges), JUNK, dtype=torch.int32)
    block_end = torch.full_like(block_start, JUNK + 1)
    col_index = torch.full((nqb * num_heads, max_cols_used), JUNK, dtype=torch.int32)
    block_count = torch.zeros(nqb * num_heads, dtype=torch.int32)
    full_count = torch.zeros_like(block_count)
    col_count = torch.zeros_like(block_count)
    for i, (full, partial, cols) in enumerate(entries):
        ranges = full + partial
        block_start[i, : len(ranges)] = torch.tensor([s for s, _ in ranges], dtype=torch.int32)
        block_end[i, : len(ranges)] = torch.tensor([e for _, e in ranges], dtype=torch.int32)
        col_index[i, : len(cols)] = torch.tensor(cols, dtype=torch.int32)
        block_count[i], full_count[i], col_count[i] = len(ranges), len(full), len(cols)
    device = geom.qb_request.device
    return SparseLayout(
        block_start=block_start.view(nqb, num_heads, -1).to(device),
        block_end=block_end.view(nqb, num_heads, -1).to(device),
        block_count=block_count.view(nqb, num_heads).to(device),
        full_count=full_count.view(nqb, num_heads).to(device),
        col_index=col_index.view(nqb, num_heads, -1).to(device),
        col_count=col_count.view(nqb, num_heads).to(device),
    )


def assert_matches(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], dtype) -> None:
    """Outputs and lse agree within the dtype's tolerance (lse -inf exactly where the reference has it)."""
    o_tol, lse_tol = TOLERANCES[dtype]
    o, lse = got
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(o.float(), want[0].float(), atol=o_tol, rtol=o_tol)
    torch.testing.assert_close(lse, want[1], atol=lse_tol, rtol=lse_tol)


def run_case(seq_lens_q, prefix_lens, num_heads, num_kv_heads, head_dim, dtype, *, seed=0, layout_seed=1,
             launch=None, **layout_kw):
    geom = make_geometry(seq_lens_q, prefix_lens)
    q, k, v = make_qkv(geom, num_heads, num_kv_heads, head_dim, dtype, seed=seed)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    layout = random_layout(geom, num_heads, seed=layout_seed, **layout_kw)
    sm_scale = head_dim ** -0.5
    got = sparse_attention(q, kv, layout, geom, sm_scale=sm_scale, launch=launch)
    want = masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=sm_scale)
    assert_matches(got, want, dtype)
    return geom, q, k, v, layout, got


INTERPRETER_DTYPES = [torch.float16, torch.float32]

CASES = {  # name: (seq_lens_q, prefix_lens, Hq, Hk, head_dim)
    "single-query": ([1], [300], 4, 4, 64),
    "unaligned-gqa4-d128": ([100], [237], 4, 1, 128),
    "gqa8": ([64], [192], 8, 1, 64),
    "d256": ([70], [150], 2, 1, 256),
    "ragged-batch": ([70, 1, 130], [130, 200, 5], 4, 2, 64),
}


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_random_layout_matches_masked_reference(case, dtype):
    run_case(*CASES[case], dtype)


@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_two_ranges_per_key_tile_match_masked_reference(case):
    """128-key tiles: full ranges in pairs (an odd one left to the masked phase), partial ranges in pairs, columns
    128 at a time; every layout seed gives other counts of each."""
    for layout_seed in (1, 2, 3):
        run_case(*CASES[case], torch.float16, layout_seed=layout_seed,
                 launch=AttentionLaunch(block_n=128, num_warps=4, num_stages=2, heads_first=layout_seed == 2))


PAIRED = AttentionLaunch(block_n=64, num_warps=8, num_stages=3, pair_blocks=True)

PAIR_CASES = {  # name: (seq_lens_q, prefix_lens, Hq, Hk, head_dim)
    # blocks per request 4 (even), 1, 3 (odd: the last pairs with nothing), 1 (a chunk shorter than 64)
    "ragged-gqa2": ([256, 1, 150, 30], [40, 200, 0, 70], 4, 2, 64),
    "unaligned-gqa4-d128": ([200], [237], 4, 1, 128),
    "d256": ([130], [70], 2, 1, 256),
}


def share_with_next(layout: SparseLayout, geom: BatchGeometry) -> SparseLayout:
    """Block B of every pair takes block A's ranges and columns (valid for B: its rows lie later), less the last
    partial range and the last column, and in odd heads one key off the end of its new last partial range: the
    pair then shares most entries, and in odd heads has a range of the same start and another end in each block."""
    req = geom.qb_request.tolist()
    for a in range(geom.num_query_blocks - 1):
        if req[a] != req[a + 1] or geom.qb_row[a] % (2 * BLOCK):
            continue
        b = a + 1
        for name in ("block_start", "block_end", "col_index", "full_count"):
            getattr(layout, name)[b] = getattr(layout, name)[a]
        for h in range(layout.num_heads):
            n, nf = int(layout.block_count[a, h]), int(layout.full_count[a, h])
            n = max(nf, n - 1)
            if h % 2 and n > nf and layout.block_end[b, h, n - 1] - layout.block_start[b, h, n - 1] > 1:
                layout.block_end[b, h, n - 1] -= 1
            layout.block_count[b, h] = n
            layout.col_count[b, h] = max(0, int(layout.col_count[a, h]) - 1)
    return layout


def test_launch_with_other_tile_widths_is_refused():
    geom = make_geometry([64], [0])
    q, k, v = make_qkv(geom, 2, 1, 64, torch.float16)
    with pytest.raises(ValueError, match="launch"):
        sparse_attention(q, KVSource.packed(k, v, geom.seq_lens_k_cpu), full_layout(geom, 2, DEVICE), geom,
                         sm_scale=0.125, launch=AttentionLaunch(block_n=96, num_warps=4, num_stages=2))


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PAIR_CASES), ids=str)
def test_paired_blocks_match_masked_reference(case, dtype):
    """One program per two query blocks: layouts whose pairs share no range (random), most ranges (B copies A), and
    where one block of a pair has nothing at all; packed and paged K/V."""
    seq_lens_q, prefix_lens, hq, hk, d = PAIR_CASES[case]
    geom = make_geometry(seq_lens_q, prefix_lens)
    q, k, v = make_qkv(geom, hq, hk, d, dtype)
    sm_scale = d ** -0.5
    for layout_seed, kv in ((1, KVSource.packed(k, v, geom.seq_lens_k_cpu)), (2, paged_kv(k, v, geom.seq_lens_k_cpu))):
        for shared in (False, True):
            layout = random_layout(geom, hq, seed=layout_seed, empty=0.0)
            layout = share_with_next(layout, geom) if shared else layout
            if geom.num_query_blocks > 1:  # nothing at all in block A (head 0), in block B (head 1)
                for qb, h in ((0, 0), (1, 1 % hq)):
                    layout.block_count[qb, h] = layout.full_count[qb, h] = layout.col_count[qb, h] = 0
            got = sparse_attention(q, kv, layout, geom, sm_scale=sm_scale, launch=PAIRED)
            assert_matches(got, masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=sm_scale), dtype)


def test_paired_dense_layout_shares_full_ranges():
    """Dense causal attention in pairs: block B's full ranges include all of A's, so most merged ranges are read
    unmasked by both blocks."""
    geom = make_geometry([256, 100], [130, 0])
    layout = full_layout(geom, 2, DEVICE)
    pl = pair_plan(layout, geom)
    # pair 0 (keys [-62, 258)): [2, 66) and [66, 130) full in both blocks; A's diagonal range (full for B) and the
    # leftmost (partial in both) once each, masked; B's diagonal range
    assert pl.full_count[0, 0] == 2 and pl.range_count[0, 0] == 5
    q, k, v = make_qkv(geom, 2, 1, 64, torch.float16)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    assert_matches(sparse_attention(q, kv, layout, geom, sm_scale=0.125, launch=PAIRED),
                   dense_attention(q, kv, geom, sm_scale=0.125), torch.float16)


def test_pair_plan_merges_lists_with_flags():
    """Request 0: two blocks (rows at positions 128..191 and 192..255), request 1: one block (no B)."""
    geom = make_geometry([128, 10], [128, 100])
    J = JUNK
    ranges = [  # per query block: (full, partial) as (start, end), then columns
        ([(0, 64), (64, 128)], [(128, 192)], [230, 240]),
        ([(0, 64)], [(128, 160), (192, 230)], [69, 240]),
        ([(0, 64)], [(64, 110)], []),
    ]
    bs = torch.full((3, 1, 3), J, dtype=torch.int32)
    be, ci = torch.full_like(bs, J + 1), torch.full((3, 1, 2), J, dtype=torch.int32)
    counts = torch.zeros(3, 1, dtype=torch.int32)
    bc, fc, cc = counts.clone(), counts.clone(), counts.clone()
    for qb, (full, partial, cols) in enumerate(ranges):
        for i, (s, e) in enumerate(full + partial):
            bs[qb, 0, i], be[qb, 0, i] = s, e
        ci[qb, 0, : len(cols)] = torch.tensor(cols, dtype=torch.int32)
        bc[qb, 0], fc[qb, 0], cc[qb, 0] = len(full) + len(partial), len(full), len(cols)
    layout = SparseLayout(block_start=bs.to(DEVICE), block_end=be.to(DEVICE), block_count=bc.to(DEVICE),
                          full_count=fc.to(DEVICE), col_index=ci.to(DEVICE), col_count=cc.to(DEVICE))
    pl = pair_plan(layout, geom)
    S, AB = SENTINEL, IN_A | IN_B
    assert pl.pair_qb.tolist() == [0, 2] and pl.has_b.tolist() == [True, False]
    assert pl.range_count[:, 0].tolist() == [5, 2] and pl.full_count[:, 0].tolist() == [1, 1]
    assert pl.range_start.shape == (2, 1, 6)
    # [0, 64) is full in both blocks: once, unmasked; A's [64, 128) is masked (B's rows do not attend it);
    # [128, 192) and [128, 160) share a start only: two entries. Request 1's full range needs no mask (no B).
    assert pl.range_start[0, 0].tolist() == [0, 64, 128, 128, 192, S]
    assert pl.range_end[0, 0].tolist() == [64, 128, 192, 160, 230, S]
    assert pl.range_flag[0, 0].tolist() == [AB, IN_A, IN_A, IN_B, IN_B, 0]
    assert pl.range_start[1, 0, :2].tolist() == [0, 64] and pl.range_flag[1, 0, :3].tolist() == [IN_A, IN_A, 0]
    assert pl.col_count[:, 0].tolist() == [3, 0]
    assert pl.col_index[0, 0].tolist() == [69, 230, 240, S] and pl.col_flag[0, 0].tolist() == [IN_B, IN_A, AB, 0]
    assert pl.col_index[1, 0].tolist() == [S] * 4
    q, k, v = make_qkv(geom, 1, 1, 64, torch.float32)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    assert_matches(sparse_attention(q, kv, layout, geom, sm_scale=0.125, launch=PAIRED),
                   masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=0.125), torch.float32)


def test_paired_launch_with_wide_tiles_is_refused():
    geom = make_geometry([128], [0])
    q, k, v = make_qkv(geom, 2, 1, 64, torch.float16)
    with pytest.raises(ValueError, match="^launch: a paired launch"):
        sparse_attention(q, KVSource.packed(k, v, geom.seq_lens_k_cpu), full_layout(geom, 2, DEVICE), geom,
                         sm_scale=0.125, launch=PAIRED._replace(block_n=128))


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_full_layout_is_dense_causal_attention(dtype):
    geom = make_geometry([70, 1, 130], [130, 64, 0])
    layout = full_layout(geom, 4, DEVICE)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(layout.to_dense(geom), causal_masks(geom, 4)))
    q, k, v = make_qkv(geom, 4, 2, 64, dtype)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    assert_matches(sparse_attention(q, kv, layout, geom, sm_scale=0.125),
                   dense_attention(q, kv, geom, sm_scale=0.125), dtype)


def test_full_layout_split_follows_invariants():
    geom = make_geometry([200, 1], [37, 64])
    layout = full_layout(geom, 2, DEVICE)
    first = (geom.prefix_lens[geom.qb_request.long()] + geom.qb_row).tolist()
    for qb in range(geom.num_query_blocks):
        n, nf = int(layout.block_count[qb, 0]), int(layout.full_count[qb, 0])
        start, end = layout.block_start[qb, 0, :n].tolist(), layout.block_end[qb, 0, :n].tolist()
        for b in range(n):
            is_full = end[b] - start[b] == BLOCK and start[b] >= 0 and end[b] - 1 <= first[qb]
            assert is_full == (b < nf), (qb, b, start[b], end[b])
        assert start[:nf] == sorted(start[:nf]) and start[nf:] == sorted(start[nf:])
    # the single query at position 64 is covered by one unmasked range [1, 65) and the partial [-63, 1)
    assert layout.block_start[-1, 0, :2].tolist() == [1, -63] and int(layout.full_count[-1, 0]) == 1


@pytest.mark.parametrize("launch", [None, PAIRED], ids=["blocks", "pairs"])
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_rows_attending_nothing_give_zero_and_minus_inf(dtype, launch):
    geom = make_geometry([100, 64], [0, 30])
    q, k, v = make_qkv(geom, 2, 1, 64, dtype)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    layout = random_layout(geom, 2, seed=3, empty=0.0)
    # (qb 0, head 0): no range, no column. (qb 0, head 1): only keys right of every row of the block
    # (a partial range and a column past position 63), so every row attends nothing through the causal cut.
    layout.block_count[0, 0] = layout.full_count[0, 0] = layout.col_count[0, 0] = 0
    layout.block_start[0, 1, 0], layout.block_end[0, 1, 0] = 64, 90
    layout.col_index[0, 1, 0] = 95
    layout.block_count[0, 1], layout.full_count[0, 1], layout.col_count[0, 1] = 1, 0, 1
    o, lse = sparse_attention(q, kv, layout, geom, sm_scale=0.125, launch=launch)
    assert torch.isneginf(lse[:64]).all() and (o[:64] == 0).all()
    assert torch.isfinite(lse[64:]).all()
    assert_matches((o, lse), masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=0.125), dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_paged_kv_through_shuffled_pool(dtype):
    geom, q, k, v, layout, packed = run_case([70, 1, 130], [130, 64, 5], 4, 2, 64, dtype, layout_seed=5)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu, seed=2)
    assert not torch.equal(kv.req_pool_indices.sort().values, kv.req_pool_indices)
    got = sparse_attention(q, kv, layout, geom, sm_scale=0.125)
    assert_matches(got, masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=0.125), dtype)
    assert_matches(got, packed, dtype)


def hide_runs_from_table(kv: KVSource, geom: BatchGeometry) -> None:
    """Point the slot table of every run request at a NaN row: only a kernel that reads runs by ``run_start``
    still gets their keys right (the source is inconsistent on purpose; checked mode would refuse it)."""
    nan_slot = int(torch.isnan(kv.k[:, 0, 0]).nonzero()[0])
    for r, start in enumerate(kv.run_start.tolist()):
        if start >= 0:
            kv.req_to_token[kv.req_pool_indices[r], :geom.seq_lens_k_cpu[r]] = nan_slot


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_requests_in_consecutive_slots_read_by_row_arithmetic(dtype, block_n):
    """A paged request whose slots are one run is read through ``run_start`` (no slot table), the others through
    the table, in one launch; both give the packed result."""
    launch = AttentionLaunch(block_n=block_n, num_warps=4, num_stages=2)
    geom, q, k, v, layout, packed = run_case([70, 1, 130], [130, 64, 5], 4, 2, 64, dtype, layout_seed=5,
                                             launch=launch)
    kv = consecutive_pool(paged_kv(k, v, geom.seq_lens_k_cpu, seed=2), geom, [True, True, False])
    assert kv.run_start.tolist()[2] == -1 and min(kv.run_start.tolist()[:2]) > k.shape[0]
    hide_runs_from_table(kv, geom)
    got = sparse_attention(q, kv, layout, geom, sm_scale=0.125, launch=launch)
    assert_matches(got, packed, dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_descriptor_loads_match_masked_reference(dtype):
    """``tma``: full tiles of packed keys through tensor descriptors; a paged source (runs and table) ignores it."""
    launch = AttentionLaunch(block_n=64, num_warps=4, num_stages=2, tma=True)
    geom, q, k, v, layout, packed = run_case([70, 1, 130], [130, 64, 5], 4, 2, 64, dtype, layout_seed=5,
                                             launch=launch)
    assert (layout.full_count > 0).any()  # phase 1 ran through the descriptors
    kv = consecutive_pool(paged_kv(k, v, geom.seq_lens_k_cpu, seed=2), geom, [True, False, True])
    hide_runs_from_table(kv, geom)
    assert_matches(sparse_attention(q, kv, layout, geom, sm_scale=0.125, launch=launch), packed, dtype)
    with pytest.raises(ValueError, match="launch: descriptor loads"):
        sparse_attention(q, kv, layout, geom, sm_scale=0.125, launch=launch._replace(block_n=128))


def test_pool_run_starts():
    geom = make_geometry([3, 1, 4], [2, 0, 60])
    table = torch.full((4, 70), -1, dtype=torch.int32)
    table[2, :5] = torch.tensor([10, 11, 12, 13, 14])  # consecutive: a run from slot 10
    table[0, :1] = 7  # one key is a run
    table[1, :64] = torch.arange(20, 84)
    table[1, 40] = 99  # one slot out of order in the middle
    runs = pool_run_starts(table.to(DEVICE), torch.tensor([2, 0, 1], device=DEVICE), geom)
    assert runs.tolist() == [10, 7, -1] and runs.dtype == torch.int32


def test_run_start_is_checked():
    geom, q, k, v, layout, _ = run_case([70], [30], 2, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="run_start"):  # a contiguous source has no pool runs
        sparse_attention(q, KVSource(k=k, v=v, kv_start=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                                     run_start=torch.zeros(1, dtype=torch.int32, device=DEVICE)),
                         layout, geom, sm_scale=0.125)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu)
    with pytest.raises(ValueError, match="run_start"):
        sparse_attention(q, KVSource(k=kv.k, v=kv.v, req_to_token=kv.req_to_token,
                                     req_pool_indices=kv.req_pool_indices,
                                     run_start=torch.zeros(1, dtype=torch.int64, device=DEVICE)),
                         layout, geom, sm_scale=0.125)
    wrong = KVSource(k=kv.k, v=kv.v, req_to_token=kv.req_to_token, req_pool_indices=kv.req_pool_indices,
                     run_start=torch.zeros(1, dtype=torch.int32, device=DEVICE))  # the shuffled pool is no run
    with pytest.raises(ValueError, match="run_start: request 0: run from slot 0"):
        wrong.check_contents(geom)


def test_writes_into_out():
    geom = make_geometry([65], [3])
    q, k, v = make_qkv(geom, 2, 2, 64, torch.float16)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    layout = random_layout(geom, 2, seed=7, empty=0.0)
    out = torch.full_like(q, float("nan"))
    o, lse = sparse_attention(q, kv, layout, geom, sm_scale=0.125, out=out)
    assert o.data_ptr() == out.data_ptr()
    assert_matches((o, lse), masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=0.125), torch.float16)


def _valid_args():
    geom = make_geometry([10], [5])
    q, k, v = make_qkv(geom, 4, 2, 64, torch.float16)
    return q, KVSource.packed(k, v, geom.seq_lens_k_cpu), full_layout(geom, 4, DEVICE), geom


def _bad_head_dim(q, kv, layout, geom):
    q, kv.k, kv.v = q[..., :48], kv.k[..., :48], kv.v[..., :48]
    return q, kv, layout, geom, {}


def _bad_tokens(q, kv, layout, geom):
    return q[:-1], kv, layout, geom, {}


def _bad_kv_heads(q, kv, layout, geom):
    kv.k, kv.v = kv.k.repeat(1, 2, 1)[:, :3], kv.v.repeat(1, 2, 1)[:, :3]
    return q, kv, layout, geom, {}


def _bad_kv_dtype(q, kv, layout, geom):
    kv.k, kv.v = kv.k.float(), kv.v.float()
    return q, kv, layout, geom, {}


def _bad_layout_heads(q, kv, layout, geom):
    layout.block_count = layout.block_count[:, :2]
    return q, kv, layout, geom, {}


def _bad_col_index(q, kv, layout, geom):
    layout.col_index = layout.col_index.long()
    return q, kv, layout, geom, {}


def _bad_out(q, kv, layout, geom):
    return q, kv, layout, geom, {"out": torch.empty_like(q[:, :2])}


@pytest.mark.parametrize("corrupt, name", [
    (_bad_head_dim, "head_dim"), (_bad_tokens, "q"), (_bad_kv_heads, "k"), (_bad_kv_dtype, "k"),
    (_bad_layout_heads, "block_count"), (_bad_col_index, "col_index"), (_bad_out, "out"),
], ids=lambda x: getattr(x, "__name__", x))
def test_bad_inputs_raise_naming_the_argument(corrupt, name):
    q, kv, layout, geom, kwargs = corrupt(*_valid_args())
    with pytest.raises(ValueError, match=f"^{name}: "):
        sparse_attention(q, kv, layout, geom, sm_scale=0.125, **kwargs)


# ---- GPU (compiled kernel, moderate shapes): pytest -m gpu ----

GPU_CASES = {  # name: (seq_lens_q, prefix_lens, Hq, Hk, head_dim)
    "sk4096-d128": ([1024], [3072], 32, 8, 128),
    "ragged-d64": ([1000, 1, 300], [2000, 777, 0], 16, 4, 64),
    "d256": ([513], [1500], 8, 1, 256),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(GPU_CASES), ids=str)
def test_gpu_random_layout_matches_masked_reference(case, dtype):
    run_case(*GPU_CASES[case], dtype, keep=0.3, max_cols=300)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", list(GPU_CASES), ids=str)
def test_gpu_paired_launch_matches_masked_reference(case):
    """The paired-block launch compiled (bf16, two warpgroups over two query blocks), against the masked reference,
    paged K/V through a shuffled pool too. head_dim 256 takes 2 stages (3 exceed the shared memory, sm_90 check)."""
    d = GPU_CASES[case][4]
    launch = PAIRED._replace(num_stages=2) if d == 256 else PAIRED
    geom, q, k, v, layout, _ = run_case(*GPU_CASES[case], torch.bfloat16, keep=0.3, max_cols=300, launch=launch)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu, seed=4)
    got = sparse_attention(q, kv, layout, geom, sm_scale=d ** -0.5, launch=launch)
    assert_matches(got, masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=d ** -0.5), torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("tma", [False, True], ids=["rows", "tma"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=str)
def test_gpu_pool_runs_match_masked_reference(case, tma):
    """The default launch with pool runs compiled (one run, slot table) in one batch, bf16; with ``tma`` the full
    tiles of the packed keys through tensor descriptors (64-key tiles), the paged source as without."""
    d = GPU_CASES[case][4]
    launch = attention_launch(d, torch.bfloat16)._replace(pool_runs=True)
    if tma:
        launch = launch._replace(block_n=64, tma=True)
    geom, q, k, v, layout, packed = run_case(*GPU_CASES[case], torch.bfloat16, keep=0.3, max_cols=300,
                                             launch=launch)
    runs = [r % 2 == 0 for r in range(geom.num_requests)]
    kv = consecutive_pool(paged_kv(k, v, geom.seq_lens_k_cpu, seed=4), geom, runs)
    hide_runs_from_table(kv, geom)
    assert_matches(sparse_attention(q, kv, layout, geom, sm_scale=d ** -0.5, launch=launch), packed, torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_gpu_full_layout_is_dense_causal_attention():
    seq_lens_q, prefix_lens, hq, hk, d = GPU_CASES["sk4096-d128"]
    geom = make_geometry(seq_lens_q, prefix_lens)
    q, k, v = make_qkv(geom, hq, hk, d, torch.bfloat16)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    got = sparse_attention(q, kv, full_layout(geom, hq, DEVICE), geom, sm_scale=d ** -0.5)
    assert_matches(got, dense_attention(q, kv, geom, sm_scale=d ** -0.5), torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
def test_gpu_paged_kv_through_shuffled_pool():
    geom, q, k, v, layout, packed = run_case(*GPU_CASES["ragged-d64"], torch.bfloat16, keep=0.3, max_cols=300)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu, seed=4)
    got = sparse_attention(q, kv, layout, geom, sm_scale=64 ** -0.5)
    assert_matches(got, masked_attention(q, kv, geom, layout.to_dense(geom), sm_scale=64 ** -0.5), torch.bfloat16)
    assert_matches(got, packed, torch.bfloat16)
