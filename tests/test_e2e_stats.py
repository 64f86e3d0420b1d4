"""e2e_ttft's sparse-path records on CPU: statistics lines summarised per case, the index-structure and chunk-size
variants as parts of a case's key, and the report/plot columns built from them."""

import json
import os
import sys
import types
from pathlib import Path

import pytest
from test_benchmarks import FakeEngine, FakeMonitor

from benchmarks import common, e2e_ttft, plot, report
from benchmarks.common import E2ERecord
from sgl_minference.layout import causal_pairs


def stats_line(seq_q, seq_k, attended, index_ms=1.0, attn_ms=2.0, heads=2, structure="dummy"):
    """One SGL_MINFERENCE_STATS line of a one-request batch, two layers with the given attended pairs."""
    return {"pid": 1, "structure": structure, "num_q_heads": heads, "seq_lens_q": [seq_q], "seq_lens_k": [seq_k],
            "sparse": [True], "causal_pairs": [causal_pairs(seq_q, seq_k, heads)],
            "layers": [{"layer": i, "attended": [a], "visited": [2 * a], "index_ms": index_ms, "attn_ms": attn_ms}
                       for i, a in enumerate(attended)]}


def test_summary_counts_dense_run_chunks_as_fully_attended():
    # A 256-token prompt in two chunks: the first ran dense (no line), the second sparse.
    second = causal_pairs(128, 256, 2)
    whole = causal_pairs(256, 256, 2)
    line = stats_line(128, 256, [second // 4, second // 2])
    got = e2e_ttft.summarize_stats([line], [256], ttft_ms=30.0)
    first = whole - second
    assert got["layers"] == 2 and got["batches"] == 1 and got["structure"] == "dummy"
    assert got["share_min"] == pytest.approx((first + second // 4) / whole)
    assert got["share_max"] == pytest.approx((first + second // 2) / whole)
    assert got["sparse_chunk_share_mean"] == pytest.approx(0.375, abs=1e-3)
    assert got["visited_share_mean"] == pytest.approx(0.75, abs=2e-3)
    assert got["index_ms"] == 2.0 and got["attn_ms"] == 4.0 and got["sparse_share_of_ttft"] == pytest.approx(0.2)
    assert e2e_ttft.summarize_stats([], [256], 30.0) == {"batches": 0}


def test_new_lines_are_read_once_and_half_written_ones_wait(tmp_path):
    path = tmp_path / "s.jsonl"
    assert e2e_ttft.read_new_lines(str(path), 0) == ([], 0)
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"b": ')
    lines, offset = e2e_ttft.read_new_lines(str(path), 0)
    assert lines == [{"a": 1}]
    with open(path, "a") as f:
        f.write("2}\n")
    assert e2e_ttft.read_new_lines(str(path), offset)[0] == [{"b": 2}]


class StatsEngine(FakeEngine):
    """Writes one statistics line per generate call, as the minference scheduler would (attended = call number)."""

    calls = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.env = {k: os.environ.get(k) for k in ("SGL_MINFERENCE_STATS", "SGL_MINFERENCE_SYNTHETIC")}
        StatsEngine.seen_env = self.env

    def generate(self, input_ids, sampling_params):
        out = super().generate(input_ids, sampling_params)
        StatsEngine.calls += 1
        if self.env["SGL_MINFERENCE_STATS"]:
            n = len(input_ids[0])
            with open(self.env["SGL_MINFERENCE_STATS"], "a") as f:
                f.write(json.dumps(stats_line(n, n, [StatsEngine.calls] * 2, attn_ms=float(StatsEngine.calls))) + "\n")
        return out


def test_worker_attaches_the_median_repetitions_stats(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=StatsEngine))
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")
    for name in ("SGL_MINFERENCE_STATS", "SGL_MINFERENCE_SYNTHETIC"):
        monkeypatch.setenv(name, "")  # restored afterwards; the worker overwrites them
    monkeypatch.setattr(e2e_ttft, "GpuMemoryMonitor", FakeMonitor)
    monkeypatch.setattr(StatsEngine, "calls", 0)
    monkeypatch.setattr(FakeEngine, "prompts", [])
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    scenarios = e2e_ttft.plan_scenarios([1000, 2000], ["single"], [])
    spec = e2e_ttft.WorkerSpec(model_dir=str(tmp_path), model="tiny", backend="minference",
                               scenarios=[vars(s) for s in scenarios], warmup_lens=[64, 64], reps=3,
                               rep_budget_s=60.0, seed=0, records_path=str(tmp_path / "records.jsonl"),
                               structure="synthetic", synthetic='{"slash_cluster": 4}',
                               stats_path=str(tmp_path / "stats.jsonl"))
    e2e_ttft.worker(spec)
    assert StatsEngine.seen_env == {"SGL_MINFERENCE_STATS": spec.stats_path,
                                    "SGL_MINFERENCE_SYNTHETIC": '{"slash_cluster": 4}'}
    lines = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    recs = e2e_ttft.records_for_backend(lines, scenarios, 0, model="tiny", backend="minference", exit_status="ok",
                                        exit_note="", structure="synthetic", chunk=4096)
    assert [(r.structure, r.chunked_prefill_size) for r in recs] == [("synthetic", 4096)] * 2
    for rec, calls in zip(recs, ([3, 4, 5], [6, 7, 8])):  # two warm-ups, then three repetitions per case
        middle = sorted(range(3), key=rec.ttft_ms_all.__getitem__)[1]
        st = rec.sparse_stats
        assert st["batches"] == 1 and st["attn_ms"] == 2 * calls[middle]  # only the median repetition's line
        assert st["share_mean"] == pytest.approx(calls[middle] / causal_pairs(rec.input_lens[0],
                                                                              rec.input_lens[0], 2))
    dense = e2e_ttft.WorkerSpec(**{**vars(spec), "backend": "fa3", "structure": "", "stats_path": "",
                                   "records_path": str(tmp_path / "dense.jsonl")})
    e2e_ttft.worker(dense)
    assert StatsEngine.seen_env == {"SGL_MINFERENCE_STATS": "", "SGL_MINFERENCE_SYNTHETIC": ""}
    assert "sparse_stats" not in json.loads((tmp_path / "dense.jsonl").read_text().splitlines()[0])


def test_parent_runs_each_structure_and_chunk_size_and_resumes_by_them(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    calls = []

    def fake_run_worker(spec, timeout_s, log_path):
        calls.append((spec.backend, spec.structure, spec.engine_args.get("chunked_prefill_size"),
                      bool(spec.stats_path)))
        fail = spec.structure == "synthetic" and spec.engine_args.get("chunked_prefill_size") == 32768
        line = {"model": spec.model, "backend": spec.backend, "scenario": "single", "input_lens": [1024],
                "status": "error" if fail else "ok", "ttft_ms": 5.0, "ttft_ms_all": [5.0]}
        Path(spec.records_path).write_text(json.dumps(line) + "\n")
        return "ok", ""

    monkeypatch.setattr(e2e_ttft, "run_worker", fake_run_worker)
    out = tmp_path / "e2e.json"
    argv = ["--model", str(model_dir), "--backends", "fa3,minference", "--lengths", "1K", "--scenarios", "single",
            "--structure", "dummy,synthetic", "--chunk-sizes", "8192,32768", "--budget-s", "100", "--out", str(out)]
    e2e_ttft.main(argv)
    assert calls == [("fa3", "", 8192, False), ("fa3", "", 32768, False), ("minference", "dummy", 8192, True),
                     ("minference", "synthetic", 8192, True), ("minference", "dummy", 32768, True),
                     ("minference", "synthetic", 32768, True)]
    results = common.load_results(out, "e2e")
    assert len(common.latest_records(results)) == 6
    calls.clear()
    e2e_ttft.main(argv + ["--resume"])
    assert calls == [("minference", "synthetic", 32768, True)]
    with pytest.raises(SystemExit) as exit_info:
        e2e_ttft.main(argv[:-2] + ["--structure", "real", "--out", str(out)])
    assert exit_info.value.code == 2 and "--structure: 'real'" in capsys.readouterr().err


def stats_results() -> dict:
    results = common.new_results("e2e")
    run = common.add_run(results, settings={})

    def rec(backend, n, ttft, structure="", chunk=None, share=None, peak=1000.0):
        st = {} if share is None else {"batches": 3, "structure": structure, "layers": 2, "share_mean": share,
                                       "share_min": share - 0.01, "share_max": share + 0.01,
                                       "sparse_chunk_share_mean": share / 2, "index_ms": 40.0, "attn_ms": 60.0,
                                       "sparse_ms": 100.0, "sparse_share_of_ttft": 100.0 / ttft}
        return E2ERecord(run=run, model="llama3-8b", backend=backend, scenario="single", input_lens=[n],
                         status="ok", ttft_ms=ttft, gpu_used_base_mib=900.0, gpu_used_peak_mib=peak,
                         structure=structure, chunked_prefill_size=chunk, sparse_stats=st,
                         params={"chunked_prefill_size": chunk or 8192})

    for r in (rec("fa3", 131072, 10000.0), rec("minference", 131072, 5000.0, "dummy", share=0.9, peak=1010.0),
              rec("minference", 131072, 2500.0, "synthetic", share=0.3),
              rec("fa3", 131072, 9000.0, chunk=32768), rec("minference", 131072, 3000.0, "dummy", 32768, 0.8)):
        common.add_record(results, r)
    return results


def test_report_groups_by_chunk_size_and_shows_the_sparse_path(tmp_path):
    path, doc = tmp_path / "e2e.json", tmp_path / "BENCHMARKS.md"
    common.save_results(path, stats_results())
    report.main(["--e2e", str(path), "--out", str(doc)])
    text = doc.read_text()
    assert "### llama3-8b\n" in text and "### llama3-8b, chunked_prefill_size 32768" in text
    assert "| single | 131072 | 10000 | 5000 | 2500 | 2.00x | 4.00x |" in text  # vs fa3 at the same chunk size
    assert "| single | 131072 | 9000 | 3000 | 3.00x |" in text
    assert ("| single | 131072 | minference dummy | 5000 | 2.00x | 0.900 (0.890-0.910) | 0.450 | 40.00 | 60.00 "
            "| 0.02 | 1,010 (+1.0%) |") in text
    assert "| single | 131072 | minference dummy, chunk 32768 | 3000 | 3.00x | 0.800 (0.790-0.810) |" in text
    assert "chunked_prefill_size as resolved: fa3 8192" in text


def test_plot_series_per_structure_and_chunk_size():
    got = plot.e2e_speedups(stats_results())["llama3-8b"]
    assert got == {"minference dummy": [(131072, 2.0)], "minference synthetic": [(131072, 4.0)],
                   "minference dummy, chunk 32768": [(131072, 3.0)]}
