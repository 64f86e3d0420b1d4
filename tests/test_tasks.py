"""Task generators (exact lengths, determinism, needle placement) and the scoring helpers."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest

from sgl_minference import plugin
from sgl_minference.tools import prompts
from sgl_minference.tools.eval import scoring
from test_search import tiny_gemma  # noqa: F401  (fixture: a random 3-layer Gemma-3 model folder)

BOS = 1


class WordTokenizer:
    """Deterministic fake tokenizer: one token per word, punctuation mark or newline (leading space kept)."""

    pattern = re.compile(r"\n| ?\w+| ?[^\w\s]| ")

    def __init__(self):
        self.text_of: dict[int, str] = {BOS: ""}
        self.id_of: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        for piece in self.pattern.findall(text):
            tid = self.id_of.setdefault(piece, 2 + len(self.id_of))
            self.text_of[tid] = piece
            ids.append(tid)
        return ids

    def decode(self, ids) -> str:
        return "".join(self.text_of[i] for i in ids)


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer()


@pytest.mark.parametrize("task", sorted(prompts.TASKS))
@pytest.mark.parametrize("length", [700, 2048, 5001])
def test_exact_length_and_prefix(tok, task, length):
    s = prompts.make_sample(task, tok, length=length, depth=0.37, seed=3)
    assert len(s.input_ids) == s.length == length
    assert s.input_ids[0] == BOS and BOS not in s.input_ids[1:]
    text = tok.decode(s.input_ids)
    assert s.question in text
    if task != "common_words":  # every reference is written in the prompt (common words: many times)
        assert all(a in text for a in s.answers)
    assert s.max_new_tokens > 0


@pytest.mark.parametrize("task", sorted(prompts.TASKS))
def test_deterministic_per_seed(tok, task):
    a = prompts.make_sample(task, tok, length=1500, depth=0.5, seed=7)
    b = prompts.make_sample(task, prompts.PieceEncoder(tok), length=1500, depth=0.5, seed=7)
    c = prompts.make_sample(task, tok, length=1500, depth=0.5, seed=8)
    assert a.input_ids == b.input_ids and a.answers == b.answers
    assert a.input_ids != c.input_ids


@pytest.mark.parametrize("task", ["passkey", "niah_single", "kv_retrieval"])
def test_needle_follows_depth(tok, task):
    length = 4000
    where = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = prompts.make_sample(task, tok, length=length, depth=depth, seed=0)
        text = tok.decode(s.input_ids)
        first = text.index(s.answers[0])
        where.append(len(tok.encode(text[:first], add_special_tokens=False)) / length)
    assert where == sorted(where)
    for depth, frac in zip((0.0, 0.25, 0.5, 0.75, 1.0), where):
        assert abs(frac - depth) < 0.06, (depth, frac)


def test_multikey_asks_one_of_several_keys(tok):
    s = prompts.make_sample("niah_multikey", tok, length=3000, depth=0.2, seed=1)
    text = tok.decode(s.input_ids)
    needles = re.findall(r"magic numbers for (\S+) is: (\d+)\.", text)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = dict(needles)
    key = re.search(r"number for (\S+) in the text\?", s.question).group(1)
    assert s.answers == [asked[key]]


def test_multivalue_returns_all_values(tok):
    s = prompts.make_sample("niah_multivalue", tok, length=3000, depth=0.6, seed=2)
    values = re.findall(r"magic numbers for \S+ is: (\d+)\.", tok.decode(s.input_ids))
    assert sorted(values) == sorted(s.answers) and len(set(values)) == 4


def test_variable_chain_in_order(tok):
    s = prompts.make_sample("variable_tracking", tok, length=3000, depth=0.1, seed=4)
    text = tok.decode(s.input_ids)
    value = re.search(r"the value (\d+),", s.question).group(1)
    assert f"VAR {s.answers[0]} = {value}." in text
    places = [text.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])]
    assert places == sorted(places) and text.index(f"VAR {s.answers[0]} = ") < places[0]


@pytest.mark.parametrize("length", [900, 6000])
def test_common_words_are_most_frequent(tok, length):
    s = prompts.make_sample("common_words", tok, length=length, seed=5)
    assert s.depth is None
    counts = Counter(re.findall(r"\n\d+\. (\w+)", tok.decode(s.input_ids)))
    assert len(s.answers) == 10
    least_common_answer = min(counts[w] for w in s.answers)
    most_frequent_other = max(c for w, c in counts.items() if w not in s.answers)
    assert least_common_answer > most_frequent_other


def test_too_short_length_names_argument(tok):
    with pytest.raises(ValueError, match="length"):
        prompts.make_sample("niah_multikey", tok, length=40, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        prompts.make_sample("passkey", tok, length=500, depth=1.5)
    with pytest.raises(ValueError, match="task"):
        prompts.make_sample("nope", tok, length=500)


def test_suite_cells(tok):
    suite = prompts.make_suite(tok, tasks=["passkey", "common_words"], lengths=[800, 1200],
                               depths=prompts.depth_grid(3), samples=2, seed=0)
    cells = Counter((s.task, s.length, s.depth) for s in suite)
    assert cells[("passkey", 800, 0.5)] == 2 and cells[("common_words", 1200, None)] == 2 * 3  # as many per length
    assert len(suite) == 2 * (2 * 3 + 2 * 3)
    assert len({tuple(s.input_ids) for s in suite if s.task == "common_words" and s.length == 800}) == 6  # distinct
    assert prompts.depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_answer_recall():
    assert scoring.answer_recall("The pass key is 12345.", ["12345"]) == 1.0
    assert scoring.answer_recall("no idea", ["12345"]) == 0.0
    assert scoring.answer_recall("ABC and def", ["abc", "DEF", "ghi", "jkl"]) == 0.5
    with pytest.raises(ValueError, match="answers"):
        scoring.answer_recall("x", [])


def test_accuracy_table():
    recs = [{"task": "a", "length": 2, "depth": 0.0, "score": 1.0},
            {"task": "a", "length": 2, "depth": 1.0, "score": 0.0},
            {"task": "a", "length": 1, "depth": 0.0, "score": 0.5},
            {"task": "b", "length": 1, "depth": None, "score": 1.0}]
    assert scoring.accuracy_table(recs) == {"a": {1: 0.5, 2: 0.5}, "b": {1: 1.0}}
    by_depth = scoring.accuracy_table(recs[:3], key=("length", "depth"))
    assert by_depth == {1: {0.0: 0.5}, 2: {0.0: 1.0, 1.0: 0.0}}
    assert list(by_depth) == [1, 2]


def test_top_logprob_kl():
    dense = [(math.log(0.7), 5), (math.log(0.2), 9), (math.log(0.05), 3)]
    assert scoring.top_logprob_kl(dense, list(dense)) == pytest.approx(0.0, abs=1e-12)
    sparse = [(math.log(0.5), 5), (math.log(0.3), 9), (math.log(0.1), 4)]
    # token 3 is missing on the sparse side: it gets the smallest sparse top-k probability, 0.1
    expected = (0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.05 * math.log(0.05 / 0.1)
                + 0.05 * math.log(0.05 / 0.1))  # rest bucket: 1 - 0.95 vs 1 - 0.9
    assert scoring.top_logprob_kl(dense, sparse) == pytest.approx(expected, rel=1e-9)
    assert scoring.top_logprob_kl(dense, sparse) > 0


def test_first_token_top():
    meta = {"output_top_logprobs": [[(-0.1, 42, "a"), (-2.5, 7, "b")], [(-0.3, 1, "c")]]}
    assert scoring.first_token_top(meta) == [(-0.1, 42), (-2.5, 7)]
    with pytest.raises(ValueError, match="meta_info"):
        scoring.first_token_top({"output_top_logprobs": []})


# ----------------------------------------------------------------------------------------------------------
# The dense-vs-sparse harness, with a stand-in for sglang.Engine
# ----------------------------------------------------------------------------------------------------------


class EchoEngine:
    """Stands in for ``sglang.Engine``: dense echoes the prompt (so every answer is found), sparse says nothing.

    First-token top log-probabilities differ between the modes, so the KL is positive.
    """

    instances: list = []

    def __init__(self, *, model_path, attention_backend, **kwargs):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.dense = attention_backend != "minference"
        self.kwargs = {"attention_backend": attention_backend, **kwargs}
        EchoEngine.instances.append(self)

    def generate(self, *, input_ids, sampling_params, return_logprob, top_logprobs_num):
        assert return_logprob and top_logprobs_num > 0 and len(input_ids) == len(sampling_params)
        top = [(math.log(0.6), 5, "a"), (math.log(0.3), 6, "b")] if self.dense else [(math.log(0.5), 6, "b"),
                                                                                    (math.log(0.4), 5, "a")]
        return [{"text": self.tok.decode(ids) if self.dense else "", "output_ids": [5],
                 "meta_info": {"output_top_logprobs": [top]}} for ids in input_ids]

    def shutdown(self):
        pass


def test_engine_kwargs():
    from sgl_minference.tools.eval.runner import EngineSettings, engine_kwargs

    settings = EngineSettings(model_path="/m", sparse_overrides={"config_path": "/c.json"}, context_length=4096,
                              dense_backend="fa3", extra={"mem_fraction_static": 0.5})
    dense, sparse = engine_kwargs("dense", settings), engine_kwargs("sparse", settings)
    assert dense["attention_backend"] == "fa3" and "json_model_override_args" not in dense
    assert sparse["attention_backend"] == "minference" and dense["disable_radix_cache"]
    assert json.loads(sparse["json_model_override_args"]) == {"minference": {"config_path": "/c.json"}}
    assert sparse["mem_fraction_static"] == 0.5 and sparse["context_length"] == 4096
    with pytest.raises(ValueError, match="mode"):
        engine_kwargs("fast", settings)


def test_scale_config_and_density():
    from sgl_minference.config import AShapeSpec, BlockSparseSpec, DenseSpec, MInferenceConfig, VerticalSlashSpec
    from sgl_minference.tools.eval.runner import nominal_density, scale_config

    cfg = MInferenceConfig(default=DenseSpec(), heads={1: {0: VerticalSlashSpec(vertical=1000, slash=2000),
                                                           1: AShapeSpec(sink=64, local=3),
                                                           2: BlockSparseSpec(topk=10)}})
    half = scale_config(cfg, 0.25)
    assert half.head_spec(1, 0) == VerticalSlashSpec(vertical=250, slash=500)
    assert half.head_spec(1, 1) == AShapeSpec(sink=16, local=1) and half.head_spec(1, 2) == BlockSparseSpec(topk=2)
    assert half.head_spec(0, 0) == DenseSpec() and half.min_context == cfg.min_context
    # layer 1 at 8191 tokens (4096 keys per average row): (1024+2063)/4096, (64+66)/4096, 640/4096, dense 1
    expected = ((1024 + 2063) / 4096 + (64 + 66) / 4096 + 640 / 4096 + 1.0) / 4
    assert nominal_density(cfg, 8191, [1], 4) == pytest.approx(expected)


def test_evaluate_tables(tok):
    from sgl_minference.tools.eval.runner import evaluate, run_mode

    suite = prompts.make_suite(tok, tasks=["passkey", "common_words"], lengths=[600, 900], depths=[0.0, 1.0], seed=1)
    dense, sparse = EchoEngine.__new__(EchoEngine), EchoEngine.__new__(EchoEngine)
    dense.tok, dense.dense, sparse.tok, sparse.dense = tok, True, tok, False
    calls = []
    outs = {"dense": run_mode(dense, suite, batch=4, progress=calls.append), "sparse": run_mode(sparse, suite)}
    assert calls == [4, 4] and outs["dense"][0]["top"] == [(math.log(0.6), 5), (math.log(0.3), 6)]
    res = evaluate(suite, outs, min_context=800)
    assert res["accuracy"]["dense"] == {"common_words": {600: 1.0, 900: 1.0}, "passkey": {600: 1.0, 900: 1.0}}
    assert res["accuracy"]["sparse"]["passkey"] == {600: 0.0, 900: 0.0}
    assert res["niah"]["dense"] == {600: {0.0: 1.0, 1.0: 1.0}, 900: {0.0: 1.0, 1.0: 1.0}}  # needle tasks only
    assert res["first_token_agree"] == 0.0 and res["output_agree"] == 0.0
    assert all(r["kl"] > 0 for r in res["records"])
    assert [r["sparse_active"] for r in res["records"]] == [s.length >= 800 for s in suite]
    with pytest.raises(ValueError, match="outputs"):
        evaluate(suite, {"dense": outs["dense"][:2]}, min_context=800)


def test_niah_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    from sgl_minference.tools.eval.plots import niah_heatmap

    niah = {"dense": {4096: {0.0: 1.0, 0.5: 1.0}, 8192: {0.0: 1.0, 0.5: 0.5}},
            "sparse": {4096: {0.0: 1.0, 0.5: 0.0}, 8192: {0.0: 0.5}}}
    path = tmp_path / "niah.png"
    niah_heatmap(niah, path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_with_stand_in_engine(tiny_gemma, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import sys
    import types

    from sgl_minference.config import MInferenceConfig, VerticalSlashSpec
    from sgl_minference.tools.eval.__main__ import main

    from sgl_minference.tools.eval import __main__ as eval_main

    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=EchoEngine))
    monkeypatch.setattr(eval_main, "gpu_problem", lambda: None)  # the stand-in engine needs no GPU
    monkeypatch.setattr(plugin, "resolve_dense_backend", lambda name: {"auto": "fa3"}.get(name, name))
    EchoEngine.instances.clear()
    cfg_path = tmp_path / "searched.json"
    MInferenceConfig(heads={2: {h: VerticalSlashSpec(vertical=100, slash=200) for h in range(4)}}).save(cfg_path)
    out = tmp_path / "res.json"
    res = main([str(tiny_gemma), "--config", str(cfg_path), "--quick", "--lengths", "600", "1000",
                "--min-context", "1000", "--budget-scale", "0.5", "--out", str(out), "--recall-length", "512"])
    saved = json.loads(out.read_text())
    assert saved["schema"] == "sgl-minference-eval/1" and saved["lengths"] == [600, 1000]
    assert saved["config"]["min_context"] == 1000 and saved["config"]["heads"]["2"]["0"]["vertical"] == 50
    assert saved["config"]["dense_routing"] is False  # every sparse-eligible layer runs sparse unless --routing
    assert saved["accuracy"]["dense"]["passkey"] == {"600": 1.0, "1000": 1.0}
    assert len(saved["records"]) == 3 * 2 * 3
    assert set(saved["attention_recall"]["per_layer"]) == {"2"}  # only the full-attention layer
    assert 0.0 < saved["attention_recall"]["per_layer"]["2"] <= 1.0 + 1e-6
    assert out.with_suffix(".png").is_file() and out.with_suffix(".sparse_config.json").is_file()
    assert EchoEngine.instances[0].kwargs["attention_backend"] == saved["dense_backend"] == "fa3"  # minference's own
    sparse_engine = EchoEngine.instances[1]
    override = json.loads(sparse_engine.kwargs["json_model_override_args"])["minference"]
    assert MInferenceConfig.load(override["config_path"]).min_context == 1000
    # (64 + 100 + 63) keys of the (n + 1) / 2 an average row has, on the one full-attention layer
    assert res["nominal_density"] == {600: pytest.approx(227 / 300.5), 1000: pytest.approx(227 / 500.5)}


def test_eval_resumes_from_the_stored_outputs(tiny_gemma, tmp_path, monkeypatch):
    """A run cut off mid-way generates only what is missing with --resume; other settings or no --resume start
    afresh; the results equal an uninterrupted run's."""
    import sys
    import types

    from sgl_minference.tools.eval import __main__ as eval_main

    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=EchoEngine))
    monkeypatch.setattr(eval_main, "gpu_problem", lambda: None)
    monkeypatch.setattr(plugin, "resolve_dense_backend", lambda name: {"auto": "fa3"}.get(name, name))
    out = tmp_path / "res.json"
    argv = [str(tiny_gemma), "--quick", "--lengths", "600", "1000", "--min-context", "1000", "--no-recall",
            "--batch", "4", "--out", str(out)]
    generated = []
    real_generate = EchoEngine.generate

    def counting(self, **kw):
        generated.append(len(kw["input_ids"]))
        return real_generate(self, **kw)

    monkeypatch.setattr(EchoEngine, "generate", counting)
    full = eval_main.main(argv)
    store = out.with_suffix(".outputs.jsonl")
    lines = store.read_text().splitlines()
    assert len(lines) == 2 * 18 and sum(generated) == 2 * 18  # 18 prompts per mode
    # Cut off after 10 dense outputs (and half a line): the rerun makes the 8 + 18 missing, two engines.
    store.write_text("\n".join(lines[:10]) + "\n" + lines[10][:20])
    generated.clear()
    EchoEngine.instances.clear()
    resumed = eval_main.main(argv + ["--resume"])
    assert sum(generated) == 8 + 18 and len(EchoEngine.instances) == 2
    assert resumed["records"] == full["records"] and resumed["accuracy"] == full["accuracy"]
    # Everything stored: no engine at all.
    generated.clear()
    EchoEngine.instances.clear()
    again = eval_main.main(argv + ["--resume"])
    assert generated == [] and EchoEngine.instances == [] and again["accuracy"] == full["accuracy"]
    # Other sparse settings: the dense outputs stay, the sparse ones are made again.
    eval_main.main(argv + ["--resume", "--budget-scale", "0.5"])
    assert sum(generated) == 18
    # Keeping the routing is another sparse setting too, and the config it hands the engine says so.
    generated.clear()
    EchoEngine.instances.clear()
    routed = eval_main.main(argv + ["--resume", "--routing"])
    assert sum(generated) == 18 and routed["config"]["dense_routing"] is True
    assert json.loads(out.with_suffix(".sparse_config.json").read_text())["dense_routing"] is True
    # Without --resume the file starts afresh.
    generated.clear()
    eval_main.main(argv)
    assert sum(generated) == 2 * 18
