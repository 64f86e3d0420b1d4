"""Seeded shared-context workloads: one long context, several follow-up queries over it (as in SCBench).

Text tasks (accuracy is scored; need a tokenizer, whose token count sets the context length):

* ``kv``: a JSON object of random UUID keys and values; each query asks the value of one key.
* ``passkey``: filler prose hiding one pass key per vault; each query asks one vault's pass key.
* ``vt``: variable tracking; filler prose holding chains ``VAR A = 12345`` ... ``VAR B = VAR A`` ...;
  each query asks every variable that ends up holding one value.

Token task ``tokens`` (dummy-weight servers started with ``--skip-tokenizer-init``): random token ids of exactly
the target length and random question ids; accuracy is meaningless there, caching and TTFT are not.

Every context carries :data:`QUERIES_PER_CONTEXT` queries whose needles sit at spread depths. How the
queries are sent (one multi-turn session, or several requests sharing the context) is decided by the
prompt format and the runner, not here. Everything is a pure function of the seed (and the tokenizer). The pieces
the accuracy eval's tasks use too (numbers, variable names and assignments) come from ``sgl_minference.tools.prompts``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Callable

from benchmarks.multiturn.tokenization import Tokenizer
from sgl_minference.checks import check
from sgl_minference.tools.prompts import assignment, unique_number, variable_name

QUERIES_PER_CONTEXT = 5
TEXT_TASKS = ("kv", "passkey", "vt")
TASKS = TEXT_TASKS + ("tokens",)
VT_HOPS = 4  # variables per chain: one assigned the value, the others copying the previous one


@dataclass(kw_only=True)
class Query:
    """One follow-up question about a shared context."""

    question: str  # the question's text ("" in token mode)
    answers: list[str]  # strings a correct reply contains, all of them (empty in token mode)
    question_ids: list[int] = field(default_factory=list)  # token mode: the question as token ids


@dataclass(kw_only=True)
class SharedContext:
    """A long context and the queries asked over it."""

    context_id: str  # unique and stable for a (task, target, seed, index)
    task: str  # one of TASKS
    target_tokens: int  # requested context length
    context_ids: list[int]  # the context's token ids (text tasks: its encoding without special tokens)
    queries: list[Query]
    context: str | None = None  # the context's text (None in token mode)

    @property
    def context_tokens(self) -> int:
        return len(self.context_ids)


# ----------------------------------------------------------------------------------------------------------
# Filler prose
# ----------------------------------------------------------------------------------------------------------

_SUBJECTS = (
    "The ferry captain", "A tired cartographer", "The night baker", "Our neighbour", "The old lighthouse",
    "A travelling tinker", "The village choir", "The river pilot", "A patient gardener", "The station clerk",
    "The youngest weaver", "A retired surveyor", "The market crowd", "The school librarian", "A lone cyclist",
)
_VERBS = (
    "counted", "repaired", "painted", "described", "carried", "measured", "forgot", "admired", "mapped",
    "sorted", "polished", "questioned", "followed", "delivered", "borrowed",
)
_OBJECTS = (
    "the copper kettles", "a crate of turnips", "the broken compass", "the northern fences", "a bundle of letters",
    "the crooked chimneys", "a basket of pears", "the harbour ropes", "the winter ledgers", "a pair of boots",
    "the stone bridges", "the garden gates", "a sack of flour", "the signal lamps", "the empty barrels",
)
_TAILS = (
    "before the rain arrived", "while the bells rang", "after a long supper", "without saying a word",
    "near the eastern wall", "during the slow afternoon", "for the third time that week", "under a grey sky",
    "beside the frozen pond", "as the tide went out", "with great care", "at the edge of town",
)
_VAULTS = (
    "amber", "cobalt", "crimson", "emerald", "granite", "harbor", "ivory", "juniper", "lantern", "maple",
    "meadow", "onyx", "orchard", "quartz", "saffron", "silver", "tundra", "violet", "willow", "zephyr",
)


class _Filler:
    """An endless seeded stream of filler sentences, cut at any word count.

    ``words[i]`` is the i-th word; ``starts`` lists the word index where each sentence begins, so inserted
    statements land between sentences.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.words: list[str] = []
        self.starts: list[int] = []

    def _grow(self, n_words: int) -> None:
        r = self._rng
        while len(self.words) < n_words:
            self.starts.append(len(self.words))
            sentence = f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_TAILS)}."
            self.words.extend(sentence.split(" "))

    def render(self, n_words: int, inserts: list[tuple[float, str]]) -> str:
        """The first ``n_words`` words, with each ``(depth, text)`` insert placed at the start of the sentence
        holding word ``int(depth * n_words)`` (inserts at one place keep their list order)."""
        self._grow(n_words + 1)
        at: dict[int, list[str]] = {}
        for depth, text in inserts:
            target = int(depth * n_words)
            # The last sentence start at or before the target word (starts is ascending).
            lo, hi = 0, len(self.starts) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.starts[mid] <= target:
                    lo = mid
                else:
                    hi = mid - 1
            at.setdefault(min(self.starts[lo], n_words), []).append(text)
        pieces: list[str] = []
        prev = 0
        for pos in sorted(at):
            pieces += self.words[prev:pos]
            pieces += at[pos]
            prev = pos
        pieces += self.words[prev:n_words]
        return " ".join(pieces)


