"""Task generators (exact lengths, determinism, needle placement) and the scoring helpers."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from sgl_minference.eval import scoring, tasks

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


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
@pytest.mark.parametrize("length", [700, 2048, 5001])
def test_exact_length_and_prefix(tok, task, length):
    s = tasks.make_sample(task, tok, length=length, depth=0.37, seed=3)
    assert len(s.input_ids) == s.length == length
    assert s.input_ids[0] == BOS and BOS not in s.input_ids[1:]
    text = tok.decode(s.input_ids)
    assert s.question in text
    if task != "common_words":  # every reference is written in the prompt (common words: many times)
        assert all(a in text for a in s.answers)
    assert s.max_new_tokens > 0


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_deterministic_per_seed(tok, task):
    a = tasks.make_sample(task, tok, length=1500, depth=0.5, seed=7)
    b = tasks.make_sample(task, tasks.PieceEncoder(tok), length=1500, depth=0.5, seed=7)
    c = tasks.make_sample(task, tok, length=1500, depth=0.5, seed=8)
    assert a.input_ids == b.input_ids and a.answers == b.answers
    assert a.input_ids != c.input_ids


@pytest.mark.parametrize("task", ["passkey", "niah_single", "kv_retrieval"])
def test_needle_follows_depth(tok, task):
    length = 4000
    where = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = tasks.make_sample(task, tok, length=length, depth=depth, seed=0)
        text = tok.decode(s.input_ids)
        first = text.index(s.answers[0])
        where.append(len(tok.encode(text[:first], add_special_tokens=False)) / length)
    assert where == sorted(where)
    for depth, frac in zip((0.0, 0.25, 0.5, 0.75, 1.0), where):
        assert abs(frac - depth) < 0.06, (depth, frac)


def test_multikey_asks_one_of_several_keys(tok):
    s = tasks.make_sample("niah_multikey", tok, length=3000, depth=0.2, seed=1)
    text = tok.decode(s.input_ids)
    needles = re.findall(r"magic numbers for (\S+) is: (\d+)\.", text)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = dict(needles)
    key = re.search(r"number for (\S+) in the text\?", s.question).group(1)
    assert s.answers == [asked[key]]


def test_multivalue_returns_all_values(tok):
    s = tasks.make_sample("niah_multivalue", tok, length=3000, depth=0.6, seed=2)
    values = re.findall(r"magic numbers for \S+ is: (\d+)\.", tok.decode(s.input_ids))
    assert sorted(values) == sorted(s.answers) and len(set(values)) == 4


def test_variable_chain_in_order(tok):
    s = tasks.make_sample("variable_tracking", tok, length=3000, depth=0.1, seed=4)
    text = tok.decode(s.input_ids)
    value = re.search(r"the value (\d+),", s.question).group(1)
    assert f"VAR {s.answers[0]} = {value}." in text
    places = [text.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])]
    assert places == sorted(places) and text.index(f"VAR {s.answers[0]} = ") < places[0]


@pytest.mark.parametrize("length", [900, 6000])
def test_common_words_are_most_frequent(tok, length):
    s = tasks.make_sample("common_words", tok, length=length, seed=5)
    assert s.depth is None
    counts = Counter(re.findall(r"\n\d+\. (\w+)", tok.decode(s.input_ids)))
    assert len(s.answers) == 10
    least_common_answer = min(counts[w] for w in s.answers)
    most_frequent_other = max(c for w, c in counts.items() if w not in s.answers)
    assert least_common_answer > most_frequent_other


def test_too_short_length_names_argument(tok):
    with pytest.raises(ValueError, match="length"):
        tasks.make_sample("niah_multikey", tok, length=40, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        tasks.make_sample("passkey", tok, length=500, depth=1.5)
    with pytest.raises(ValueError, match="task"):
        tasks.make_sample("nope", tok, length=500)


def test_suite_cells(tok):
    suite = tasks.make_suite(tok, tasks=["passkey", "common_words"], lengths=[800, 1200],
                             depths=tasks.depth_grid(3), samples=2, seed=0)
    cells = Counter((s.task, s.length, s.depth) for s in suite)
    assert cells[("passkey", 800, 0.5)] == 2 and cells[("common_words", 1200, None)] == 2
    assert len(suite) == 2 * (2 * 3 + 2)
    assert tasks.depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


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
