"""Per-layer queries and keys (after RoPE and any q/k norm) from a plain transformers forward.

transformers' attention modules hand their post-RoPE ``query [B, Hq, N, D]`` and ``key [B, Hk, N, D]`` to the
attention function registered for the model's implementation; :func:`capture_qk` swaps in a wrapper around the
SDPA one for the duration of one forward, calls back with each wanted layer's tensors and stops the forward
after the last wanted layer (later layers cannot change them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...checks import check
from ...layout import check_tensor


@dataclass(kw_only=True)
class LayerQK:
    """One attention layer's inputs for a single sequence."""

    layer: int
    q: torch.Tensor  # [Hq, N, D] queries after RoPE, model dtype
    k: torch.Tensor  # [Hk, N, D] keys after RoPE, model dtype
    sm_scale: float  # the model's softmax scale
    softcap: float | None  # logit soft-cap (cap * tanh(s / cap)) or None


class _Stop(Exception):
    """Raised inside the forward once the last wanted layer has been handed over."""


def full_attention_layers(config) -> list[int]:
    """Indices of the layers that attend over the whole context (no sliding window).

    Uses ``layer_types`` (``"full_attention"`` vs ``"sliding_attention"``) where the config has it, else every
    layer unless the config declares one sliding window for all layers.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t == "full_attention"]
    uses_window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return [] if uses_window else list(range(config.num_hidden_layers))


def capture_qk(model, input_ids: torch.Tensor, layers: Sequence[int], on_layer: Callable[[LayerQK], None]) -> None:
    """Run ``model`` on ``input_ids`` (``[N]`` or ``[1, N]`` int64) and call ``on_layer`` for each of ``layers``.

    The model must use the ``sdpa`` attention implementation (load it with ``attn_implementation="sdpa"``).
    ``on_layer`` runs inside the forward, in layer order, so whatever it does with the tensors (e.g. a search)
    happens before the next layer and memory stays at one layer's worth.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    check(model.config._attn_implementation == "sdpa", "model",
          f"needs attn_implementation='sdpa', has {model.config._attn_implementation!r}")
    check(len(layers) > 0, "layers", "no layer to capture")
    ids = input_ids.view(1, -1) if input_ids.dim() == 1 else input_ids
    check_tensor(ids, "input_ids", ndim=2, dtypes=(torch.int64, torch.int32))
    check(ids.shape[0] == 1, "input_ids", f"one sequence at a time, got a batch of {ids.shape[0]}")
    wanted, last = set(layers), max(layers)
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_with_capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        if layer in wanted:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            on_layer(LayerQK(layer=layer, q=query[0], k=key[0], sm_scale=float(scale),
                             softcap=kwargs.get("softcap")))
            if layer == last:
                raise _Stop
        return original(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_with_capture
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(model.device), use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
