"""benchmarks/chunk_bench.py on the CPU (interpreter, the tiny shapes): the records and the summary it writes."""

import json
import os
import subprocess
import sys

import pytest
import torch

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


@pytest.fixture(scope="module")
def tiny_gemma64(tmp_path_factory):
    """A random 3-layer Gemma-3 (sliding, full, full) with head_dim 64 (one the sparse kernel serves)."""
    from test_search import save_tiny_gemma

    return save_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma64"), num_heads=2, num_kv_heads=1, head_dim=64,
                           layer_types=("sliding_attention", "full_attention", "full_attention"))


def test_captured_queries_and_keys_per_layer_and_chunk(tiny_gemma64, tmp_path):
    """A real model's q/k per full-attention layer: every chunk of the prompt (the last one shorter) and layer is a
    record at the model's shapes; a layer the config leaves dense, and chunks below the gate, are the dense
    backend's."""
    config = {"default": {"type": "vertical_slash", "vertical": 64, "slash": 128},
              "heads": {"1": {"0": {"type": "dense"}, "1": {"type": "dense"}}}}
    result = chunk_bench.main(["--data", "captured", "--captured", str(tiny_gemma64), "--prompt", "niah_single@0.25",
                               "--length", "640", "--chunk", "256", "--min-context", "300", "--reps", "1",
                               "--device", "cpu", "--config", json.dumps(config), "--out", str(tmp_path / "c.json")])
    recs = result["records"]
    assert [(r["seq_q"], r["seq_k"], r["layer"]) for r in recs] == [
        (256, 256, 1), (256, 256, 2), (256, 512, 1), (256, 512, 2), (128, 640, 1), (128, 640, 2)]
    assert [r["sparse"] for r in recs] == [False, False, False, True, False, True]
    assert all(0 < r["attended_share"] < 1 for r in recs if r["sparse"])
    assert result["model"] == str(tiny_gemma64) and result["prompt"] == "niah_single@0.25"
    assert set(result["summary"]) == {"captured"}
    cap = chunk_bench.capture(str(tiny_gemma64), "niah_single", 0.25, 640, 0, "cpu")
    assert sorted(cap.q) == [1, 2] and (cap.hq, cap.hk, cap.d, cap.num_layers) == (2, 1, 64, 3)
    assert cap.q[2].shape == (640, 2, 64) and cap.k[2].shape == (640, 1, 64) and cap.sm_scale == 0.125
    q, k, v = cap.chunk(2, 128, 640, seed=1)
    assert torch.equal(q, cap.q[2][512:]) and torch.equal(k, cap.k[2]) and v.shape == k.shape
    assert not torch.equal(cap.k[1], cap.k[2])  # each layer its own keys


@pytest.mark.parametrize("bad", [["--data", "captured"], ["--data", "planted", "--captured", "x"],
                                 ["--data", "captured,planted", "--captured", "x"]])
def test_captured_needs_its_model_and_runs_alone(bad, capsys):
    with pytest.raises(SystemExit):
        chunk_bench.main(["--device", "cpu", *bad])
    assert "--data captured runs alone" in capsys.readouterr().err


@pytest.mark.parametrize("prompt, words", [("haystack@0.5", "unknown task 'haystack'"),
                                           ("niah_single@deep", "depth 'deep'")])
def test_captured_prompt_errors_are_one_line(prompt, words, capsys):
    with pytest.raises(SystemExit):
        chunk_bench.main(["--device", "cpu", "--data", "captured", "--captured", "x", "--prompt", prompt])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"--prompt: {words}" in err, err
