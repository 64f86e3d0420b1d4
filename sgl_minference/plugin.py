"""SGLang plugin: registers the ``minference`` attention backend (entry point group ``sglang.srt.plugins``).

SGLang calls :func:`register` in every process it starts (launcher, schedulers, workers). It adds
``minference`` to the ``--attention-backend`` choices, registers the backend factory, and hooks
``ServerArgs.__post_init__`` so that, with ``minference`` selected, the prefill CUDA graph is off unless the
user chose a prefill graph backend (``--cuda-graph-backend-prefill``): captured prefill graphs replay with the
batch shapes of their capture, while the sparse path plans every extend batch anew. Decode CUDA graphs stay.
The same hook gives ``minference`` its own ``--chunked-prefill-size`` default (:data:`CHUNKED_PREFILL_SIZE`)
when the user gave none.

Configuration: ``--json-model-override-args '{"minference": {...}}'`` (lands on the model's ``hf_config``)
or ``$SGL_MINFERENCE_CONFIG``; see :mod:`sgl_minference.config`. A bad config stops startup with a
:class:`~sgl_minference.config.ConfigError` naming the problem.
"""

from __future__ import annotations

import logging
import os

from .cpu_torch import allow_torchvision_import

logger = logging.getLogger(__name__)

BACKEND_NAME = "minference"
KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16")  # the sparse kernel reads fp16/bf16 caches

# Default --chunked-prefill-size under minference when the user gives none; None keeps SGLang's per-GPU choice
# (ServerArgs._handle_gpu_memory_settings: 8192 on H100/H200-class GPUs, 16384 above 160 GB). Every chunk pays
# the index estimate again in every layer, against the whole prefix so far, so larger chunks pay it fewer times;
# SGLang also sizes its activation reserve (and so the KV pool, via mem_fraction_static) from this value, about
# 1.5 MB per chunk token. TO BE SET by the lead from the H200 chunk sweep (BENCHMARKS.md, "Chunk policy").
CHUNKED_PREFILL_SIZE: int | None = None

_hook_registered = False


def register() -> None:
    """Zero-argument plugin entry point; safe to call more than once in a process."""
    global _hook_registered
    allow_torchvision_import()  # CPU-only torch (tests, CI): SGLang's import of torchvision fails without it
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_backend)
    if not _hook_registered:
        HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__", prefill_graph_off, HookType.BEFORE)
        HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__", chunk_size_default,
                              HookType.BEFORE)
        HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__", check_config_at_launch,
                              HookType.AFTER)
        _hook_registered = True


def prefill_graph_off(server_args, *args, **kwargs) -> None:
    """Before ``ServerArgs.__post_init__``: no prefill CUDA graph for ``minference`` unless one was asked for."""
    if BACKEND_NAME not in (server_args.attention_backend, server_args.prefill_attention_backend):
        return None
    if server_args.cuda_graph_backend_prefill is None and not server_args.disable_prefill_cuda_graph:
        logger.info("minference: prefill CUDA graph disabled (--cuda-graph-backend-prefill disabled)")
        server_args.cuda_graph_backend_prefill = "disabled"
    return None


def chunk_size_default(server_args, *args, **kwargs) -> None:
    """Before ``ServerArgs.__post_init__`` (where SGLang fills in its per-GPU default and sizes memory from it):
    :data:`CHUNKED_PREFILL_SIZE` for ``minference`` when set and the user gave no ``--chunked-prefill-size``."""
    if BACKEND_NAME not in (server_args.attention_backend, server_args.prefill_attention_backend):
        return None
    if CHUNKED_PREFILL_SIZE is not None and server_args.chunked_prefill_size is None:
        logger.info("minference: --chunked-prefill-size %d (the minference default)", CHUNKED_PREFILL_SIZE)
        server_args.chunked_prefill_size = CHUNKED_PREFILL_SIZE
    return None


def check_config_at_launch(result, server_args, *args, **kwargs) -> None:
    """After ``ServerArgs.__post_init__``: read the sparse config and check it against the model in the launching
    process, so a bad file stops ``launch_server`` / ``Engine(...)`` at once. The backend factory checks again in
    each scheduler, but only after the weights load and the KV pool is allocated (measured on an H100 with a
    1B model, 2026-11-24: bad configs were refused 64-72 s after launch)."""
    if BACKEND_NAME not in (server_args.attention_backend, server_args.prefill_attention_backend):
        return None
    from .config import resolve

    model_config = server_args.get_model_config()
    config = resolve(model_config.hf_config, server_args.model_path, os.environ)
    config.validate_for_model(model_config.num_hidden_layers, model_config.num_attention_heads)
    return None


