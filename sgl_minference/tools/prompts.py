"""RULER-style synthetic long-context tasks, generated offline, deterministic per seed, exact in token length.

Every prompt is assembled from *pieces* (an instruction head, haystack sentences, needles, a question tail),
each tokenized on its own; the prompt's token ids are the concatenation of its pieces' ids, so the prompt length
is the sum of the pieces' lengths and can be hit exactly: the haystack is filled sentence by sentence and its last
sentence is cut to the remaining budget. Pieces begin with a space or a newline, so tokenizing them one by one
gives the same tokens as in running text, up to the boundaries. The engine is given the ids, never the text, so
the dense and the sparse runs see the same tokens.

Tasks (``TASKS``): ``passkey`` (a number in repeated noise), ``niah_single`` (one key -> number needle in varied
filler), ``niah_multikey`` (the asked needle among distractor needles with other keys), ``niah_multivalue`` (one
key with several numbers, all to be returned), ``variable_tracking`` (a chain of variable assignments; return
every name bound to the value), ``common_words`` (the most frequent words of a long list), ``kv_retrieval`` (a
long table of random keys and values; also the search's calibration text). ``depth`` in ``[0, 1]`` places the
asked needle (0: right after the instruction, 1: right before the question).

The one home of the project's synthetic prompts: the eval scores these tasks, the search calibrates on
``kv_retrieval``, and the multi-turn benchmark's shared contexts (``benchmarks/multiturn/workload.py``) draw their
numbers, variable names and assignments from the pieces here. Standard library only (the benchmark's HTTP side
imports it without torch).
"""

from __future__ import annotations

import bisect
import itertools
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..checks import check

# Filler for the haystacks: plain statements without digits, so no number but a needle's can be the answer.
FILLER = (
    "The morning train left the station a few minutes late.",
    "A narrow path climbs from the village to the old stone chapel.",
    "Most of the apples in the orchard were picked before the first frost.",
    "The library keeps its oldest maps in a cool room behind the reading hall.",
    "She painted the fence blue because the hardware store had no green left.",
    "Rain fell steadily through the afternoon and the streets emptied.",
    "The committee agreed to meet again once the survey results were in.",
    "Fishing boats come back to the harbour when the tide turns.",
    "He kept a notebook of every bird he saw on his walks.",
    "The bakery on the corner sells out of bread by noon on weekends.",
    "Engineers inspected the bridge and found the cables in good condition.",
    "A quiet wind moved the tall grass along the edge of the field.",
    "The museum opened a new wing dedicated to early printing presses.",
    "Children played in the square while their parents talked by the fountain.",
    "The recipe calls for butter, flour, and a pinch of salt.",
    "Snow covered the mountain pass and the road was closed for a week.",
    "The old clock in the hallway chimes a little after every hour.",
    "Volunteers planted a row of young oaks along the river bank.",
    "The report was long, but its conclusion fit on a single page.",
    "A cat slept on the warm windowsill for most of the day.",
    "The orchestra rehearsed the final movement until the light faded.",
    "Merchants once carried salt and wool along this road to the coast.",
    "The garden was overgrown, yet the roses still bloomed every summer.",
    "Students gathered in the hall to hear the visiting lecturer speak.",
    "The ferry crosses the lake slowly, stopping at each small pier.",
    "Her grandfather built the cabin with timber from the nearby forest.",
    "The market stalls were packed away as the evening grew cold.",
    "A lighthouse keeper once lived alone on the rocky island.",
    "The team reviewed the plan carefully before starting the work.",
    "Fresh paint and new curtains made the small room feel larger.",
    "The river floods the lower meadows nearly every spring.",
    "Travellers often stop at the inn to rest their horses and eat.",
    "The scientist repeated the experiment to be sure of the result.",
    "Leaves turned red and gold across the hills in autumn.",
    "The shop window displayed hats, gloves, and woollen scarves.",
    "A long queue formed outside the theatre before the premiere.",
    "The farmer repaired the barn roof before the storms arrived.",
    "Old letters were found in a box hidden under the staircase.",
    "The town council voted to restore the clock tower.",
    "Sailors watched the clouds gather over the western horizon.",
    "The teacher read a story aloud while the class listened closely.",
    "Mist rose from the valley as the sun came over the ridge.",
    "The cyclist fixed a flat tyre at the side of the road.",
    "The kitchen smelled of onions, garlic, and roasting peppers.",
    "A small bookshop survived for decades on a quiet side street.",
    "The hikers reached the summit just as the weather cleared.",
    "Workers laid new stones in the square over the summer.",
    "The violinist tuned her instrument before stepping onto the stage.",
)
# Repeated noise for passkey and variable tracking, as in the classic passkey test.
NOISE = " The sky is clear and the grass is green. The river runs to the sea. On we go, and back again."

ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
              "wary", "young", "zesty", "bold", "crisp", "deep", "early", "fierce")
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tower",
         "umbrella", "valley", "walnut", "yarrow", "zephyr", "beacon", "copper", "dragon", "ember", "forest")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class PieceEncoder:
    """Cached token ids of text pieces for one tokenizer.

    ``tokenizer`` needs ``encode(text, add_special_tokens=...) -> list[int]`` (any Hugging Face tokenizer).
    ``prefix`` holds the special tokens the tokenizer puts before a text (e.g. ``<bos>``), found by comparing
    an encoding with and without special tokens; every prompt starts with them.
    """

    def __init__(self, tokenizer):
        check(hasattr(tokenizer, "encode"), "tokenizer", "needs an encode(text, add_special_tokens=...) method")
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}
        plain = list(tokenizer.encode("Hello", add_special_tokens=False))
        full = list(tokenizer.encode("Hello", add_special_tokens=True))
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        self.prefix: tuple[int, ...] = tuple(full[:at])

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            self._cache[text] = ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