# ----------------------------------------------------------------------------------------------------------
# Tasks: render(n) is the context with n filler units (pairs or words); queries(n) the questions about it
# ----------------------------------------------------------------------------------------------------------


def _spread_depths(rng: random.Random, count: int) -> list[float]:
    """One depth in each of ``count`` equal slices of [0, 1), in shuffled order (questions jump around)."""
    depths = [(i + rng.random()) / count for i in range(count)]
    rng.shuffle(depths)
    return depths


class _KeyValueTask:
    header = (
        "Below is a JSON object whose keys and values are UUIDs. After it come questions, each naming one key; "
        "answer with the value stored under that key.\n\nJSON data:\n"
    )

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._pairs: list[tuple[str, str]] = []
        self._depths = _spread_depths(rng, QUERIES_PER_CONTEXT)

    def _pair(self, i: int) -> tuple[str, str]:
        while len(self._pairs) <= i:
            key, value = (str(uuid.UUID(int=self._rng.getrandbits(128), version=4)) for _ in range(2))
            self._pairs.append((key, value))
        return self._pairs[i]

    def min_units(self) -> int:
        return QUERIES_PER_CONTEXT  # one pair per queried depth slice

    def render(self, n: int) -> str:
        body = ", ".join(f'"{k}": "{v}"' for k, v in (self._pair(i) for i in range(n)))
        return self.header + "{" + body + "}"

    def queries(self, n: int) -> list[Query]:
        out = []
        for depth in self._depths:
            key, value = self._pair(int(depth * n))
            out.append(Query(question=f'What is the value stored under the key "{key}"?', answers=[value]))
        return out


class _PasskeyTask:
    header = (
        "The text below hides the pass keys of several vaults among unrelated sentences. After it come "
        "questions, each naming one vault; answer with that vault's pass key.\n\n"
    )

    def __init__(self, rng: random.Random) -> None:
        self._filler = _Filler(rng)
        taken: set[str] = set()
        self._vaults = rng.sample(_VAULTS, QUERIES_PER_CONTEXT)
        self._keys = [unique_number(rng, 6, taken) for _ in self._vaults]
        self._depths = _spread_depths(rng, QUERIES_PER_CONTEXT)

    def min_units(self) -> int:
        return 1

    def render(self, n: int) -> str:
        inserts = [
            (d, f"The pass key of the {v} vault is {k}. Remember it: {k} opens the {v} vault.")
            for d, v, k in zip(self._depths, self._vaults, self._keys)
        ]
        return self.header + self._filler.render(n, inserts)

    def queries(self, n: int) -> list[Query]:
        return [
            Query(question=f"What is the pass key of the {v} vault?", answers=[k])
            for v, k in zip(self._vaults, self._keys)
        ]


class _VariableTrackingTask:
    header = (
        "The text below assigns values to variables among unrelated sentences; a variable may copy another "
        "variable. After it come questions, each naming one value; answer with the names of all variables "
        "that hold that value.\n\n"
    )

    def __init__(self, rng: random.Random) -> None:
        self._filler = _Filler(rng)
        taken_values: set[str] = set()
        names: set[str] = set()
        self._chains: list[tuple[str, list[str], list[float]]] = []  # value, names in order, depths ascending
        for _ in range(QUERIES_PER_CONTEXT):
            value = unique_number(rng, 5, taken_values)
            chain = []
            while len(chain) < VT_HOPS:
                name = variable_name(rng)
                if name not in names:
                    names.add(name)
                    chain.append(name)
            self._chains.append((value, chain, sorted(rng.random() for _ in range(VT_HOPS))))

    def min_units(self) -> int:
        return 1

    def render(self, n: int) -> str:
        inserts = []
        for value, chain, depths in self._chains:
            rhs = [value] + [f"VAR {name}" for name in chain[:-1]]
            inserts += [(d, assignment(name, r)) for d, name, r in zip(depths, chain, rhs)]
        inserts.sort(key=lambda item: item[0])  # a chain's statements keep their order at equal places
        return self.header + self._filler.render(n, inserts)

    def queries(self, n: int) -> list[Query]:
        return [
            Query(question=f"Which variables hold the value {value}? List all of their names.", answers=list(chain))
            for value, chain, _ in self._chains
        ]


_TASK_CLASSES = {"kv": _KeyValueTask, "passkey": _PasskeyTask, "vt": _VariableTrackingTask}


# ----------------------------------------------------------------------------------------------------------
# Length fitting
# ----------------------------------------------------------------------------------------------------------


