"""CPU tests of the benchmark harness: work accounting, layout conversions, planted input structure,
results files, the e2e bookkeeping, plots and the report tables."""

import json
import sys
from pathlib import Path

import pytest
import torch
from random_layouts import brute_visited, random_range_column_layout

from benchmarks import common, e2e_ttft, kernel_bench, plot, report
from benchmarks.common import E2ERecord, KernelRecord
from sgl_minference.layout import BLOCK, BatchGeometry, SparseLayout, causal_pairs


GEOMETRIES = [(200, 200), (130, 300), (64, 64), (1, 97)]  # full prefill, chunk with a prefix, odd tails


@pytest.mark.parametrize("seq_q,seq_k", GEOMETRIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_layout_pairs_match_brute_force(seq_q, seq_k, seed):
    geom = BatchGeometry.build([seq_q], [seq_k], "cpu")
    layout = random_range_column_layout(geom, heads=3, seed=seed)
    counted = common.layout_pairs(layout, geom)
    assert counted.attended == int(layout.to_dense(geom)[0].sum())
    assert [counted.visited] == brute_visited(layout, geom)


def causal_block_mask(geom: BatchGeometry, heads: int) -> torch.Tensor:
    sq, sk = geom.seq_lens_q_cpu[0], geom.seq_lens_k_cpu[0]
    nb = -(-sk // BLOCK)
    last_row = (geom.qb_row + BLOCK - 1).clamp(max=sq - 1) + (sk - sq)
    mask = torch.arange(nb).view(1, -1) * BLOCK <= last_row.view(-1, 1)
    return mask[:, None, :].expand(-1, heads, -1).clone()


@pytest.mark.parametrize("seq_q,seq_k", GEOMETRIES)
def test_dense_layout_counts_causal_pairs(seq_q, seq_k):
    geom = BatchGeometry.build([seq_q], [seq_k], "cpu")
    layout = kernel_bench.layout_from_block_mask(causal_block_mask(geom, 2), geom)
    causal = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
    assert torch.equal(layout.to_dense(geom)[0], causal.expand(2, -1, -1))
    assert common.layout_pairs(layout, geom).attended == causal_pairs(seq_q, seq_k, 2)
    assert causal_pairs(seq_q, seq_k, 2) == 2 * int(causal.sum())


@pytest.mark.parametrize("seq_q,seq_k", [(256, 256), (130, 300)])
def test_block_mask_round_trip(seq_q, seq_k):
    geom = BatchGeometry.build([seq_q], [seq_k], "cpu")
    g = torch.Generator().manual_seed(0)
    causal = causal_block_mask(geom, 4)
    mask = causal & (torch.rand(causal.shape, generator=g) < 0.5)
    layout = kernel_bench.layout_from_block_mask(mask, geom, chunk_blocks=2)
    assert torch.equal(kernel_bench.block_mask_of(layout, causal.shape[-1]), mask)
    expanded = mask.repeat_interleave(BLOCK, dim=-1)[..., :seq_k].repeat_interleave(BLOCK, dim=0)[:seq_q]
    expanded = expanded.permute(1, 0, 2) & torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
    assert torch.equal(layout.to_dense(geom)[0], expanded)
    # Invariants: full ranges are 64 wide, left of the block's first row, and come first.
    first_row = geom.qb_row + (seq_k - seq_q)
    for qb in range(geom.num_query_blocks):
        for h in range(4):
            f, n = int(layout.full_count[qb, h]), int(layout.block_count[qb, h])
            starts, ends = layout.block_start[qb, h, :n], layout.block_end[qb, h, :n]
            assert torch.all(starts[1:] > starts[:-1])
            assert torch.all(ends[:f] - starts[:f] == BLOCK) and torch.all(ends[:f] - 1 <= first_row[qb])
            assert not torch.any((ends[f:] - starts[f:] == BLOCK) & (ends[f:] - 1 <= first_row[qb]))


def test_block_mask_of_marks_straddling_ranges_and_columns():
    layout = SparseLayout(
        block_start=torch.tensor([[[100, 0]], [[0, 0]]], dtype=torch.int32),
        block_end=torch.tensor([[[140, 0]], [[10, 0]]], dtype=torch.int32),
        block_count=torch.tensor([[1], [1]], dtype=torch.int32),
        full_count=torch.zeros(2, 1, dtype=torch.int32),
        col_index=torch.tensor([[[200]], [[70]]], dtype=torch.int32),
        col_count=torch.tensor([[1], [0]], dtype=torch.int32))
    mask = kernel_bench.block_mask_of(layout, 4)
    assert mask[0, 0].tolist() == [False, True, True, True]  # range 100..139 spans blocks 1-2, column 200 in 3
    assert mask[1, 0].tolist() == [True, False, False, False]  # an invalid column slot is ignored


def test_union_over_groups():
    mask = torch.zeros(2, 4, 3, dtype=torch.bool)
    mask[0, 1, 2] = True  # query head 1 -> KV head 0
    mask[1, 3, 0] = mask[1, 2, 1] = True  # query heads 2, 3 -> KV head 1
    united = kernel_bench.union_over_groups(mask, num_kv_heads=2)
    assert united.shape == (2, 2, 3)
    assert united[0].tolist() == [[False, False, True], [False, False, False]]
    assert united[1].tolist() == [[False, False, False], [True, True, False]]


def test_sgl_layout_pairs_counts_64_wide_blocks():
    geom = BatchGeometry.build([128], [320], "cpu")
    inp = kernel_bench.Inputs(q=torch.zeros(128, 1, 8), k=torch.zeros(320, 1, 8), v=torch.zeros(320, 1, 8),
                              geom=geom, kv=None, sm_scale=1.0)
    # sgl_kernel's format: [batch, heads, rows, nnz]; row block 0 gets blocks at 0 and 192, column 100.
    converted = (torch.tensor([[[2, 1]]]), torch.tensor([[[[0, 192], [256, 0]]]]),
                 torch.tensor([[[1, 0]]]), torch.tensor([[[[100], [0]]]]))
    counted = kernel_bench.sgl_layout_pairs(converted, inp)
    layout = SparseLayout(block_start=torch.tensor([[[0, 192]], [[256, 0]]], dtype=torch.int32),
                          block_end=torch.tensor([[[64, 256]], [[320, 0]]], dtype=torch.int32),
                          block_count=torch.tensor([[2], [1]], dtype=torch.int32),
                          full_count=torch.zeros(2, 1, dtype=torch.int32),
                          col_index=torch.tensor([[[100]], [[0]]], dtype=torch.int32),
                          col_count=torch.tensor([[1], [0]], dtype=torch.int32))
    assert counted.attended == int(layout.to_dense(geom)[0].sum())
    assert counted.visited == 64 * (64 + 64 + 1) + 64 * 64


def test_our_kernel_on_the_sgl_converter_layout_attends_its_key_set():
    """layout_from_sgl: our kernel over sgl_kernel's block offsets and columns = attention over exactly those keys."""
    from sgl_minference.kernels import sparse_attention
    from sgl_minference.layout import KVSource
    from sgl_minference.testing import masked_attention

    seq_q, seq_k, d = 128, 320, 64
    geom = BatchGeometry.build([seq_q], [seq_k], "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 1, d, generator=g).half() for n in (seq_q, seq_k, seq_k))
    # Row block 0 (positions 192..255): blocks at 0 and 192 and column 100; row block 1 (256..319): block at 256.
    converted = (torch.tensor([[[2, 1]]], dtype=torch.int32),
                 torch.tensor([[[[0, 192], [256, 0]]]], dtype=torch.int32),
                 torch.tensor([[[1, 0]]], dtype=torch.int32), torch.tensor([[[[100], [0]]]], dtype=torch.int32))
    keys = torch.zeros(seq_q, seq_k, dtype=torch.bool)
    keys[:64, 0:64] = keys[:64, 192:256] = keys[:64, 100] = True
    keys[64:, 256:320] = True
    keys &= torch.arange(seq_k)[None, :] <= (192 + torch.arange(seq_q))[:, None]  # causal, bottom-right
    kv = KVSource.packed(k, v, [seq_k])
    got, _ = sparse_attention(q, kv, kernel_bench.layout_from_sgl(converted, seq_k), geom, sm_scale=0.125)
    want, _ = masked_attention(q, kv, geom, [keys[None]], sm_scale=0.125)
    assert (got.float() - want.float()).abs().max() < 2e-3


def test_make_inputs_plants_heavy_columns_and_local_band():
    inp = kernel_bench.make_inputs(seq_q=512, seq_k=1024, num_q_heads=4, num_kv_heads=2, head_dim=64, seed=0,
                                   device="cpu")
    assert inp.q.shape == (512, 4, 64) and inp.k.shape == (1024, 2, 64) and inp.q.dtype == torch.bfloat16
    scores = torch.einsum("qhd,khd->hqk", inp.q[:, :2].float(), inp.k[:, :1].expand(-1, 2, -1).float())
    scores = scores * inp.sm_scale  # query heads 0, 1 share KV head 0
    column = scores.mean(dim=(0, 1))  # [Sk]: mean score of each key over queries
    assert column[0] > column.mean() + 2.0  # column 0 is always planted
    assert (column > column.mean() + 2.0).sum() >= 8  # most of the 32 planted columns stand out
    pos = torch.arange(512, 1024)
    near = scores[:, torch.arange(512), pos - 1].mean()
    far = scores[:, torch.arange(512), pos - 400].mean()
    assert near > far + 1.5  # the local band: neighbours score higher than distant keys


def test_geometries_and_lengths():
    assert kernel_bench.geometries([8192, 16384], 8192) == [(8192, 8192), (16384, 16384), (8192, 16384)]
    assert common.parse_lengths("8K, 1m,4096") == [8192, 1 << 20, 4096]
    with pytest.raises(ValueError, match="lengths"):
        common.parse_lengths("8Q")
    assert e2e_ttft.parse_mixed("64Kx2,2Kx1") == [65536, 65536, 2048]


def kernel_results() -> dict:
    results = common.new_results("kernel")
    run0 = common.add_run(results, settings={"cases": ["fa3"]})
    run1 = common.add_run(results, settings={"cases": ["ours_vs"]}, unavailable={"flashinfer": "ImportError"})
    for run, n, fa3_ms, vs_ms in ((run0, 8192, 99.0, None), (run1, 8192, 4.0, 2.0), (run1, 65536, 200.0, 50.0)):
        common.add_record(results, KernelRecord(run=run, method="fa3", pattern="dense", seq_q=n, seq_k=n,
                                                head_dim=128, num_q_heads=32, num_kv_heads=8, dtype="bfloat16",
                                                status="ok", attn_ms=fa3_ms, attn_ms_all=[fa3_ms], pairs=10,
                                                visited_pairs=10, density=1.0, tflops=500.0, peak_mib=1.0))
        if vs_ms is not None:
            common.add_record(results, KernelRecord(
                run=run, method="ours", pattern="vertical_slash", seq_q=n, seq_k=n, head_dim=128, num_q_heads=32,
                num_kv_heads=8, dtype="bfloat16", status="ok", attn_ms=vs_ms, index_ms=vs_ms / 2, pairs=3,
                visited_pairs=4, density=0.25, tflops=300.0, peak_mib=2.0, params={"vertical": 1000}))
    common.add_record(results, KernelRecord(run=run1, method="sgl_kernel", pattern="vertical_slash", seq_q=8192,
                                            seq_k=8192, head_dim=128, num_q_heads=32, num_kv_heads=8,
                                            dtype="bfloat16", status="skipped", reason="unavailable: sgl_sparse"))
    common.validate_results(results)
    return results


def test_results_round_trip_and_latest_wins(tmp_path):
    path = tmp_path / "kernel.json"
    assert common.load_results(path, "kernel") == common.new_results("kernel")  # no file yet
    written = kernel_results()
    common.save_results(path, written)
    loaded = common.load_results(path, "kernel")
    assert loaded == json.loads(json.dumps(written))
    assert loaded["runs"][1]["unavailable"] == {"flashinfer": "ImportError"}
    assert {"command", "date", "device", "versions"} <= set(loaded["runs"][0])
    fa3 = {r.seq_k: r.attn_ms for r in common.latest_records(loaded) if r.method == "fa3"}
    assert fa3 == {8192: 4.0, 65536: 200.0}  # run 1 replaced run 0's 99 ms
    done = common.done_keys(loaded)
    assert ("ours", "vertical_slash", 8192, 8192, 128, 32, 8, "bfloat16") in done
    assert not any(k[0] == "sgl_kernel" for k in done)  # skipped cases are retried on --resume
    with pytest.raises(ValueError, match="e2e"):
        common.load_results(path, "e2e")


@pytest.mark.parametrize("corrupt,match", [
    (lambda r: r["records"][0].update(bogus=1), "unknown fields"),
    (lambda r: r["records"][0].update(status="fine"), "status"),
    (lambda r: r["records"][0].update(run=7), "run 7"),
    (lambda r: r["records"][0].pop("seq_k"), "seq_k"),
    (lambda r: r.update(schema="other"), "schema"),
])
def test_results_validation_rejects(tmp_path, corrupt, match):
    results = kernel_results()
    corrupt(results)
    with pytest.raises(ValueError, match=match):
        common.save_results(tmp_path / "bad.json", results)
    assert not (tmp_path / "bad.json").exists()


def e2e_results() -> dict:
    results = common.new_results("e2e")
    run = common.add_run(results, settings={})

    def rec(backend, lens, ttft, status="ok", scenario="single"):
        return E2ERecord(run=run, model="llama3-8b", backend=backend, scenario=scenario, input_lens=lens,
                         status=status, ttft_ms=ttft, gpu_used_base_mib=1000.0, gpu_used_peak_mib=1500.0,
                         reason="" if status == "ok" else "out of memory")

    for r in (rec("fa3", [8192], 400.0), rec("flashinfer", [8192], 500.0), rec("minference", [8192], 800.0),
              rec("fa3", [131072], 12000.0), rec("flashinfer", [131072], 10000.0),
              rec("minference", [131072], 4000.0), rec("minference", [262144], None, status="oom"),
              rec("fa3", [65536] * 2 + [2048], 9000.0, scenario="mixed"),
              rec("minference", [65536] * 2 + [2048], 6000.0, scenario="mixed")):
        common.add_record(results, r)
    common.validate_results(results)
    return results


def test_speedup_series():
    panels = plot.kernel_speedups(kernel_results())
    series = panels["head_dim 128, full prefill"]
    assert series["ours vertical_slash"] == [(8192, 4.0 / 3.0), (65536, 200.0 / 75.0)]
    assert series["ours vertical_slash (attention only)"] == [(8192, 2.0), (65536, 4.0)]
    e = plot.e2e_speedups(e2e_results())
    assert e == {"llama3-8b": {"minference": [(8192, 0.5), (131072, 2.5)]}}  # vs the faster dense backend


def test_plots_written(tmp_path):
    kpath, epath = tmp_path / "kernel.json", tmp_path / "e2e.json"
    common.save_results(kpath, kernel_results())
    common.save_results(epath, e2e_results())
    plot.main(["--kernel", str(kpath), "--e2e", str(epath), "--out-dir", str(tmp_path / "fig")])
    for name in ("kernel_speedup.png", "e2e_ttft_speedup.png"):
        data = (tmp_path / "fig" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="no successful records"):
        plot.draw({}, tmp_path / "empty.png", ylabel="", title="empty")


def test_report_tables(tmp_path):
    kpath, epath, doc = tmp_path / "kernel.json", tmp_path / "e2e.json", tmp_path / "BENCHMARKS.md"
    common.save_results(kpath, kernel_results())
    common.save_results(epath, e2e_results())
    doc.write_text("# Benchmarks\n\nProse before.\n")
    report.main(["--kernel", str(kpath), "--e2e", str(epath), "--out", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nProse before.\n")
    assert "| 8192 | 4.00 (500) |" in text  # dense FA3 from the latest run, not the 99 ms of run 0
    assert "| 65536 | vertical_slash | ours | 25.00 | 50.00 | 0.250 | 300 | 2.67x | 2 |" in text
    assert "| 8192 | vertical_slash | sgl_kernel | skipped |" in text
    assert "| single | 131072 | 12000 | 10000 | 4000 | 2.50x | 500 | 500 | 500 |" in text
    assert "| mixed | 2 x 65536 + 1 x 2048 | 9000 |  | 6000 | 1.50x |" in text
    assert "| single | 262144 |  |  | oom |  |" in text
    assert "- minference single [262144]: oom: out of memory" in text
    assert text.count("`") >= 4 and "cpu" in text  # captions name device and command
    # Regenerating replaces the sections in place instead of appending copies.
    report.main(["--kernel", str(kpath), "--e2e", str(epath), "--out", str(doc)])
    assert doc.read_text() == text
    assert text.count(report.marker("kernel", "begin")) == 1


def test_e2e_bookkeeping():
    scenarios = e2e_ttft.plan_scenarios([32768, 8192], ["single", "mixed"], [65536, 2048])
    assert [(s.name, s.input_lens) for s in scenarios] == [("single", [8192]), ("single", [32768]),
                                                            ("mixed", [65536, 2048])]
    done = {("m", "fa3", "single", (8192,), "", None)}
    todo = e2e_ttft.pending(scenarios, done, "m", "fa3")
    assert [s.input_lens for s in todo] == [[32768], [65536, 2048]]
    # The worker reported 32K as an OOM, then died: the exit is blamed on the next case, mixed.
    line = {"model": "m", "backend": "fa3", "scenario": "single", "input_lens": [32768], "status": "oom",
            "reason": "CUDA out of memory"}
    recs = e2e_ttft.records_for_backend([line], todo, 0, model="m", backend="fa3", exit_status="error",
                                        exit_note="engine subprocess exited with code 1")
    assert [(r.scenario, r.status) for r in recs] == [("single", "oom"), ("mixed", "error")]
    # A budget timeout before anything was reported: the first case is the one that timed out.
    recs = e2e_ttft.records_for_backend([], todo, 0, model="m", backend="fa3", exit_status="timeout",
                                        exit_note="command budget ran out")
    assert [(r.input_lens, r.status) for r in recs] == [([32768], "timeout"), ([65536, 2048], "skipped")]
    # Longer single lengths after a failed one are recorded as not run.
    more = e2e_ttft.plan_scenarios([8192, 16384, 32768], ["single"], [])
    line = dict(line, input_lens=[8192])
    recs = e2e_ttft.records_for_backend([line], more, 0, model="m", backend="fa3", exit_status="ok", exit_note="")
    assert [(r.input_lens, r.status) for r in recs] == [([8192], "oom"), ([16384], "skipped"), ([32768], "skipped")]


def test_count_pairs_closed_form_is_exact_on_long_ranges():
    # One 64-wide range placed across the diagonal of a 64-row block at position 1000: rows see 1..64 keys.
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    geom = BatchGeometry.build([64], [1064], "cpu")  # one 64-row block at positions 1000..1063
    layout = SparseLayout(block_start=i32([[[1000, 500]]]), block_end=i32([[[1064, 510]]]), block_count=i32([[2]]),
                          full_count=i32([[0]]), col_index=i32([[[1050]]]), col_count=i32([[1]]))
    counted = common.layout_pairs(layout, geom)
    assert counted.attended == 64 * 65 // 2 + 64 * 10 + (1064 - 1050)
    assert counted.visited == 64 * 64 + 64 * 10 + 64
    assert common.attention_tflops(10**12, 128, 1000.0) == pytest.approx(512.0)  # 4 * 128e12 flops in 1 s


def cpu_measure(fn, plan):
    """``common.measure`` without CUDA events: one call, wall-clock time (plumbing tests only)."""
    import time

    t = time.perf_counter()
    result = fn()
    return common.Measurement(times_ms=[(time.perf_counter() - t) * 1e3], peak_mib=0.0, result=result)


def dense_reference(inp) -> torch.Tensor:
    """Bottom-right causal GQA attention in fp32: [Sq, Hq, D]."""
    group = inp.q.shape[1] // inp.k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (inp.k, inp.v))
    s = torch.einsum("qhd,khd->hqk", inp.q.float(), k) * inp.sm_scale
    s = s.masked_fill(~torch.ones(inp.seq_q, inp.seq_k, dtype=torch.bool, device=s.device)
                      .tril(inp.seq_k - inp.seq_q), float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_run_case_plumbing(monkeypatch):
    """Our cases and an SDPA baseline through run_case at a tiny shape (Triton interpreter on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setattr(kernel_bench, "measure", cpu_measure)
    libs, unavailable = kernel_bench.load_libraries()
    assert "ours" in libs and "sdpa" in libs, unavailable
    inp = kernel_bench.make_inputs(seq_q=192, seq_k=320, num_q_heads=4, num_kv_heads=2, head_dim=64, seed=1,
                                   device=device)
    inp.q, inp.k, inp.v = (t.half() for t in (inp.q, inp.k, inp.v))  # the interpreter's bf16 dot is wrong
    inp.kv = kernel_bench.KVSource.packed(inp.k, inp.v, [inp.seq_k])
    budgets = kernel_bench.Budgets(vertical=40, slash=100, block_topk=2, sink=16, local=64)
    refs = {"fa3": dense_reference(inp).half()}  # stands in for FA3: the dense cases are checked against it
    plan = common.TimingPlan()
    got = {case: kernel_bench.run_case(case, inp, libs, budgets, plan, refs)
           for case in ("ours_dense", "ours_vs", "ours_bs", "ours_bs_union", "ours_ashape")}
    total = causal_pairs(192, 320, 4)
    assert got["ours_dense"]["pairs"] == total and got["ours_dense"]["density"] == 1.0
    assert got["ours_dense"]["params"]["check"]["max_abs_diff"] < 2e-2
    for case, rec in got.items():
        assert 0 < rec["pairs"] <= rec["visited_pairs"], case
        assert rec["index_ms"] is not None and rec["attn_ms"] > 0, case
    assert got["ours_vs"]["density"] < 1.0 and got["ours_ashape"]["density"] < 1.0
    assert got["ours_bs_union"]["pairs"] >= got["ours_bs"]["pairs"]  # the union keeps every head's blocks
    assert set(refs) == {"fa3", "ours_vs", "ours_bs_union"}  # references kept for the cases checked later
    if device == "cpu":  # SDPA's math back-end on CPU exercises the GQA and layout handling
        params = {}
        full = kernel_bench.make_inputs(seq_q=128, seq_k=128, num_q_heads=4, num_kv_heads=2, head_dim=64, seed=2,
                                        device=device)
        out = kernel_bench.dense_sdpa(full, libs, "MATH", params)()
        assert params["gqa"] == "enable_gqa"
        assert (out.float() - dense_reference(full)).abs().max() < 5e-2
        with pytest.raises(NotImplementedError, match="top-left"):
            kernel_bench.dense_sdpa(inp, libs, "MATH", params)


class FakeEngine:
    """Stands in for sglang.Engine: refuses prompts over ``limit`` tokens, or crashes at ``crash_at``."""

    limit, crash_at, prompts = 2500, None, []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def get_server_info(self):
        return {"attention_backend": self.kwargs["attention_backend"], "chunked_prefill_size": 8192,
                "context_length": self.kwargs["context_length"], "unrelated": 1}

    def generate(self, input_ids, sampling_params):
        assert len(sampling_params) == len(input_ids) and sampling_params[0] == {"max_new_tokens": 1}
        longest = max(len(ids) for ids in input_ids)
        if longest == self.crash_at:
            raise RuntimeError("scheduler died")
        if longest > self.limit:
            raise ValueError(f"The input ({longest} tokens) is longer than the model's context length")
        FakeEngine.prompts += [tuple(ids[:32]) for ids in input_ids]
        return [{"meta_info": {"e2e_latency": 0.002, "finish_reason": {"type": "length"}}} for _ in input_ids]

    def shutdown(self):
        pass


class FakeMonitor:
    def __init__(self):
        self.peak = 150.0

    def reset_peak(self):
        return 100.0

    def stop(self):
        pass


@pytest.mark.parametrize("crash_at", [None, 2000])
def test_e2e_worker_records(tmp_path, monkeypatch, crash_at):
    import types

    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=FakeEngine))
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")  # restored afterwards
    for name in ("SGL_MINFERENCE_STATS", "SGL_MINFERENCE_SYNTHETIC"):
        monkeypatch.setenv(name, "")  # the worker sets them: restored (unset) after the test, not leaked
    monkeypatch.setattr(e2e_ttft, "GpuMemoryMonitor", FakeMonitor)
    monkeypatch.setattr(FakeEngine, "crash_at", crash_at)
    monkeypatch.setattr(FakeEngine, "prompts", [])
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    scenarios = e2e_ttft.plan_scenarios([1000, 2000, 4000, 8000], ["single", "mixed"], [2000, 100])
    spec = e2e_ttft.WorkerSpec(model_dir=str(tmp_path), model="tiny", backend="fa3",
                               scenarios=[vars(s) for s in scenarios], warmup_lens=[64], reps=3, rep_budget_s=60.0,
                               seed=0, records_path=str(tmp_path / "records.jsonl"))
    e2e_ttft.worker(spec)
    lines = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    recs = e2e_ttft.records_for_backend(lines, scenarios, 0, model="tiny", backend="fa3", exit_status="ok",
                                        exit_note="")
    got = [(r.scenario, r.input_lens[0], r.status) for r in recs]
    if crash_at is None:  # 4000 refused: 8000 not run, the engine still serves the mixed batch
        assert got == [("single", 1000, "ok"), ("single", 2000, "ok"), ("single", 4000, "error"),
                       ("mixed", 2000, "ok"), ("single", 8000, "skipped")]
        assert "context length" in recs[2].reason
        mixed = recs[3]
        assert mixed.request_ms == [2.0, 2.0] and len(mixed.ttft_ms_all) == 3
        assert mixed.gpu_used_base_mib == 100.0 and mixed.gpu_used_peak_mib == 150.0
        assert mixed.params["chunked_prefill_size"] == 8192 and "unrelated" not in mixed.params
        assert mixed.params["context_length"] == 8000 + 256
    else:  # a crash may leave the engine broken: nothing after it runs
        assert got == [("single", 1000, "ok"), ("single", 2000, "error"), ("single", 4000, "skipped"),
                       ("single", 8000, "skipped"), ("mixed", 2000, "skipped")]
    assert len(set(FakeEngine.prompts)) == len(FakeEngine.prompts)  # no two prompts share a prefix
    assert all(0 < t < 1000 for p in FakeEngine.prompts for t in p)


def test_e2e_parent_merges_and_resumes(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    calls = []

    def fake_run_worker(spec, timeout_s, log_path):
        calls.append((spec.backend, [s["input_lens"] for s in spec.scenarios]))
        assert 0 < timeout_s <= 100 and spec.model == "tiny-model"
        first = spec.scenarios[0]  # report only the first case, then "die"
        line = {"model": spec.model, "backend": spec.backend, "scenario": first["name"],
                "input_lens": first["input_lens"], "status": "ok", "ttft_ms": 5.0, "ttft_ms_all": [5.0]}
        Path(spec.records_path).write_text(json.dumps(line) + "\n")
        return "error", "engine subprocess exited with code 1"

    monkeypatch.setattr(e2e_ttft, "run_worker", fake_run_worker)
    out = tmp_path / "e2e.json"
    argv = ["--model", str(model_dir), "--backends", "fa3,minference", "--lengths", "1K,2K", "--scenarios", "single",
            "--budget-s", "100", "--out", str(out)]
    e2e_ttft.main(argv)
    results = common.load_results(out, "e2e")
    got = sorted((r.backend, r.input_lens[0], r.status) for r in common.latest_records(results))
    assert got == [("fa3", 1024, "ok"), ("fa3", 2048, "error"), ("minference", 1024, "ok"),
                   ("minference", 2048, "error")]
    assert results["runs"][0]["settings"]["backends"] == ["fa3", "minference"]
    calls.clear()
    e2e_ttft.main(argv + ["--resume"])  # only the failed cases are retried, in a second run
    assert calls == [("fa3", [[2048]]), ("minference", [[2048]])]
    results = common.load_results(out, "e2e")
    assert len(results["runs"]) == 2
    assert {(r.backend, r.input_lens[0]): r.run for r in common.latest_records(results)} == {
        ("fa3", 1024): 0, ("fa3", 2048): 1, ("minference", 1024): 0, ("minference", 2048): 1}


def test_kernel_bench_main_records_and_resumes(tmp_path, monkeypatch):
    """The command's loop at a tiny shape: unavailable libraries become skipped records, --resume retries
    only what did not succeed (on CPU through the Triton interpreter)."""
    make = kernel_bench.make_inputs
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def small_inputs(**kwargs):
        inp = make(**{**kwargs, "device": device})
        inp.q, inp.k, inp.v = (t.half() for t in (inp.q, inp.k, inp.v))
        inp.kv = kernel_bench.KVSource.packed(inp.k, inp.v, [inp.seq_k])
        return inp

    real_libs, _ = kernel_bench.load_libraries()
    monkeypatch.setattr(kernel_bench, "load_libraries",
                        lambda: ({k: real_libs[k] for k in ("ours", "sdpa")}, {"fa3": "no GPU"}))
    monkeypatch.setattr(kernel_bench, "make_inputs", small_inputs)
    if device == "cpu":
        monkeypatch.setattr(kernel_bench, "measure", cpu_measure)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the command's CUDA check
    monkeypatch.setattr(common, "environment", lambda: {"command": "test", "date": "today", "device": "cpu",
                                                        "versions": {}})
    out = tmp_path / "kernel.json"
    argv = ["--lengths", "256", "--head-dims", "64", "--chunk", "128", "--num-q-heads", "4", "--num-kv-heads", "2",
            "--cases", "ours_vs,fa3,ours_ashape", "--vertical", "40", "--slash", "100", "--sink", "16", "--local",
            "64", "--out", str(out)]
    kernel_bench.main(argv)
    results = common.load_results(out, "kernel")
    got = [(r["method"], r["pattern"], r["seq_q"], r["seq_k"], r["status"]) for r in results["records"]]
    assert got == [("fa3", "dense", 256, 256, "skipped"), ("ours", "vertical_slash", 256, 256, "ok"),
                   ("ours", "a_shape", 256, 256, "ok"), ("fa3", "dense", 128, 256, "skipped"),
                   ("ours", "vertical_slash", 128, 256, "ok"), ("ours", "a_shape", 128, 256, "ok")]
    assert results["runs"][0]["unavailable"] == {"fa3": "no GPU"}
    assert results["runs"][0]["settings"]["budgets"]["block_topk"] == round(140 / 64)
    kernel_bench.main(argv + ["--resume"])
    results = common.load_results(out, "kernel")
    assert [r["method"] for r in results["records"][6:]] == ["fa3", "fa3"]  # only the skipped cases again