@dataclass(kw_only=True)
class Sample:
    """One prompt with its references."""

    task: str
    length: int  # tokens in input_ids, exactly
    depth: float | None  # asked needle's place in the haystack, 0 (start) .. 1 (end); None: the task has none
    seed: int  # the seed this sample was generated from
    input_ids: list[int]  # [length] prompt token ids, the tokenizer's special prefix (e.g. <bos>) included
    answers: list[str]  # references; the score is the share of them found in the output
    question: str  # the question part of the prompt, for logs
    max_new_tokens: int  # enough for every answer


@dataclass(kw_only=True)
class Needle:
    """A text piece inserted into the haystack at ``depth`` (0..1)."""

    text: str
    depth: float


def _assemble(enc: PieceEncoder, *, length: int, head: str, filler: Callable[[], str], needles: list[Needle],
              tail: str) -> list[int]:
    """``prefix + head + haystack-with-needles + tail`` as exactly ``length`` token ids.

    The haystack gets the remaining budget: ``filler()`` sentences are appended until it is full, the last one
    cut; each needle goes to the sentence boundary nearest to its depth (ties keep the needles' order).
    """
    head_ids = list(enc.prefix) + list(enc(head))
    tail_ids = list(enc(tail))
    needle_ids = [enc(n.text) for n in needles]
    budget = length - len(head_ids) - len(tail_ids) - sum(len(n) for n in needle_ids)
    check(budget >= 0, "length", f"{length} tokens cannot hold the task's fixed text "
          f"({length - budget} tokens: instruction, needles, question)")
    pieces: list[tuple[int, ...]] = []
    ends = [0]  # ends[i]: haystack tokens before sentence boundary i
    while ends[-1] < budget:
        ids = enc(filler())
        check(len(ids) > 0, "tokenizer", "a filler sentence encodes to no tokens")
        ids = ids[: budget - ends[-1]]
        pieces.append(ids)
        ends.append(ends[-1] + len(ids))
    inserts: dict[int, list[tuple[int, ...]]] = {}
    for needle, ids in zip(needles, needle_ids):
        check(0.0 <= needle.depth <= 1.0, "depth", f"{needle.depth} is outside [0, 1]")
        target = needle.depth * budget
        i = bisect.bisect_left(ends, target)
        if i > 0 and (i == len(ends) or target - ends[i - 1] <= ends[i] - target):
            i -= 1
        inserts.setdefault(i, []).append(ids)
    out = head_ids
    for i in range(len(pieces) + 1):
        for ids in inserts.get(i, []):
            out.extend(ids)
        if i < len(pieces):
            out.extend(pieces[i])
    out.extend(tail_ids)
    assert len(out) == length, (len(out), length)
    return out


def _sentences(rng: random.Random) -> Callable[[], str]:
    """Endless filler: the FILLER sentences in a fresh random order each round."""
    order: list[str] = []

    def next_sentence() -> str:
        if not order:
            order.extend(rng.sample(FILLER, len(FILLER)))
        return " " + order.pop()

    return next_sentence


def _noise() -> str:
    return NOISE


# -- pieces both generators use (this module's tasks and benchmarks/multiturn/workload.py's shared contexts) --


def number(rng: random.Random, digits: int = 7) -> str:
    """A random ``digits``-digit decimal number (no leading zero): a needle's value or a pass key."""
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def unique_number(rng: random.Random, digits: int, taken: set[str]) -> str:
    """:func:`number` drawn again until it is not in ``taken``; it is added to it."""
    while True:
        value = number(rng, digits)
        if value not in taken:
            taken.add(value)
            return value


