"""Benchmark-only: vertical-slash indices with the clustering of real attention, for dummy-weight runs.

Why: with random weights every key gets about the same attention, so the columns and diagonals the estimator
keeps are decided by noise. Noise picks are scattered, and an isolated diagonal costs two 64-key tiles per
64-row query block, so the 6096-diagonal default budget ends up covering nearly the whole causal triangle
(BENCHMARKS.md, launch-config sweep). A trained model's picks cluster (a local band, runs of neighbouring
diagonals, sink and delimiter columns), which merges them into few ranges. Timing dummy weights therefore
measures an accident of the weights, not what a user's model would see.

What: with ``$SGL_MINFERENCE_SYNTHETIC`` set (read once when the backend is built, logged as a warning), every
vertical-slash head group still runs the real estimator (its kernels, top-k and the conversion are all paid),
and then its output indices are replaced, before conversion into the layout, by indices of the same budgets
drawn from :class:`Structure`:

* diagonals: the forced local band (``forced_local`` nearest offsets), then one contiguous band holding a share
  ``slash_local`` of the remaining budget, then clusters of ``slash_cluster`` offsets ``slash_gap`` apart (gaps of
  at most 64 merge a cluster into one key range per query block, as a real cluster's neighbouring diagonals do)
  whose first offsets are drawn from a power law (density ``∝ offset^-slash_alpha``) between the band's end and
  the context length;
* columns: the forced sinks (first ``forced_sink`` keys), a share ``vertical_recent`` of the rest at the keys
  just before the chunk's end (real column scores favour them; the local band covers them, so the conversion
  drops them, as it drops such real picks), and runs of ``vertical_run`` consecutive keys placed by a power
  law in their distance from the last key (``vertical_alpha``), beyond the reach of the diagonal band.

Draws vary per layer, head, request and chunk (seeded by ``seed``, the layer and the batch's context lengths),
so a prefill sees different far clusters per head and chunk, deterministically. Generation is ``O(budget)``
per head (a handful of small kernels, no pass over the context). Overlapping clusters repeat offsets; repeats
are replaced by further draws (twice the budget is drawn), so a head uses its whole budget unless its context
is too crowded for that. Only vertical-slash heads change; other patterns are built as usual.

Value of the variable: ``default`` (or ``1``) for :data:`DEFAULT`, a JSON object overriding some of its fields,
or the path of a JSON file holding such an object under ``"structure"`` (what
``benchmarks/structure_capture.py`` writes from a real model's captured attention).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..checks import check
from ..config import Estimation, MInferenceConfig
from ..layout import SENTINEL, BatchGeometry, KVSource, SparseLayout
from ..patterns import HeadSet, estimate_vertical_slash
from ..patterns.convert import indices_to_layout
from . import layer_layout as per_layer
from .planner import HeadGroup, LayerHeads, SparsePlan

logger = logging.getLogger(__name__)

ENV_VAR = "SGL_MINFERENCE_SYNTHETIC"
_GENERATORS: dict[torch.device, torch.Generator] = {}  # one per device, reseeded per draw (a host-side op)
CANDIDATES = 2  # candidates drawn per budget slot, so that repeats (overlapping clusters) can be replaced


@dataclass(frozen=True, kw_only=True)
class Structure:
    """The distribution synthetic vertical-slash indices are drawn from (see the module docstring)."""

    slash_local: float  # share of the non-forced slash budget in one band right after the forced local band
    slash_cluster: int  # diagonals per far cluster
    slash_gap: int  # offset step inside a cluster (1: consecutive diagonals), at most 64
    slash_alpha: float  # far cluster starts: density ∝ offset^-alpha between the band's end and the context
    vertical_recent: float  # share of the non-forced column budget on the keys just before the chunk's end
    vertical_run: int  # consecutive keys per column cluster
    vertical_alpha: float  # column clusters: density ∝ (distance from the last key)^-alpha
    seed: int = 0
    source: str = ""  # where the numbers come from

    def __post_init__(self):
        for name in ("slash_local", "vertical_recent"):
            check(0.0 <= getattr(self, name) <= 1.0, name, f"{getattr(self, name)} is not a share in [0, 1]")
        for name in ("slash_cluster", "slash_gap", "vertical_run"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an int >= 1")
        check(self.slash_gap <= 64, "slash_gap", f"{self.slash_gap} > 64 would split a cluster's key range")
        for name in ("slash_alpha", "vertical_alpha"):
            check(getattr(self, name) >= 0.0, name, "must be >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Structure | None":
        """The structure ``$SGL_MINFERENCE_SYNTHETIC`` asks for, or None when it is unset or empty."""
        value = environ.get(ENV_VAR, "").strip()
        if not value:
            return None
        if value in ("1", "default"):
            structure = DEFAULT
        elif value.startswith("{"):
            structure = dataclasses.replace(DEFAULT, source=f"{DEFAULT.source}; overrides {value}",
                                            **json.loads(value))
        else:
            fields = json.loads(Path(value).read_text())["structure"]
            structure = cls(**{"source": value, **fields})
        logger.warning("minference: BENCHMARK MODE: vertical-slash indices are replaced by synthetic ones "
                       "($%s=%s): %s", ENV_VAR, value, structure)
        return structure

    # ---- drawing ------------------------------------------------------------------------------------------

    def draw(self, shape_columns: tuple[int, ...], shape_offsets: tuple[int, ...], geom: BatchGeometry,
             heads: HeadSet, *, layer_id: int, forced_sink: int, forced_local: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns ``[B, Hs, KC]`` (ascending, unused ``SENTINEL``) and offsets ``[B, Hs, KS]`` (descending, unused
        ``-1``), int32, the estimator's output contract and shapes, within each head's budgets and context."""
        sk = geom.seq_lens_k.long().view(-1, 1, 1)
        gen = _GENERATORS.get(sk.device)
        if gen is None:
            gen = _GENERATORS[sk.device] = torch.Generator(device=sk.device)
        gen.manual_seed(hash((self.seed, layer_id, tuple(geom.seq_lens_k_cpu))) & ((1 << 62) - 1))
        s = heads.budgets["slash"].long().view(1, -1, 1).minimum(sk)  # budgets clamp to the context, as the
        f = s.clamp(max=forced_local)  # estimator's do; the forced band is inside the budget
        band = f + torch.round(self.slash_local * (s - f)).long()  # [B, Hs, 1]: offsets 0 .. band-1 are taken
        return (self._columns(shape_columns, heads.budgets["vertical"], sk, forced_sink, band, gen),
                self._offsets(shape_offsets, s, sk, band, gen))

    def _offsets(self, shape, s, sk, band, gen) -> torch.Tensor:
        b, h, k = shape
        t = torch.arange(CANDIDATES * k, device=sk.device).view(1, 1, -1)
        size, gap = self.slash_cluster, self.slash_gap
        width = (size - 1) * gap + 1
        starts = _power_law(gen, (b, h, t.shape[-1] // size + 1), band, (sk - width + 1).maximum(band + 1),
                            self.slash_alpha)
        rank = (t - band).clamp(min=0)
        far = starts.gather(-1, rank // size) + gap * (rank % size)
        out = torch.where(t < band, t, far)
        return _first_unique(torch.where(out < sk, out, -1), s, k, descending=True, unused=-1)

    def _columns(self, shape, budget, sk, forced, band, gen) -> torch.Tensor:
        b, h, k = shape
        t = torch.arange(CANDIDATES * k, device=sk.device).view(1, 1, -1)
        s = budget.long().view(1, h, 1).minimum(sk)
        f = s.clamp(max=forced)
        recent_end = f + torch.round(self.vertical_recent * (s - f)).long()
        recent = sk - 1 - (t - f)  # the keys just before the chunk's end, latest first
        # Far clusters: the distance of a cluster's last key from the last key is >= the local band's reach.
        run = self.vertical_run
        d_last = _power_law(gen, (b, h, t.shape[-1] // run + 1), band, (sk - f - run + 1).maximum(band + 1),
                            self.vertical_alpha)
        rank = (t - recent_end).clamp(min=0)
        far = (sk - d_last - run).gather(-1, rank // run) + rank % run
        out = torch.where(t < f, t, torch.where(t < recent_end, recent, far))
        out = torch.where((out >= 0) & (out < sk), out, SENTINEL)
        return _first_unique(out, s, k, descending=False, unused=SENTINEL)


def _power_law(gen: torch.Generator, shape: tuple[int, ...], lo: torch.Tensor, hi: torch.Tensor,
               alpha: float) -> torch.Tensor:
    """int64 draws in ``[lo, hi)`` (broadcast to ``shape``) with density ``∝ (x + 1)^-alpha``, by inverse CDF."""
    u = torch.rand(shape, generator=gen, device=lo.device, dtype=torch.float64)
    a, c = (lo + 1).double(), (hi + 1).double()
    if math.isclose(alpha, 1.0):
        x = a * (c / a) ** u
    else:
        e = 1.0 - alpha
        x = (a ** e + u * (c ** e - a ** e)) ** (1.0 / e)
    return (x.floor().long() - 1).clamp(min=lo, max=hi - 1)


def _first_unique(x: torch.Tensor, limit: torch.Tensor, capacity: int, *, descending: bool,
                  unused: int) -> torch.Tensor:
    """The first ``limit`` distinct values of each row of candidates ``x`` [B, H, M] (in candidate order, ``unused``
    entries skipped), sorted, padded with ``unused`` to ``capacity``: int32 [B, H, capacity]."""
    order = x.argsort(dim=-1, stable=True)  # equal values keep candidate order: the first one is kept
    ordered = x.gather(-1, order)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    keep = torch.zeros_like(first).scatter(-1, order, first) & (x != unused)
    keep &= keep.cumsum(-1) <= limit
    out = torch.where(keep, x, unused).sort(dim=-1, descending=descending).values
    return out[..., :capacity].to(torch.int32)


def build_group(q: torch.Tensor, kv: KVSource, geom: BatchGeometry, group: HeadGroup, *, sm_scale: float,
                est: Estimation, layer_id: int, structure: Structure) -> SparseLayout:
    """A :data:`~sgl_minference.backend.layer_layout.GroupBuilder` with vertical-slash indices from ``structure``.

    The estimator runs as usual (its cost is paid); its indices are discarded for :meth:`Structure.draw`'s.
    Other head groups go through their registered builder.
    """
    if group.kind != "vertical_slash":
        return per_layer.build_group(q, kv, geom, group, sm_scale=sm_scale, est=est, layer_id=layer_id)
    columns, offsets = estimate_vertical_slash(q, kv, geom, group.heads, sm_scale=sm_scale, last_q=est.last_q,
                                               forced_sink=est.forced_sink, forced_local=est.forced_local)
    columns, offsets = structure.draw(tuple(columns.shape), tuple(offsets.shape), geom, group.heads,
                                      layer_id=layer_id, forced_sink=est.forced_sink, forced_local=est.forced_local)
    return indices_to_layout(columns, offsets, geom)


def layer_layout(q: torch.Tensor, kv: KVSource, plan: SparsePlan, heads: LayerHeads, config: MInferenceConfig, *,
                 sm_scale: float, structure: Structure) -> SparseLayout:
    """:func:`~sgl_minference.backend.layer_layout.layer_layout` with :func:`build_group` as its group builder."""
    return per_layer.layer_layout(q, kv, plan, heads, config, sm_scale=sm_scale,
                                  build=partial(build_group, structure=structure))


# Fitted from real attention: medians over the 540 heads (30 layers x 9 heads x 2 prompts) of SmolLM2-135M at 8K
# tokens, budgets scaled to the default's share of a 128K context (benchmarks/structure_capture.py, CPU,
# 2026-12-01). On that capture one 1024-query chunk attends a mean 0.225 of its causal pairs with these draws,
# 0.214 with the model's own picks and 0.899 with uniformly random picks (what dummy weights give).
DEFAULT = Structure(slash_local=0.0107, slash_cluster=30, slash_gap=5, slash_alpha=0.85, vertical_recent=0.969,
                    vertical_run=1, vertical_alpha=1.2, source="benchmarks/results/structure_smollm2_8k_cpu.json")
