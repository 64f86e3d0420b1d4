"""Test helpers shared by the pair-counting tests (tests/test_stats.py, tests/test_benchmarks.py): a random
``SparseLayout`` of ranges and columns, and the brute-force count of the (query, key) pairs a kernel visits."""

from __future__ import annotations

import random

import torch

from sgl_minference.layout import BLOCK, BatchGeometry, SparseLayout


def random_range_column_layout(geom: BatchGeometry, heads: int, seed: int) -> SparseLayout:
    """Per (query block, head) disjoint ranges of 1..64 keys (anywhere in the request's context, some past the
    diagonal) and up to 5 columns outside them; int32 tensors on the CPU, ``full_count`` 0."""
    rng = random.Random(seed)
    per = []
    for r in geom.qb_request.tolist():
        sk = geom.seq_lens_k_cpu[r]
        row = []
        for _ in range(heads):
            taken, ranges = set(), []
            for _ in range(rng.randint(0, 4)):
                s = rng.randrange(sk)
                e = min(sk, s + rng.randint(1, BLOCK))
                if taken.isdisjoint(range(s, e)):
                    taken.update(range(s, e))
                    ranges.append((s, e))
            free = [j for j in range(sk) if j not in taken]
            row.append((sorted(ranges), sorted(rng.sample(free, min(len(free), rng.randint(0, 5))))))
        per.append(row)
    nqb = len(per)
    maxb = max(1, max(len(p[0]) for row in per for p in row))
    maxc = max(1, max(len(p[1]) for row in per for p in row))
    bs, be = torch.zeros(nqb, heads, maxb, dtype=torch.int32), torch.zeros(nqb, heads, maxb, dtype=torch.int32)
    ci = torch.zeros(nqb, heads, maxc, dtype=torch.int32)
    bc, cc = torch.zeros(nqb, heads, dtype=torch.int32), torch.zeros(nqb, heads, dtype=torch.int32)
    for qb, row in enumerate(per):
        for h, (ranges, cols) in enumerate(row):
            bc[qb, h], cc[qb, h] = len(ranges), len(cols)
            for b, (s, e) in enumerate(ranges):
                bs[qb, h, b], be[qb, h, b] = s, e
            ci[qb, h, : len(cols)] = torch.tensor(cols, dtype=torch.int32)
    return SparseLayout(block_start=bs, block_end=be, block_count=bc, full_count=torch.zeros_like(bc),
                        col_index=ci, col_count=cc)


def brute_visited(layout: SparseLayout, geom: BatchGeometry) -> list[int]:
    """Per request, the (query, key) pairs a kernel visits: each valid row of a query block times the keys of
    its ranges and columns, masked or not, over every head; host loops."""
    visited = [0] * geom.num_requests
    for qb, (r, row) in enumerate(zip(geom.qb_request.tolist(), geom.qb_row.tolist())):
        rows = min(BLOCK, geom.seq_lens_q_cpu[r] - row)
        for h in range(layout.num_heads):
            n = int(layout.block_count[qb, h])
            keys = int((layout.block_end[qb, h, :n] - layout.block_start[qb, h, :n]).sum())
            visited[r] += rows * (keys + int(layout.col_count[qb, h]))
    return visited
