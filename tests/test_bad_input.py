"""Bad input to the kernels and builders (issue 10, item 5): host-side checks that need no device sync, the
opt-in checked mode (``SGL_MINFERENCE_CHECKED``) for what only the device knows, and budgets bounded by the
context, not by their value.

No test here runs a kernel on an out-of-range index (in the interpreter that could crash the process too): the
kernels are replaced by a guard that fails the test if it is reached, so a check must raise before the launch.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, make_geometry, make_qkv, paged_kv

from sgl_minference import layout as layout_mod
from sgl_minference.config import MAX_BUDGET
from sgl_minference.kernels.estimate import lastq_scores, pool_keys
from sgl_minference.layout import BLOCK, CHECKED_ENV, KVSource, SparseLayout, env_flag
from sgl_minference.patterns import (HeadSet, build_a_shape, build_block_sparse, build_dense, build_vertical_slash,
                                     concat_heads)
from sgl_minference.testing import full_layout

attention_mod = importlib.import_module("sgl_minference.kernels.sparse_attention")
estimate_mod = importlib.import_module("sgl_minference.kernels.estimate")
HQ, HK, D = 4, 2, 64
SEQ_Q, PREFIX = [10, 20], [5, 30]  # contexts of 15 and 50 keys


class LaunchReached(Exception):
    """A guarded kernel was launched: the checks let the input through."""


class Guard:
    def __getitem__(self, grid):
        raise LaunchReached(f"kernel launched on grid {grid}")


@pytest.fixture
def no_launch(monkeypatch):
    """Every kernel that reads K/V through a KVSource is replaced by a guard."""
    monkeypatch.setattr(attention_mod, "_sparse_attention_fwd", Guard())
    monkeypatch.setattr(estimate_mod, "_lastq_lse_kernel", Guard())
    monkeypatch.setattr(estimate_mod, "_pool_keys_kernel", Guard())


def _inputs(paged: bool):
    geom = make_geometry(SEQ_Q, PREFIX)
    q, k, v = make_qkv(geom, HQ, HK, D, torch.float16)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu) if paged else KVSource.packed(k, v, geom.seq_lens_k_cpu)
    return q, kv, full_layout(geom, HQ, DEVICE), geom


def _every_reader(q, kv, layout, geom):
    """Each public function that reads ``kv`` for ``geom``, as zero-argument calls."""
    heads = torch.arange(HQ, device=q.device, dtype=torch.int32)
    return [lambda: attention_mod.sparse_attention(q, kv, layout, geom, sm_scale=D ** -0.5),
            lambda: lastq_scores(q, kv, geom, heads, heads // (HQ // HK), sm_scale=D ** -0.5),
            lambda: pool_keys(kv, geom)]


# ---- host checks: no device sync, always on -------------------------------------------------------------------


def _short_packed(q, kv, layout, geom):
    return q, KVSource.packed(kv.k[:60], kv.v[:60], geom.seq_lens_k_cpu), layout, geom


def _short_without_host_starts(q, kv, layout, geom):
    return q, KVSource(k=kv.k[:40], v=kv.v[:40], kv_start=kv.kv_start), layout, geom


def _narrow_req_to_token(q, kv, layout, geom):
    kv.req_to_token = kv.req_to_token[:, :40].contiguous()
    return q, kv, layout, geom


def _pool_indices_count(q, kv, layout, geom):
    kv.req_pool_indices = kv.req_pool_indices[:1]
    return q, kv, layout, geom


def _table_elsewhere(q, kv, layout, geom):
    kv.req_to_token = kv.req_to_token.to("meta")
    return q, kv, layout, geom


def _geometry_dtype(q, kv, layout, geom):
    geom.seq_lens_k = geom.seq_lens_k.long()
    return q, kv, layout, geom


def _geometry_length(q, kv, layout, geom):
    geom.prefix_lens = geom.prefix_lens[:1]
    return q, kv, layout, geom


@pytest.mark.parametrize("paged, corrupt, message", [
    (False, _short_packed, "k: 60 rows, but request 1 reads rows [15, 65)"),
    (False, _short_without_host_starts, "k: 40 rows, but a request has 50 keys"),
    (True, _narrow_req_to_token, "req_to_token: 40 slots per request, but a request has 50 keys"),
    (True, _pool_indices_count, "req_pool_indices: 1 entries for 2 requests"),
    (True, _table_elsewhere, "req_to_token: on meta"),
    (True, _geometry_dtype, "seq_lens_k: dtype torch.int64"),
    (False, _geometry_length, "prefix_lens: 1 entries, the host lengths give 2"),
], ids=lambda x: getattr(x, "__name__", None))
def test_host_checks_catch_kv_and_geometry_mismatches_before_any_launch(no_launch, paged, corrupt, message):
    args = corrupt(*_inputs(paged))
    for call in _every_reader(*args):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value).startswith(message), str(info.value)


def test_valid_inputs_pass_the_host_checks(no_launch):
    for paged in (False, True):
        for call in _every_reader(*_inputs(paged)):
            with pytest.raises(LaunchReached):
                call()


# ---- checked mode: device contents, one sync per check ----------------------------------------------------------


def _pool_index_out_of_range(q, kv, layout, geom):
    kv.req_pool_indices = kv.req_pool_indices.clone()
    kv.req_pool_indices[1] = kv.req_to_token.shape[0]  # one past the last pool row: an out-of-bounds table read
    return q, kv, layout, geom


def _slot_out_of_range(q, kv, layout, geom):
    kv.req_to_token = kv.req_to_token.clone()
    kv.req_to_token[kv.req_pool_indices[0], 3] = kv.k.shape[0]
    return q, kv, layout, geom


def _negative_slot(q, kv, layout, geom):
    kv.req_to_token = kv.req_to_token.clone()
    kv.req_to_token[kv.req_pool_indices[1], 49] = -1
    return q, kv, layout, geom


def _start_out_of_range(q, kv, layout, geom):
    return q, KVSource(k=kv.k, v=kv.v, kv_start=kv.kv_start + 20), layout, geom  # request 1: rows [35, 85) of 65


def _starts_disagree(q, kv, layout, geom):
    kv.kv_start = kv.kv_start.flip(0).contiguous()
    return q, kv, layout, geom


def _geometry_disagrees(q, kv, layout, geom):
    geom.seq_lens_k = geom.seq_lens_k + 1
    return q, kv, layout, geom


@pytest.mark.parametrize("paged, corrupt, message", [
    (True, _pool_index_out_of_range, r"req_pool_indices: request 1: pool row 5 outside the 5 rows of req_to_token"),
    (True, _slot_out_of_range, r"req_to_token: request 0 \(pool row \d+\), key 3: slot 72 outside the 72 rows of k"),
    (True, _negative_slot, r"req_to_token: request 1 \(pool row \d+\), key 49: slot -1 outside"),
    (False, _start_out_of_range, r"kv_start: request 1 reads rows \[35, 85\), k has 65"),
    (False, _starts_disagree, r"kv_start: disagrees with kv_start_cpu"),
    (False, _geometry_disagrees, r"seq_lens_k: disagrees with the host lengths"),
], ids=lambda x: getattr(x, "__name__", None))
def test_checked_mode_catches_bad_indices_before_the_launch(no_launch, monkeypatch, paged, corrupt, message):
    args = corrupt(*_inputs(paged))
    for call in _every_reader(*args):
        with pytest.raises(LaunchReached):  # unchecked, nothing on the host sees it: the kernel would read it
            call()
    monkeypatch.setattr(layout_mod, "CHECKED", True)
    for call in _every_reader(*args):
        with pytest.raises(ValueError, match=f"^{message}"):
            call()


def _layout_case(edit):
    """The full layout of the test batch with ``edit`` applied. Query block 0 (request 0, positions 5..14) has the
    one range [-49, 15), block 1 (request 1, positions 30..49) the one range [-14, 50), in every head; capacities
    are padded to 2 ranges and 4 columns."""
    def corrupt(q, kv, layout, geom):
        grown = {name: torch.nn.functional.pad(getattr(layout, name), (0, 1)) for name in ("block_start", "block_end")}
        layout = SparseLayout(**{**{k: t.clone() for k, t in vars(layout).items()}, **grown})
        layout.col_index = torch.zeros(*layout.col_index.shape[:2], 4, dtype=torch.int32, device=q.device)
        edit(layout)
        return q, kv, layout, geom
    corrupt.__name__ = edit.__name__
    return corrupt


def _too_many_ranges(lay):
    lay.block_count[1, 2] = lay.block_start.shape[2] + 1


def _full_beyond_count(lay):
    lay.full_count[0, 0] = lay.block_count[0, 0] + 1


def _too_many_columns(lay):
    lay.col_count[0, 1] = 5


def _column_past_the_context(lay):
    lay.col_count[0, 3] = 1
    lay.col_index[0, 3, 0] = 15  # request 0 has 15 keys


def _columns_not_ascending(lay):
    lay.col_count[1, 0] = 2
    lay.col_index[1, 0, :2] = torch.tensor([7, 3])


def _range_past_the_context(lay):
    lay.block_start[0, 1, 0], lay.block_end[0, 1, 0] = 15, 20


def _range_too_wide(lay):
    lay.block_start[1, 0, 0] = lay.block_end[1, 0, 0] - BLOCK - 1


def _range_left_of_key_zero(lay):
    lay.block_start[1, 2, 0], lay.block_end[1, 2, 0] = -60, 0


def _full_range_on_the_diagonal(lay):
    lay.full_count[1, 1] = 1  # the first range, [-14, 50), needs the causal and bounds masks


def _ranges_overlap(lay):
    lay.block_count[1, 3] = 2
    lay.block_start[1, 3, 1], lay.block_end[1, 3, 1] = 40, 50


@pytest.mark.parametrize("corrupt, message", [
    (_layout_case(_too_many_ranges), "block_count: query block 1, head 2: 3 ranges, capacity 2"),
    (_layout_case(_full_beyond_count), "full_count: query block 0, head 0: 2 full of 1 ranges"),
    (_layout_case(_too_many_columns), "col_count: query block 0, head 1: 5 columns, capacity 4"),
    (_layout_case(_column_past_the_context), "col_index: query block 0, head 3: column 0 is key 15, outside the 15"),
    (_layout_case(_columns_not_ascending), "col_index: query block 1, head 0: columns 0 and 1 (keys 7, 3)"),
    (_layout_case(_range_past_the_context), "block_start: query block 0, head 1: range 0 [15, 20) is not 1..64"),
    (_layout_case(_range_too_wide), "block_start: query block 1, head 0: range 0 [-15, 50) is not 1..64"),
    (_layout_case(_range_left_of_key_zero), "block_start: query block 1, head 2: range 0 [-60, 0) is not"),
    (_layout_case(_full_range_on_the_diagonal), "full_count: query block 1, head 1: range 0 [-14, 50) counted full"),
    (_layout_case(_ranges_overlap), "block_start: query block 1, head 3: range 0 [-14, 50) and range 1 [40, 50) "
                                    "overlap"),
], ids=lambda x: getattr(x, "__name__", None))
def test_checked_mode_catches_broken_layouts_before_the_launch(no_launch, monkeypatch, corrupt, message):
    q, kv, layout, geom = corrupt(*_inputs(paged=True))
    call = _every_reader(q, kv, layout, geom)[0]
    with pytest.raises(LaunchReached):
        call()
    monkeypatch.setattr(layout_mod, "CHECKED", True)
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message), str(info.value)


def test_checked_mode_accepts_every_builders_layouts(monkeypatch):
    """No false alarms: the layouts of every pattern (and their merge) pass, and checked attention equals the
    unchecked result."""
    geom = make_geometry([70, 30, 64], [150, 0, 90])
    q, k, v = make_qkv(geom, HQ, HK, D, torch.float16, seed=3)
    kv = paged_kv(k, v, geom.seq_lens_k_cpu)
    shape = dict(num_q_heads=HQ, num_kv_heads=HK, device=DEVICE)
    parts = [build_vertical_slash(q, kv, geom, HeadSet.build([0], **shape, vertical=[40], slash=[100]),
                                  sm_scale=D ** -0.5, forced_sink=4, forced_local=8),
             build_block_sparse(q, kv, geom, HeadSet.build([1], **shape, topk=[2])),
             build_a_shape(geom, HeadSet.build([2], **shape, sink=[9], local=[70])),
             build_dense(geom, HeadSet.build([3], **shape))]
    for part in parts:
        part.check_contents(geom)
    layout = concat_heads(parts, [[0], [1], [2], [3]], HQ)
    o_ref, lse_ref = attention_mod.sparse_attention(q, kv, layout, geom, sm_scale=D ** -0.5)
    monkeypatch.setattr(layout_mod, "CHECKED", True)
    o, lse = attention_mod.sparse_attention(q, kv, layout, geom, sm_scale=D ** -0.5)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)


def test_checked_mode_is_read_from_the_environment_once():
    assert env_flag("1") and env_flag(" TRUE ") and env_flag("on") and env_flag("yes")
    assert not (env_flag(None) or env_flag("") or env_flag("0") or env_flag("false"))
    root = Path(__file__).parents[1]
    code = "import sgl_minference.layout as m; print(m.CHECKED)"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, CHECKED_ENV: value, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


# ---- budgets beyond the context cost what the context costs ------------------------------------------------------


def test_a_shape_budgets_are_clamped_to_the_context():
    geom = make_geometry([128, 40], [0, 0])  # contexts of 128 and 40 keys
    shape = dict(num_q_heads=2, num_kv_heads=1, device=DEVICE)
    huge = HeadSet.build([0, 1], **shape, sink=[10**5, 4], local=[10**6, 16])
    start = time.perf_counter()
    layout = build_a_shape(geom, huge)
    elapsed = time.perf_counter() - start
    # Unclamped, sink=1e5 built a [.., 100000] column table: 55 s; clamped it took 0.2 s here (interpreter, CPU).
    assert elapsed < 2.0, f"{elapsed:.1f} s"
    assert layout.col_index.shape[2] <= 128
    assert layout.same_as(build_a_shape(geom, HeadSet.build([0, 1], **shape, sink=[128, 4], local=[128, 16])))
    assert torch.equal(layout.to_dense(geom)[0][0], torch.ones(128, 128).tril().bool())  # head 0: every causal key


@pytest.mark.parametrize("kind", ["vertical_slash", "block_sparse"])
def test_dynamic_budgets_at_the_cap_equal_budgets_at_the_context(kind):
    geom = make_geometry([100], [28])
    q, k, v = make_qkv(geom, 2, 1, D, torch.float16, seed=5)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    shape = dict(num_q_heads=2, num_kv_heads=1, device=DEVICE)

    def build(budget):
        if kind == "block_sparse":
            return build_block_sparse(q, kv, geom, HeadSet.build([0, 1], **shape, topk=[budget, 1]))
        heads = HeadSet.build([0, 1], **shape, vertical=[budget, 8], slash=[budget, 8])
        return build_vertical_slash(q, kv, geom, heads, sm_scale=D ** -0.5, forced_sink=2, forced_local=2)

    capped, context = build(MAX_BUDGET), build(128)
    assert capped.same_as(context)
    assert capped.block_start.shape[2] <= 128 and capped.col_index.shape[2] <= 128


def test_the_gpu_check_script_on_cpu(tmp_path):
    """``benchmarks.bad_input_check`` (the GPU run's command) at interpreter shapes: every case passes."""
    from benchmarks import bad_input_check

    records = bad_input_check.run(128, 64, torch.device(DEVICE), hq=4, hk=2, d=64)
    assert [r["case"] for r in records] == ["checked_rejects_pool_index", "checked_rejects_slot",
                                            "checked_rejects_layout_column", "checked_output", "checked_cost",
                                            "a_shape_huge_budgets"]
    assert all(r["status"] == "ok" for r in records), records
    assert layout_mod.CHECKED is False
