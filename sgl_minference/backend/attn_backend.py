"""The ``minference`` attention backend: SGLang's own dense backend, plus a sparse path for long prefills.

Composition, not inheritance: the dense backend named by ``config.dense_backend`` (``auto``: ``fa3`` on Hopper
when FA3 is installed, else ``flashinfer``; or ``flashinfer``, ``fa3``, ``triton`` explicitly) is built through
SGLang's registry with the same ModelRunner and does everything that stays dense, untouched: decode and its CUDA graphs, target-verify, draft extends, batches
without a long request, and the layers the sparse kernel cannot serve. Every attribute this class does not
define is read from, and written to, the dense backend, so SGLang sees one backend.

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
from ..kernels import sparse_attention
from ..kernels.sparse_attention import DENSE_COST_RATIO
from ..layout import HEAD_DIMS
from ..patterns import HeadSet
from ..patterns.vertical_slash import NanFallbackLog
from . import synthetic
from .planner import LayerHeads, SparsePlan, layer_heads, layer_layout, plan_batch
from .routing import DenseRouter
from .stats import SparseStats

logger = logging.getLogger(__name__)


def _is_sparse_mode(forward_mode) -> bool:
    """Plain extends (and mixed chunked-prefill batches) may run sparse; verify, draft, dLLM and split never do."""
    return forward_mode.name in ("EXTEND", "MIXED")


class MInferenceAttnBackend:
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

    # Attributes that live on this object; every other attribute read or write goes to the dense backend.
    _OWN = frozenset({"dense", "config", "layers", "all_heads", "token_to_kv_pool", "req_to_token", "_plan",
                      "_plan_batch", "_logged", "_stats", "_layer_layout", "_nan_log", "_router", "_dense_layers"})

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

    def __getattr__(self, name):
        # Only called for names not found on this object: the dense backend's state and methods.
        dense = self.__dict__.get("dense")
        if dense is None:
            raise AttributeError(name)
        return getattr(dense, name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.dense, name, value)

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
                self._stats.start_batch(self._plan.geom, self._plan.sparse_requests)

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
        if layer.head_dim not in HEAD_DIMS:
            return f"layer {layer.layer_id} has head_dim {layer.head_dim}, the sparse kernel supports {HEAD_DIMS}"
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
            layout = self._layer_layout(q3, kv, plan, heads, self.config, sm_scale=layer.scaling)
            if self._router is not None:
                self._router.record(layer.layer_id, layout)
            return layout

        if self._stats is None:
            o, _ = sparse_attention(q3, kv, build(), plan.geom, sm_scale=layer.scaling)
        else:
            o = self._stats.run_layer(
                layer.layer_id, plan.geom, build=build,
                attend=lambda layout: sparse_attention(q3, kv, layout, plan.geom, sm_scale=layer.scaling)[0])
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