def variable_name(rng: random.Random, letters: int = 5) -> str:
    """A random upper-case variable name for the variable-tracking tasks."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(letters))


def assignment(name: str, value: str) -> str:
    """One variable-tracking statement: ``VAR name = value.`` (``value`` a number or ``VAR other``)."""
    return f"VAR {name} = {value}."


def _keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct ``adjective-noun`` keys."""
    pairs = rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _fresh_words(rng: random.Random, seen: set[str]):
    """Endless distinct pronounceable non-words of 2-3 syllables, never one of ``seen`` (which grows)."""
    while True:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            yield w


def _pseudo_words(rng: random.Random, n: int, seen: set[str]) -> list[str]:
    """``n`` distinct non-words not in ``seen``; they are added to it."""
    return list(itertools.islice(_fresh_words(rng, seen), n))


def _spread(rng: random.Random, n: int, asked: float) -> list[float]:
    """Depths of ``n`` needles: the first (the asked one) at ``asked``, the others uniform in [0, 1]."""
    return [asked] + [rng.random() for _ in range(n - 1)]


_NIAH_HEAD = ("Some special magic numbers are hidden in the following text. Read it closely and remember them; "
              "you will be asked about one of them afterwards.\n")


def _niah(enc, rng, length, depth, *, keys: int, values: int):
    names = _keys(rng, keys)
    numbers = [[number(rng) for _ in range(values)] for _ in names]
    asked = names[0]
    needles = []
    depths = _spread(rng, keys * values, depth)
    for ki, (name, nums) in enumerate(zip(names, numbers)):
        for vi, num in enumerate(nums):
            needles.append(Needle(text=f" One of the special magic numbers for {name} is: {num}.",
                                  depth=depths[ki * values + vi]))
    noun = "numbers" if values > 1 else "number"
    question = f"What {'are all the' if values > 1 else 'is the'} special magic {noun} for {asked} in the text?"
    tail = f"\n{question} The special magic {noun} for {asked} mentioned in the text {'are' if values > 1 else 'is'}"
    ids = _assemble(enc, length=length, head=_NIAH_HEAD, filler=_sentences(rng), needles=needles, tail=tail)
    return ids, numbers[0], question, 16 * values


def passkey(enc, rng, length, depth):
    key = number(rng, 5)
    head = ("There is a pass key hidden inside a lot of irrelevant text. Find it and remember it; "
            "you will be asked for it afterwards.\n")
    needle = Needle(text=f" The pass key is {key}. Remember it. {key} is the pass key.", depth=depth)
    question = "What is the pass key?"
    ids = _assemble(enc, length=length, head=head, filler=_noise, needles=[needle],
                    tail=f"\n{question} The pass key is")
    return ids, [key], question, 12


def niah_single(enc, rng, length, depth):
    return _niah(enc, rng, length, depth, keys=1, values=1)


def niah_multikey(enc, rng, length, depth):
    return _niah(enc, rng, length, depth, keys=4, values=1)


def niah_multivalue(enc, rng, length, depth):
    return _niah(enc, rng, length, depth, keys=1, values=4)


def variable_tracking(enc, rng, length, depth, *, hops: int = 4):
    names = [variable_name(rng) for _ in range(hops + 1)]
    value = number(rng, 5)
    statements = [" " + assignment(names[0], value)]
    statements += [" " + assignment(b, f"VAR {a}") for a, b in zip(names, names[1:])]
    later = sorted(depth + (1.0 - depth) * rng.random() for _ in range(hops))
    needles = [Needle(text=s, depth=d) for s, d in zip(statements, [depth] + later)]
    head = ("Memorize every variable assignment in the text below; the rest is noise. "
            "You will be asked which variables end up holding a given value.\n")
    question = f"Which variables are assigned the value {value}, directly or through other variables?"
    tail = f"\n{question} Answer: the variables assigned the value {value} are:"
    ids = _assemble(enc, length=length, head=head, filler=_noise, needles=needles, tail=tail)
    return ids, names, question, 8 * (hops + 1)


