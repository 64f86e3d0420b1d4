"""What the Engine-level GPU tests share: skip marks, prompts as token ids, prompt log-probabilities, configs."""

import importlib.util
import json
import random
from importlib.metadata import entry_points

import pytest
import torch

TAIL = 256  # prompt positions compared per request

SGLANG_GPU_SKIPS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang"),
    pytest.mark.skipif(not any(ep.name == "minference" for ep in entry_points(group="sglang.srt.plugins")),
                       reason="needs the sgl-minference entry point (pip install --no-deps -e .)"),
]

# Routing off: these layouts keep every key, so routing would send every chunk after the first to the dense
# backend, and the point is to compare the sparse kernel's path with dense attention.
DENSE_EQUIVALENT = {"min_context": 1, "min_chunk": 1, "dense_routing": False,
                    "default": {"type": "vertical_slash", "vertical": 65536, "slash": 65536}}
LOSSY = {"min_context": 1, "min_chunk": 1, "default": {"type": "a_shape", "sink": 64, "local": 128}}


COPY_DISTANCE = 2048  # how far back a prompt's compared tail repeats earlier ids (past A-shape's 64 + 128 keys)


def ids(length: int, seed: int, vocab: int = 128256) -> list[int]:
    """``length`` seeded token ids in ``[1000, min(vocab, 128256))`` (clear of special tokens).

    From ``length >= 4 * TAIL`` on, the last ``TAIL`` ids repeat the ``TAIL`` ids that start ``COPY_DISTANCE``
    (or as far as fits) before them. A real model copies such a repeat with confident, nearly exact
    log-probabilities (induction), which it can do only by attending that far back: the compared positions then
    tell a kernel that reads the right keys (small gap, bf16 noise on confident predictions) from one that drops
    them (the copy is lost). Random ids alone leave every prediction near uniform, where long-range attention
    changes little and bf16 noise is large (Gemma-3 270M, H200, 2026-12-03: the lossy config only 1.1-1.2x the
    dense-equivalent gap).
    """
    rng = random.Random(seed)
    out = [rng.randrange(1000, min(vocab, 128256)) for _ in range(length)]
    if length >= 4 * TAIL:
        tail = length - TAIL
        src = max(TAIL, tail - COPY_DISTANCE)
        out[tail:] = out[src:src + TAIL]
    return out


def second_turn(turn1: list[int], new: int) -> list[int]:
    """``turn1`` and ``new`` more ids that repeat ``turn1``'s from ``COPY_DISTANCE`` back (see :func:`ids`): the
    radix scenario's second turn, whose compared tail is a copy read across the cached prefix."""
    src = len(turn1) - COPY_DISTANCE
    assert src >= 0 and new <= COPY_DISTANCE, (len(turn1), new)
    return turn1 + turn1[src:src + new]


def reference_backend() -> str:
    """The dense backend the comparisons are made against: SGLang's default for dense attention on this GPU (fa3 on
    Hopper with FA3 installed, else flashinfer; ``sgl_minference.plugin.resolve_dense_backend``).

    Not flashinfer everywhere: on Gemma-3 270M (H200, 2026-12-03) SGLang 0.5.17's flashinfer backend was 6.8-12.2
    nats (mean per compared position) from ``minference``'s dense-equivalent config, which was within 1.5x of
    SGLang's triton backend, and only 1.3-1.9 from the lossy A-shape config. The source suggests why (not yet
    confirmed by a run): its extend of a chunk without a cached prefix calls the ragged wrapper without
    ``window_left`` (``flashinfer_backend.py``, ``extend_no_prefix`` branch), so sliding-window layers would
    attend the whole chunk.
    """
    from sgl_minference.plugin import resolve_dense_backend

    return resolve_dense_backend("auto")


def tail_logprobs(engine, prompts):
    """Per prompt: the input log-probabilities of its last TAIL positions, plus meta_info."""
    single = isinstance(prompts[0], int)
    batch = [prompts] if single else prompts
    params = [{"max_new_tokens": 2, "temperature": 0.0} for _ in batch]
    outs = engine.generate(input_ids=batch, sampling_params=params, return_logprob=True,
                           logprob_start_len=[len(p) - TAIL for p in batch])
    return [([lp for lp, *_ in o["meta_info"]["input_token_logprobs"] if lp is not None], o["meta_info"])
            for o in outs]


def mean_gap(a, b):
    """Mean |difference| of the compared prompt log-probabilities, over all requests of a scenario."""
    gaps = []
    for (lp_a, _), (lp_b, _) in zip(a, b):
        assert len(lp_a) == len(lp_b) >= TAIL - 1
        gaps += [abs(x - y) for x, y in zip(lp_a, lp_b)]
    return sum(gaps) / len(gaps)


def assert_dense_equivalent(dense, equivalent, yardstick, lossy):
    """The dense-equivalent config's gap to ``dense`` (one scenario's runs) is within 1.5x the gap of a second
    dense kernel (``yardstick``), and the lossy config's gap is non-zero (the sparse path ran) and above twice it."""
    equivalent = mean_gap(dense, equivalent)
    yardstick = mean_gap(dense, yardstick)
    lossy = mean_gap(dense, lossy)
    assert lossy > 0, "the lossy config changed nothing: the sparse path did not run"
    assert equivalent <= 1.5 * yardstick + 1e-3, f"dense-equivalent gap {equivalent:.3g} vs triton {yardstick:.3g}"
    assert lossy > 2 * equivalent, f"lossy gap {lossy:.3g} not above dense-equivalent gap {equivalent:.3g}"


def run_scenarios(prompts: dict, *, attention_backend: str, override: dict | None = None, **engine_args) -> dict:
    """One engine: the tail log-probabilities of ``prompts["single"]``, ``["ragged"]``, ``["chunked"]`` and of the
    radix second turn ``["turn2"]`` after ``["turn1"]`` (``override``: the ``minference`` config object)."""
    import sglang

    kwargs = dict(skip_tokenizer_init=True, attention_backend=attention_backend, chunked_prefill_size=4096,
                  disable_cuda_graph=True, **engine_args)
    if override is not None:
        kwargs["json_model_override_args"] = json.dumps({"minference": override})
    engine = sglang.Engine(**kwargs)
    try:
        results = {name: tail_logprobs(engine, prompts[name]) for name in ("single", "ragged", "chunked")}
        tail_logprobs(engine, prompts["turn1"])
        results["radix"] = tail_logprobs(engine, prompts["turn2"])
    finally:
        engine.shutdown()
    return results