def unsupported_setup(runner) -> str | None:
    """Why this server setup cannot run the sparse path (None: it can). Checked once, at startup."""
    sa = runner.server_args
    if runner.use_mla_backend:
        return "MLA attention models are not supported (the sparse kernel reads per-head K and V)"
    if sa.kv_cache_dtype not in KV_CACHE_DTYPES:
        return f"--kv-cache-dtype {sa.kv_cache_dtype} is not supported: use one of {', '.join(KV_CACHE_DTYPES)}"
    if getattr(sa, "attn_cp_size", 1) > 1 or getattr(sa, "dcp_size", 1) > 1:
        return "context parallel attention (--attn-cp-size / --dcp-size > 1) is not supported"
    return None


def dense_only_reason(model_config) -> str | None:
    """Why no layer of this model can run the sparse kernel (None: some can), from SGLang's ModelConfig.

    Decided once at start-up, so that such a model serves on the dense backend instead of failing mid-request,
    once a prompt first passes ``min_context``.
    """
    from .kernels.sparse_attention import SUPPORTED_HEAD_DIMS

    head_dim = model_config.head_dim
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not supported by the sparse kernel (supported: {SUPPORTED_HEAD_DIMS})"
    v_head_dim = getattr(model_config, "v_head_dim", head_dim)
    if v_head_dim != head_dim:
        return f"the value head size {v_head_dim} differs from head_dim {head_dim}"
    return None


def resolve_dense_backend(name: str) -> str:
    """The SGLang backend ``dense_backend`` names; ``auto`` is fa3 on Hopper when FA3 is installed, else flashinfer."""
    if name != "auto":
        return name
    from sglang.srt.utils.common import is_hopper_with_cuda_12_3

    return "fa3" if is_hopper_with_cuda_12_3() and _fa3_installed() else "flashinfer"


def _fa3_installed() -> bool:
    try:
        from sgl_kernel.flash_attn import is_fa3_supported
    except ImportError:  # sgl_kernel wheels without the FA3 extension
        return False
    return bool(is_fa3_supported())


def create_backend(runner):
    """Factory SGLang calls with its ModelRunner: the composed backend; the dense one alone for draft models and
    for models the sparse kernel cannot serve at all (:func:`dense_only_reason`, logged once)."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.runtime_context import get_parallel

    from .backend.attn_backend import MInferenceAttnBackend, build_layer_heads
    from .config import resolve

    model_config = runner.model_config
    config = resolve(model_config.hf_config, runner.server_args.model_path, os.environ)
    dense_name = resolve_dense_backend(config.dense_backend)
    if runner.is_draft_worker:
        # Speculative draft models only run short extends and decode: nothing to make sparse.
        return ATTENTION_BACKENDS[dense_name](runner)
    problem = unsupported_setup(runner)
    if problem is not None:
        raise ValueError(f"--attention-backend {BACKEND_NAME}: {problem}")
    config.validate_for_model(model_config.num_hidden_layers, model_config.num_attention_heads)
    dense = ATTENTION_BACKENDS[dense_name](runner)
    dense_only = dense_only_reason(model_config)
    if dense_only is not None:
        logger.warning("minference: %s; every layer runs on the dense backend %s", dense_only, dense_name)
        return dense
    parallel = get_parallel()
    tp_size = parallel.attn_tp_size
    req_to_token = runner.req_to_token_pool.req_to_token
    layers, all_heads = build_layer_heads(config, num_layers=model_config.num_hidden_layers,
                                          num_q_heads=model_config.num_attention_heads // tp_size,
                                          num_kv_heads=model_config.get_num_kv_heads(tp_size),
                                          attn_tp_rank=parallel.attn_tp_rank, device=req_to_token.device)
    logger.info("minference: sparse prefill from %s (min_context %d, min_chunk %d), dense backend %s",
                config.source, config.min_context, config.min_chunk, dense_name)
    return MInferenceAttnBackend(dense=dense, config=config, layers=layers, all_heads=all_heads,
                                 token_to_kv_pool=runner.token_to_kv_pool, req_to_token=req_to_token,
                                 head_dim=model_config.head_dim)