def common_words(enc, rng, length, depth, *, num_common: int = 10, rare_repeats: int = 3):
    """A numbered word list; the ``num_common`` words repeated most often are the answer.

    Common words repeat ``max(rare_repeats + 3, entries // 40)`` times (capped at 30, RULER's frequency), rare
    words ``rare_repeats`` times; the list is sized from the tokens one entry takes on average, then topped up
    with words seen once, so the common words stay the most frequent whatever the tokenizer.
    """
    head = "Below is a numbered list of words. Some of them appear many times.\n"
    question = f"What are the {num_common} most common words in the list above?"
    tail = f"\n{question} Answer: the {num_common} most common words in the list are:"
    fixed = len(enc.prefix) + len(enc(head)) + len(enc(tail))
    probe = _pseudo_words(random.Random(rng.random()), 64, set())
    per_entry = sum(len(enc(f"\n{100 + i}. {w}")) for i, w in enumerate(probe)) / len(probe)
    entries = int(0.9 * max(length - fixed, 0) / per_entry)
    repeats = min(30, max(rare_repeats + 3, entries // 40))
    check(entries >= num_common * repeats, "length", f"{length} tokens are too few for a {num_common}-word list")
    seen: set[str] = set()
    common = _pseudo_words(rng, num_common, seen)
    rare = _pseudo_words(rng, (entries - num_common * repeats) // rare_repeats, seen)
    words = common * repeats + rare * rare_repeats
    rng.shuffle(words)
    extra = _fresh_words(rng, seen)
    counter = iter(range(1, 10 ** 9))

    def next_entry() -> str:
        word = words.pop() if words else next(extra)
        return f"\n{next(counter)}. {word}"

    words.reverse()  # pop() then reads the shuffled list front to back
    ids = _assemble(enc, length=length, head=head, filler=next_entry, needles=[], tail=tail)
    return ids, common, question, 12 * num_common


def kv_retrieval(enc, rng, length, depth):
    """A JSON-like table of random hexadecimal keys and values; the value of one key is asked.

    The asked pair sits at ``depth``; the filler pairs are freshly random, so every key is unique.
    """
    def hexkey() -> str:
        return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4))

    key, value = hexkey(), hexkey()
    head = "Below is a table of keys and their values, one pair per line.\n{"
    question = f"What is the value of the key \"{key}\" in the table above?"
    tail = f"\n}}\n{question} The value of \"{key}\" is \""
    ids = _assemble(enc, length=length, head=head, filler=lambda: f"\n\"{hexkey()}\": \"{hexkey()}\",",
                    needles=[Needle(text=f"\n\"{key}\": \"{value}\",", depth=depth)], tail=tail)
    return ids, [value], question, 24


TASKS: dict[str, Callable] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "kv_retrieval": kv_retrieval,
}
DEPTHLESS = frozenset({"common_words"})  # tasks whose answer has no single place in the text


def parse_prompt(item: str) -> tuple[str, float]:
    """``TASK[@DEPTH]`` (a task of :data:`TASKS`, the asked needle's depth in [0, 1], default 0.5) as ``(task,
    depth)``; ``ValueError`` saying what is wrong with ``item``."""
    task, _, depth = item.partition("@")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in {item!r}; choose from {', '.join(sorted(TASKS))}")
    try:
        d = float(depth) if depth else 0.5
        in_range = 0.0 <= d <= 1.0
    except ValueError:
        in_range = False
    if not in_range:
        raise ValueError(f"depth {depth!r} in {item!r} is not a number in [0, 1]")
    return task, d


def make_sample(task: str, tokenizer_or_encoder, *, length: int, depth: float | None = 0.5, seed: int = 0) -> Sample:
    """One ``task`` prompt of exactly ``length`` tokens with the asked needle at ``depth``.

    Deterministic: the same (task, tokenizer, length, depth, seed) gives the same ids. ``tokenizer_or_encoder``:
    a Hugging Face tokenizer or a :class:`PieceEncoder` (reuse one across samples for its cache).
    """
    check(task in TASKS, "task", f"unknown task {task!r}; choose from {sorted(TASKS)}")
    check(isinstance(length, int) and length > 0, "length", f"expected a positive int, got {length!r}")
    enc = tokenizer_or_encoder if isinstance(tokenizer_or_encoder, PieceEncoder) else PieceEncoder(tokenizer_or_encoder)
    if task in DEPTHLESS:
        depth = None
    else:
        check(depth is not None and 0.0 <= depth <= 1.0, "depth", f"{depth!r} is not in [0, 1]")
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    ids, answers, question, max_new = TASKS[task](enc, rng, length, 0.0 if depth is None else depth)
    return Sample(task=task, length=length, depth=depth, seed=seed, input_ids=ids, answers=list(answers),
                  question=question, max_new_tokens=max_new)


def make_suite(tokenizer, *, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
               samples: int = 1, seed: int = 0) -> list[Sample]:
    """Every (task, length, depth, sample) cell; a depthless task gets ``samples * len(depths)`` prompts per
    length (seeds ``seed ..``), so every task x length cell is scored on the same number of prompts."""
    enc = PieceEncoder(tokenizer)
    out = []
    for task in tasks:
        for length in lengths:
            cells = [(None, samples * len(depths))] if task in DEPTHLESS else [(d, samples) for d in depths]
            for depth, count in cells:
                out.extend(make_sample(task, enc, length=length, depth=depth, seed=seed + s) for s in range(count))
    return out


def depth_grid(n: int) -> list[float]:
    """``n`` depths evenly spread over [0, 1] (both ends included when ``n > 1``)."""
    check(n >= 1, "n", f"need at least one depth, got {n}")
    return [0.5] if n == 1 else [round(i / (n - 1), 4) for i in range(n)]
