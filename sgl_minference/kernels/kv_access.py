"""Shared Triton helper: where key position ``j`` of request ``r`` lives in the K/V tensors (see ``KVSource``)."""

import triton
import triton.language as tl


@triton.jit
def kv_rows(KvStart, ReqToToken, PoolIdx, r, j, stride_tok, PAGED: tl.constexpr, RunStart=None,
            RUNS: tl.constexpr = False):
    """int64 row of each key position in ``j`` (int32 vector, already clamped to valid positions).

    Contiguous: ``KvStart[r] + j``. Paged: ``ReqToToken[PoolIdx[r], j]`` (SGLang's pool, page size 1); with
    ``RUNS``, a request whose ``RunStart[r]`` (int32 [B], ``KVSource.run_start``) is a slot reads ``RunStart[r] + j``
    without touching the table, the others the table, in one code path (the table load is masked off for a run).
    """
    if PAGED:
        pool_row = tl.load(PoolIdx + r).to(tl.int64)
        if RUNS:
            run = tl.load(RunStart + r).to(tl.int64)
            table = tl.load(ReqToToken + pool_row * stride_tok + j, mask=(j >= 0) & (run < 0), other=0)
            rows = tl.where(run >= 0, run + j, table.to(tl.int64))
        else:
            rows = tl.load(ReqToToken + pool_row * stride_tok + j).to(tl.int64)
    else:
        rows = tl.load(KvStart + r).to(tl.int64) + j
    return rows


def kv_args(kv):
    """The pointer arguments and PAGED flag that ``kv_rows`` takes, from a ``KVSource``."""
    if kv.paged:
        return kv.req_to_token, kv.req_to_token, kv.req_pool_indices, kv.req_to_token.stride(0), True
    return kv.kv_start, kv.kv_start, kv.kv_start, 0, False
