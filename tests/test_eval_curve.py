"""The budget-scaling curve (``sgl_minference.tools.eval.curve``) from eval results files, CPU only."""

import json

import pytest

from sgl_minference.tools.eval.curve import budget_curve, main


def result(scale, density, sparse, *, dense=None, recall=(0.9, 0.95, 0.99), model="m", lengths=(8192, 32512)):
    """A results dict as ``tools.eval`` writes it, with ``sparse[task]`` at the longest length."""
    dense = dense or {"passkey": 1.0, "niah_single": 0.8}
    acc = {"dense": {t: {str(n): a for n in lengths} for t, a in dense.items()},
           "sparse": {t: {str(n): sparse[t] if n == max(lengths) else a for n in lengths} for t, a in dense.items()}}
    return {"model_folder": model, "dense_backend": "fa3", "budget_scale": scale, "tasks": list(dense),
            "config": {"format": "sgl-minference/1", "min_context": 4096, "default": {"scaled": scale}, "heads": {}},
            "nominal_density": {str(n): min(1.0, density * max(lengths) / n) for n in lengths},
            "accuracy": acc, "attention_recall": {"per_layer": {str(i): r for i, r in enumerate(recall)}},
            "first_token_agree": 0.9}


def test_points_ascend_in_density_with_accuracy_and_recall_at_the_longest_length():
    runs = [result(1.0, 0.44, {"passkey": 1.0, "niah_single": 0.8}),
            result(0.25, 0.11, {"passkey": 0.4, "niah_single": 0.2}, recall=(0.5, 0.7)),
            result(0.5, 0.22, {"passkey": 0.9, "niah_single": 0.6})]
    curve = budget_curve(runs)
    assert curve["length"] == 32512 and curve["dense"] == {"passkey": 1.0, "niah_single": 0.8}
    assert [p["budget_scale"] for p in curve["points"]] == [0.25, 0.5, 1.0]
    assert [p["accuracy"]["passkey"] for p in curve["points"]] == [0.4, 0.9, 1.0]
    assert curve["points"][0]["recall_median"] == pytest.approx(0.6) and curve["points"][0]["recall_min"] == 0.5
    assert curve["points"][2]["recall_median"] == 0.95
    # at the shorter length every budget covers the prompt: the density there is capped at 1
    short = budget_curve(runs, 8192)["points"]
    assert [p["budget_scale"] for p in short] == [0.25, 0.5, 1.0] and short[-1]["density"] == 1.0


@pytest.mark.parametrize("bad, match", [
    (lambda r: r.update(model_folder="other"), "model_folder"),
    (lambda r: r["config"].update(min_context=1024), "config"),
    (lambda r: r["accuracy"]["dense"]["passkey"].update({"32512": 0.5}), "dense accuracy of passkey"),
    (lambda r: r.update(budget_scale=1.0), "budget scales repeat"),
])
def test_runs_that_cannot_share_one_curve_are_refused(bad, match):
    other = result(0.5, 0.22, {"passkey": 0.9, "niah_single": 0.6})
    bad(other)
    with pytest.raises(ValueError, match=match):
        budget_curve([result(1.0, 0.44, {"passkey": 1.0, "niah_single": 0.8}), other])


def test_a_length_missing_from_a_file_is_named():
    runs = [result(1.0, 0.44, {"passkey": 1.0, "niah_single": 0.8}),
            result(0.5, 0.22, {"passkey": 0.9, "niah_single": 0.6}, lengths=(8192, 16384))]
    with pytest.raises(ValueError, match="length: 32512 is not in every file"):
        budget_curve(runs, 32512)
    assert budget_curve(runs)["length"] == 8192  # the longest common one


def test_a_run_without_recall_still_plots(tmp_path):
    runs = [result(1.0, 0.44, {"passkey": 1.0, "niah_single": 0.8}),
            result(0.5, 0.22, {"passkey": 0.9, "niah_single": 0.6}, recall=())]
    files = []
    for i, r in enumerate(runs):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    png, table = tmp_path / "curve.png", tmp_path / "curve.json"
    curve = main([*map(str, files), "-o", str(png), "--json", str(table)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(table.read_text()) == curve and curve["points"][0]["recall_median"] is None


def test_unreadable_file_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.json"), "-o", str(tmp_path / "c.png")])
    assert e.value.code == 2 and "missing.json" in capsys.readouterr().err
