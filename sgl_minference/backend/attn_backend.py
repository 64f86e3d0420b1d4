"""The ``minference`` attention backend: SGLang's own dense backend, plus a sparse path for long prefills.

An SGLang ``AttentionBackend`` that composes a dense one: the dense backend named by ``config.dense_backend``
(``auto``: ``fa3`` on Hopper when FA3 is installed, else ``flashinfer``; or ``flashinfer``, ``fa3``, ``triton``
explicitly) is built through SGLang's registry with the same ModelRunner and does everything that stays dense,
untouched: decode and its CUDA graphs, target-verify, draft extends, batches without a long request, and the
layers the sparse kernel cannot serve. Every method of SGLang's base class is delegated to it by name, and so are
the attributes SGLang reads or writes on an attention backend (its forward metadata, the capability flags, the
per-mode backend names it stamps, ``max_context_len``); any other attribute is this object's own, so a new one
never lands on the dense backend by accident.

A layer runs sparse only when the batch has a plan (see :mod:`.planner`) and the layer has a non-dense head;
otherwise, or for a layer with a logit cap, a sliding window, cross/encoder attention, a separate value head
size, a head_dim the kernels lack or extra attention inputs (e.g. attention sinks), the dense backend runs the
layer (each such reason is logged once). A model none of whose layers qualifies gets the dense backend alone
at start-up (``plugin.dense_only_reason``).

Two benchmark instruments, both off unless their environment variable is set when the backend is built:
``$SGL_MINFERENCE_STATS`` records what each sparse layer did (:mod:`.stats`), ``$SGL_MINFERENCE_SYNTHETIC``
replaces the vertical-slash picks by structured synthetic ones for dummy-weight runs (:mod:`.synthetic`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import partial

import torch

from ..config import MInferenceConfig
from ..cpu_torch import allow_torchvision_import
from ..kernels.sparse_attention import DENSE_COST_RATIO, SUPPORTED_HEAD_DIMS, sparse_attention
from ..patterns import HeadSet
from ..patterns.vertical_slash import NanFallbackLog
from . import synthetic
from .layer_layout import layer_layout
from .planner import LayerHeads, SparsePlan, layer_heads, plan_batch
from .routing import DenseRouter
from .stats import SparseStats

allow_torchvision_import()  # CPU-only torch (tests, CI): SGLang's import of torchvision fails without it

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend  # noqa: E402

logger = logging.getLogger(__name__)


def _on_dense(name: str, doc: str) -> property:
    """An attribute of the dense backend, read and written there (SGLang's view of one backend's state)."""

    def get(self):
        return getattr(self.dense, name)

    def put(self, value):
        setattr(self.dense, name, value)

    return property(get, put, doc=f"The dense backend's ``{name}``: {doc}.")


def _is_sparse_mode(forward_mode) -> bool:
    """Plain extends (and mixed chunked-prefill batches) may run sparse; verify, draft, dLLM and split never do."""
    return forward_mode.name in ("EXTEND", "MIXED")


class MInferenceAttnBackend(AttentionBackend):
    """Sparse prefill over a dense SGLang attention backend.

    Args:
        dense: the dense backend (an SGLang ``AttentionBackend``) built for the same runner.
        config: the resolved, model-validated sparse config.
        layers: per layer id, the layer's head groups on this rank (:func:`layer_heads`).
        all_heads: every query head on this rank (dense layouts of a sparse batch's short requests).
        token_to_kv_pool: SGLang's KV pool (``set_kv_buffer`` / ``get_kv_buffer``, page size 1 addressing).
        req_to_token: ``[pool_size, max_context]`` int32, SGLang's ``req_to_token_pool.req_to_token``.
        head_dim: the model's head_dim, one the kernel supports (it picks the routing's cost ratio,
            ``kernels.sparse_attention.DENSE_COST_RATIO``).
        environ: where ``$SGL_MINFERENCE_STATS`` / ``$SGL_MINFERENCE_SYNTHETIC`` are read (default ``os.environ``).
    """

    # The sparse plan reads the host context lengths (ForwardBatch.seq_lens_cpu) of every extend batch.
    needs_cpu_seq_lens = True

    def __init__(self, *, dense, config: MInferenceConfig, layers: dict[int, LayerHeads], all_heads: HeadSet,
                 token_to_kv_pool, req_to_token: torch.Tensor, head_dim: int,
                 environ: Mapping[str, str] | None = None):
        self.dense = dense
        self.config = config
        self.layers = layers
        self.all_heads = all_heads
        self.token_to_kv_pool = token_to_kv_pool
        self.req_to_token = req_to_token
        self._plan: SparsePlan | None = None
        self._plan_batch = None  # the ForwardBatch the plan was made for
        self._logged: set[str] = set()
        self._nan_log = NanFallbackLog(req_to_token.device)
        environ = os.environ if environ is None else environ
        structure = synthetic.Structure.from_env(environ)
        self._layer_layout = layer_layout if structure is None else partial(synthetic.layer_layout,
                                                                            structure=structure)
        sparse_layers = sorted(i for i, heads in layers.items() if not heads.all_dense)
        self._router = None
        if config.dense_routing and sparse_layers:
            self._router = DenseRouter(sparse_layers, cost_ratio=DENSE_COST_RATIO[head_dim],
                                       device=req_to_token.device)
        self._dense_layers: set[int] = set()  # this batch's layers that the router sends to the dense backend
        # A batch's line is written after its last layer that can run sparse.
        last = max(sparse_layers, default=-1)
        self._stats = SparseStats.from_env(environ, last_layer=last,
                                           structure="dummy" if structure is None else "synthetic")

    # ---- per batch -------------------------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        """The dense backend's metadata, then (extend batches only) the sparse plan, built once per batch."""
        self.dense.init_forward_metadata(forward_batch)
        self._plan, self._plan_batch = None, None
        if self._stats is not None:
            self._stats.flush()  # a previous batch that never reached the last layer
        if not _is_sparse_mode(forward_batch.forward_mode) or forward_batch.extend_seq_lens_cpu is None:
            return
        self._plan = plan_batch(
            self.config,
            seq_lens_q=list(forward_batch.extend_seq_lens_cpu),
            seq_lens_k=forward_batch.seq_lens_cpu.tolist(),  # a host tensor: no device sync
            req_to_token=self.req_to_token,
            req_pool_indices=forward_batch.req_pool_indices,
            all_heads=self.all_heads,
        )
        self._dense_layers = set()
        if self._plan is not None:
            self._plan_batch = forward_batch
            if self._router is not None:
                self._dense_layers = self._router.plan(self._plan.geom)
            self._nan_log.poll()  # logs NaN fallbacks of earlier batches, without a device sync
            if self._stats is not None:
                self._stats.start_batch(self._plan.geom, self._plan.sparse_requests, self._dense_layers,
                                        self._plan.run_start)

    # ---- per layer -------------------------------------------------------------------------------------------

    def _log_once(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            logger.info("minference: %s; that part runs on the dense backend", reason)

    def _dense_reason(self, layer, heads: LayerHeads | None, kwargs: dict) -> str | None:
        """Why this layer cannot run sparse (None: it can). Host attribute reads only."""
        if heads is None:
            return f"layer {layer.layer_id} has no entry in the sparse config"
        if layer.logit_cap and layer.logit_cap > 0:
            return f"layer {layer.layer_id} uses a logit cap ({layer.logit_cap}), unsupported by the sparse kernel"
        if layer.sliding_window_size is not None and layer.sliding_window_size > 0:
            return f"layer {layer.layer_id} is a sliding-window layer"
        if layer.is_cross_attention or getattr(layer.attn_type, "value", "decoder") != "decoder":
            return f"layer {layer.layer_id} is cross or encoder attention"
        if layer.qk_head_dim != layer.v_head_dim:
            return f"layer {layer.layer_id} has different query/key and value head sizes"
        if layer.head_dim not in SUPPORTED_HEAD_DIMS:
            return (f"layer {layer.layer_id} has head_dim {layer.head_dim}, the sparse kernel supports "
                    f"{SUPPORTED_HEAD_DIMS}")
        if kwargs:
            return f"layer {layer.layer_id} passes extra attention inputs {sorted(kwargs)}"
        if layer.tp_q_head_num != heads.num_q_heads:
            return (f"layer {layer.layer_id} has {layer.tp_q_head_num} query heads on this rank, the config was "
                    f"sliced for {heads.num_q_heads}")
        return None

    def _runs_sparse(self, layer, forward_batch, kwargs: dict) -> bool:
        if self._plan is None or self._plan_batch is not forward_batch:
            return False
        heads = self.layers.get(layer.layer_id)
        if heads is not None and heads.all_dense or layer.layer_id in self._dense_layers:
            return False
        reason = self._dense_reason(layer, heads, kwargs)
        if reason is not None:
            self._log_once(reason)
            return False
        return True

    def _forward_sparse(self, q, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        """q ``[T, Hq*D]``, k/v ``[T, Hk, D]`` (RoPE applied) -> ``[T, Hq*D]``, reading all keys from the pool."""
        plan = self._plan
        if save_kv_cache and k is not None:
            # The prefix and this chunk are read from the pool, so the chunk goes in first.
            self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale,
                                                layer.v_scale)
        k_buffer, v_buffer = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        kv = plan.kv_source(k_buffer, v_buffer)
        q3 = q.contiguous().view(-1, layer.tp_q_head_num, layer.head_dim)
        heads = self.layers[layer.layer_id]

        def build():
            return self._layer_layout(q3, kv, plan, heads, self.config, sm_scale=layer.scaling)

        def attend(layout):
            return sparse_attention(q3, kv, layout, plan.geom, sm_scale=layer.scaling)[0]

        if self._router is not None:
            build, attend = self._router.timed(layer.layer_id, build, attend)
        if self._stats is None:
            o = attend(build())
        else:
            o = self._stats.run_layer(layer.layer_id, plan.geom, build=build, attend=attend)
        return o.view(-1, layer.tp_q_head_num * layer.head_dim)

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        if self._runs_sparse(layer, forward_batch, kwargs):
            return self._forward_sparse(q, k, v, layer, forward_batch, save_kv_cache)
        return self.dense.forward(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        if self._runs_sparse(layer, forward_batch, kwargs):
            return self._forward_sparse(q, k, v, layer, forward_batch, save_kv_cache)
        return self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kwargs):
        return self.dense.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    # ---- everything else SGLang calls or reads on an attention backend: the dense backend's ------------------

    forward_metadata = _on_dense("forward_metadata", "the dense backend's per-batch metadata (SGLang resets it)")
    prefill_attention_backend_str = _on_dense("prefill_attention_backend_str", "stamped by SGLang after start-up")
    decode_attention_backend_str = _on_dense("decode_attention_backend_str", "stamped by SGLang after start-up")
    max_context_len = _on_dense("max_context_len", "read by speculative decoding")
    supports_ragged_verify_graph = _on_dense("supports_ragged_verify_graph", "a capability flag")
    use_captured_forward_metadata_for_breakable_cuda_graph = _on_dense(
        "use_captured_forward_metadata_for_breakable_cuda_graph", "a capability flag")
    supports_full_cuda_graph_chunked_prefix = _on_dense("supports_full_cuda_graph_chunked_prefix", "a capability flag")

    @property
    def verify_mask(self):
        """The dense backend's (speculative decoding's draft stage fills it)."""
        return self.dense.verify_mask

    def forward_mixed(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True):
        return self.dense.forward_mixed(q, k, v, layer, forward_batch, save_kv_cache)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        return self.dense.init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch):
        return self.dense.init_forward_metadata_in_graph(forward_batch)

    def draft_extend_metadata_captured_in_graph(self) -> bool:
        return self.dense.draft_extend_metadata_captured_in_graph()

    def prepare_full_cuda_graph_chunked_prefix(self, forward_batch, *, in_capture: bool) -> None:
        return self.dense.prepare_full_cuda_graph_chunked_prefix(forward_batch, in_capture=in_capture)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        return self.dense.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_for_breakable_cuda_graph_capture(self, forward_batch):
        return self.dense.init_forward_metadata_for_breakable_cuda_graph_capture(forward_batch)

    def prepare_forward_metadata_for_breakable_cuda_graph_replay(self, capture_metadata, forward_batch, *,
                                                                 static_forward_batch=None) -> None:
        return self.dense.prepare_forward_metadata_for_breakable_cuda_graph_replay(
            capture_metadata, forward_batch, static_forward_batch=static_forward_batch)

    def get_cuda_graph_seq_len_fill_value(self):
        return self.dense.get_cuda_graph_seq_len_fill_value()

    def on_after_cuda_graph_warmup(self):
        return self.dense.on_after_cuda_graph_warmup()

    def update_verify_buffers_to_fill_after_draft(self, spec_info, cuda_graph_bs):
        return self.dense.update_verify_buffers_to_fill_after_draft(spec_info, cuda_graph_bs)

    def support_triton(self):
        return self.dense.support_triton()

    def get_indexer_metadata(self, layer_id: int, forward_batch):
        return self.dense.get_indexer_metadata(layer_id, forward_batch)


def build_layer_heads(config: MInferenceConfig, *, num_layers: int, num_q_heads: int, num_kv_heads: int,
                      attn_tp_rank: int, device) -> tuple[dict[int, LayerHeads], HeadSet]:
    """Head groups of every layer for one attention-TP rank (``num_q_heads``/``num_kv_heads`` per rank), and
    the HeadSet of all that rank's query heads."""
    layers = {layer: layer_heads(config, layer_id=layer, head_start=attn_tp_rank * num_q_heads,
                                 num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, device=device)
              for layer in range(num_layers)}
    all_heads = HeadSet.build(list(range(num_q_heads)), num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                              device=device)
    return layers, all_heads