def fit_units(render: Callable[[int], str], count: Callable[[str], int], target: int, *, start: int) -> int:
    """The largest ``n >= start`` with ``count(render(n)) <= target``; ``count(render(n))`` must grow with n.

    Brackets the answer by extrapolating from measured lengths, then narrows it by alternating linear
    interpolation and bisection: a handful of full tokenizations even at a million tokens.
    """
    c_lo = count(render(start))
    check(c_lo <= target, "target_tokens", f"{target} is below the task's smallest context ({c_lo} tokens)")
    lo, hi, c_hi = start, None, None
    probe = start + 1
    while hi is None:
        c = count(render(probe))
        if c > target:
            hi, c_hi = probe, c
            break
        rate = max((c - c_lo) / (probe - lo), 1e-6) if probe > lo else 1.0
        lo, c_lo = probe, c
        # Aim a little past the target so the next probe usually closes the bracket; a rate measured on a
        # few units is rough, so grow at most 16-fold per probe.
        probe = lo + min(max(1, int((target - c_lo) / rate * 1.05) + 1), 16 * lo + 16)
    step = 0
    while hi - lo > 1:
        if step % 2 == 0 and c_hi > c_lo:
            mid = lo + int((target - c_lo) * (hi - lo) / (c_hi - c_lo))
            mid = min(max(mid, lo + 1), hi - 1)
        else:
            mid = (lo + hi) // 2
        c = count(render(mid))
        if c <= target:
            lo, c_lo = mid, c
        else:
            hi, c_hi = mid, c
        step += 1
    return lo


# ----------------------------------------------------------------------------------------------------------
# Public generators
# ----------------------------------------------------------------------------------------------------------


def _rng(seed: int, task: str, target: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across processes and Python versions.
    return random.Random(f"sgl-minference-multiturn:{seed}:{task}:{target}:{index}")


def text_context(*, task: str, target_tokens: int, tokenizer: Tokenizer, seed: int, index: int = 0) -> SharedContext:
    """One text-task context of at most ``target_tokens`` tokens (short of it by less than one filler unit:
    a word for ``passkey``/``vt``, a key-value pair for ``kv``)."""
    check(task in _TASK_CLASSES, "task", f"{task!r} is not one of {TEXT_TASKS}")
    check(target_tokens > 0, "target_tokens", f"must be positive, got {target_tokens}")
    spec = _TASK_CLASSES[task](_rng(seed, task, target_tokens, index))
    n = fit_units(spec.render, lambda text: len(tokenizer.encode(text)), target_tokens, start=spec.min_units())
    text = spec.render(n)
    return SharedContext(
        context_id=f"{task}-{target_tokens}-s{seed}-{index}",
        task=task,
        target_tokens=target_tokens,
        context=text,
        context_ids=tokenizer.encode(text),
        queries=spec.queries(n),
    )


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """Ids ``[low, high)`` random prompts draw from: clear of the low ids and of the special tokens that
    vocabularies keep at the top (Llama 3: the last 256 of 128256; Qwen2.5: the last 293 of 151936)."""
    check(vocab_size >= 1024, "vocab_size", f"expected a real vocabulary size, got {vocab_size}")
    return 100, vocab_size - vocab_size // 64


def token_context(
    *, target_tokens: int, vocab_size: int, seed: int, index: int = 0, question_tokens: int = 32
) -> SharedContext:
    """One token-mode context of exactly ``target_tokens`` random ids, with random-id questions."""
    check(target_tokens > 0, "target_tokens", f"must be positive, got {target_tokens}")
    check(question_tokens > 0, "question_tokens", f"must be positive, got {question_tokens}")
    rng = _rng(seed, "tokens", target_tokens, index)
    low, high = token_id_range(vocab_size)
    draw = lambda n: [rng.randrange(low, high) for _ in range(n)]  # noqa: E731
    return SharedContext(
        context_id=f"tokens-{target_tokens}-s{seed}-{index}",
        task="tokens",
        target_tokens=target_tokens,
        context_ids=draw(target_tokens),
        queries=[Query(question="", answers=[], question_ids=draw(question_tokens)) for _ in range(QUERIES_PER_CONTEXT)],
    )


def make_contexts(
    *,
    task: str,
    target_tokens: int,
    count: int,
    seed: int,
    tokenizer: Tokenizer | None = None,
    vocab_size: int | None = None,
) -> list[SharedContext]:
    """``count`` independent contexts of one task and length (index 0 .. count-1 of the seed)."""
    check(task in TASKS, "task", f"{task!r} is not one of {TASKS}")
    check(count > 0, "count", f"must be positive, got {count}")
    if task == "tokens":
        check(vocab_size is not None, "vocab_size", "token mode needs the model's vocabulary size")
        return [token_context(target_tokens=target_tokens, vocab_size=vocab_size, seed=seed, index=i) for i in range(count)]
    check(tokenizer is not None, "tokenizer", f"task {task!r} needs a tokenizer to measure lengths")
    return [
        text_context(task=task, target_tokens=target_tokens, tokenizer=tokenizer, seed=seed, index=i)
        for i in range(count)
    ]
