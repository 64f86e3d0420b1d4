"""benchmarks/chunk_bench.py on the CPU (interpreter, the tiny shapes): the records and the summary it writes."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import chunk_bench


def test_records_and_summary(tmp_path):
    out = tmp_path / "chunk.json"
    result = chunk_bench.main(["--model", "tiny", "--length", "640", "--chunk", "320", "--min-context", "600",
                               "--data", "planted,uniform,fixed", "--reps", "1", "--device", "cpu",
                               "--launches", "64x4x3,128x4x2h,64x8x3p,64x4x3t,64x4x3d", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    dense, sparse = [r for r in result["records"] if r["data"] == "planted"]
    assert (dense["seq_k"], dense["sparse"]) == (320, False)  # below min_context: the dense backend's chunk
    assert (sparse["seq_k"], sparse["sparse"], sparse["kv"]) == (640, True, "paged")
    assert sparse["index_ms"] > 0 and sparse["attn_ms"] > 0 and sparse["compiles"] == 0  # nothing compiles here
    assert set(sparse["attn_ms_by_launch"]) == {"64x4x3", "128x4x2h", "64x8x3p", "64x4x3t", "64x4x3d"}
    # The default budgets cover a 640-key context whole: every causal pair is attended.
    assert sparse["attended_share"] == pytest.approx(1.0) and sparse["visited_share"] >= 1.0
    fixed = [r for r in result["records"] if r["data"] == "fixed" and r["sparse"]][0]
    assert fixed["attended_share"] == pytest.approx(1.0)  # 1000 columns + 6096 diagonals cover 640 keys
    summary = result["summary"]["planted"]
    assert summary["index_ms"] == pytest.approx(sparse["index_ms"])
    assert summary["attention_ratio"] is None  # no FA3 on a CPU
    assert sparse["pair_plan_ms"] > 0 and summary["pair_plan_ms"] == pytest.approx(sparse["pair_plan_ms"])


def test_other_patterns_through_config(tmp_path):
    result = chunk_bench.main(["--model", "tiny", "--length", "640", "--chunk", "320", "--min-context", "600",
                               "--data", "planted", "--reps", "1", "--device", "cpu", "--config",
                               '{"default": {"type": "xattention", "threshold": 0.9, "stride": 8}}'])
    sparse = result["records"][-1]
    assert sparse["sparse"] and 0 < sparse["attended_share"] <= 1.0 and sparse["index_ms"] > 0
    assert "pair_plan_ms" not in sparse and "pair_plan_ms" not in result["summary"]["planted"]  # no paired launch
    assert result["config"]["default"]["type"] == "xattention"


@pytest.mark.parametrize("bad", [["--data", "noise"], ["--launches", "64x4"], ["--launches", "64x8x3ph"],
                                 ["--launches", "64x4x3dt"],
                                 ["--length", "lots"],
                                 ["--config", "{not json"], ["--config", '{"default": {"type": "nope"}}'],
                                 ["--config", '{"default": {"type": "a_shape", "sink": 1, "local": 1}}',
                                  "--data", "fixed"]])
def test_bad_arguments_are_one_line_errors(bad):
    # Without the package's SGL_* variables (another test may leave one set): SGLang warns about SGL_* names.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGL_")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.chunk_bench", "--model", "tiny", "--device", "cpu",
                           *bad], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
