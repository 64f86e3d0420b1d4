"""CPU test of the index-building benchmark's plumbing at a tiny shape (interpreter): two runs, dump / check,
the comparison table; and its checks catch a wrong selection."""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import estimate_bench  # noqa: E402

TINY = ["--models", "tiny", "--contexts", "256,300", "--chunk", "100", "--reps", "1", "--no-profile",
        "--vertical", "8", "--slash", "8", "--block-topk", "2", "--forced-sink", "2", "--forced-local", "2"]


def test_two_runs_check_and_compare(tmp_path, capsys):
    dump, first, second = tmp_path / "a.pt", tmp_path / "a.json", tmp_path / "b.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # --src: the package of a given checkout
    estimate_bench.main(TINY + ["--label", "a", "--src", root, "--dump", str(dump), "--out", str(first)])
    res = estimate_bench.main(TINY + ["--label", "b", "--check", str(dump), "--out", str(second)])
    saved = json.loads(second.read_text())
    assert saved["schema"] == estimate_bench.SCHEMA and saved["run"]["command"] and saved["run"]["date"]
    assert [(r["seq_q"], r["seq_k"]) for r in saved["records"]] == [(100, 256), (100, 300)]
    for rec in res["records"]:
        assert set(rec["ms"]) == {k for _, k in estimate_bench.COLUMNS}
        assert all(v > 0 for v in rec["ms"].values()) and rec["ratio_vs"] > 0
        c = rec["checks"]
        assert c["lastq_max_abs_diff"] < 1e-3 and c["columns_are_top"] and c["offsets_are_top"]
        assert c["heads_same_columns"] == c["heads_same_offsets"] == 1.0 and c["positions_differing"] == 0
        assert c["layout_of_their_indices_identical"] and c["block_sparse_blocks_identical"] == 1.0
    capsys.readouterr()
    estimate_bench.main(["--compare", str(first), str(second)])
    table = capsys.readouterr().out
    assert table.count("| tiny | 256 |") == 2 and "| a |" in table and "| b |" in table


def test_checks_detect_a_wrong_selection():
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3, -1.0]])
    top = estimate_bench.positions_mask(torch.tensor([[2, 0, 1 << 29]]), 5)
    assert estimate_bench.selection_is_top(scores, top, forced=0)
    wrong = estimate_bench.positions_mask(torch.tensor([[2, 1, -1]]), 5)  # 0.1 kept over 0.5
    assert not estimate_bench.selection_is_top(scores, wrong, forced=0)
    assert estimate_bench.selection_is_top(scores, wrong, forced=2)  # position 1 is forced: allowed
