"""Every head pattern type in one place, like MInference's per-head dispatch dict, written once.

``PATTERNS`` maps each ``"type"`` of a head spec to a :class:`PatternType`: the config's spec class, the spec
fields that become per-head budgets of the online builder (:class:`~sgl_minference.patterns.HeadSet`), the
fields a head group must share, the online builder, the offline realisation the search scores, the search's
candidates and per-head fit, the nominal cost, the scaling rule, and the name in MInference's published lists.
The planner, the search, the eval and the benchmarks look patterns up here and nowhere else.

Why this module has no torch: ``config`` imports the spec classes and their union from here, and ``config``
must load without torch (the plugin checks a config file in SGLang's launcher process, and CPU tools read
configs). So the torch side of an entry (builder, realisation, fit) is a :class:`Ref`, ``"module:function"``,
imported on first call; cost, scaling and candidates are plain arithmetic on the spec and live here.

Adding a pattern type: a module ``sgl_minference/patterns/<name>.py`` with its builder, realisation and
(optionally) fit in the signatures below, its spec class here, and one ``PatternType`` line in ``PATTERNS``::

    build(q, kv, geom, heads, *, sm_scale, est) -> SparseLayout          # online, per layer, no host sync
    realise(spec, q, k, *, sm_scale, est, softcap) -> patterns.selection.Selection   # one head, [n, D] q/k
    fit(spec, q, k, budget, *, sm_scale, est, softcap, row_block, skip_rows) -> spec   # to `budget` keys/row

``est`` is the config's :class:`~sgl_minference.config.Estimation` (last_q, forced sink / local). The four
original builders keep their own signatures (kernel tests and the kernel benchmark call them directly);
``patterns/uniform.py`` adapts them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

BLOCK = 64  # query rows / keys per block: sgl_minference.layout.BLOCK (that module needs torch)
# Key positions, budgets and the kernels' position arithmetic are int32, with SENTINEL = 2**29 (layout.py; the
# same number, not imported: that module needs torch) as the "no entry" mark right of every position and
# r0 + SENTINEL within int32. So no context reaches 2**29 keys, a larger budget could never be used, and a budget
# up to 2**29 leaves int32 headroom for position + budget sums. Checked when the config is read: a larger value
# would overflow the int32 budget tensors built at start-up, after the weights load.
MAX_BUDGET = 1 << 29


def _within_max_budget(value: int) -> int:
    if value > MAX_BUDGET:
        shown = str(value) if value.bit_length() <= 64 else f"<an integer of {value.bit_length()} bits>"
        raise ValueError(
            f"{shown} is above the largest budget {MAX_BUDGET} (2**29: key positions are int32 with 2**29 "
            "marking unused entries, so no context is longer; a budget above the context is clamped to it at run time)"
        )
    return value


Budget = Annotated[int, Field(strict=True, gt=0), AfterValidator(_within_max_budget)]
Count = Annotated[int, Field(strict=True, ge=0)]
Share = Annotated[float, Field(strict=True, gt=0.0, le=1.0)]  # a share of attention mass
MINFERENCE_BLOCK_SPARSE_TOPK = 100  # the block count MInference's block_sparse kernel is always called with


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DenseSpec(_Spec):
    """Full causal attention."""

    type: Literal["dense"] = "dense"


class AShapeSpec(_Spec):
    """Static A-shape: keys ``j < sink`` plus the ``local`` keys ``p - local < j <= p`` of the query at ``p``."""

    type: Literal["a_shape"] = "a_shape"
    sink: Budget
    local: Budget


class VerticalSlashSpec(_Spec):
    """Dynamic vertical-slash: top-``vertical`` key columns plus top-``slash`` diagonals, per input."""

    type: Literal["vertical_slash"] = "vertical_slash"
    vertical: Budget
    slash: Budget


class BlockSparseSpec(_Spec):
    """Dynamic block-sparse: top-``topk`` 64x64 key blocks per 64-row query block (diagonal block kept)."""

    type: Literal["block_sparse"] = "block_sparse"
    topk: Budget


XATTENTION_STRIDES = (4, 8, 16)  # antidiagonal strides (divisors of 64); the published method uses 8 and 16


class XAttentionSpec(_Spec):
    """Adaptive block-sparse (XAttention): per 64-row query block, the key blocks with the largest antidiagonal
    scores (every ``stride``-th antidiagonal of the block) until their share of the block row's estimated mass
    reaches ``threshold``; the first key block (the sink) and the diagonal block(s) always kept."""

    type: Literal["xattention"] = "xattention"
    threshold: Share
    stride: int

    @field_validator("stride", mode="before")
    @classmethod
    def _stride(cls, value: Any) -> Any:
        if type(value) is not int or value not in XATTENTION_STRIDES:
            raise ValueError(f"expected one of {', '.join(map(str, XATTENTION_STRIDES))}, got {value!r}")
        return value


class FlexPrefillSpec(_Spec):
    """Adaptive per head and input (FlexPrefill): the Jensen-Shannon distance between the block-pooled estimate
    and the true attention of the chunk's last queries picks, below ``tau``, a query-specific block pattern
    (per query block, the key blocks holding a ``gamma`` share of the pooled estimate), else vertical-slash
    (the key columns and diagonals holding a ``gamma`` share of the last queries' attention); never fewer than
    ``min_budget`` keys per row."""

    type: Literal["flexprefill"] = "flexprefill"
    gamma: Share
    tau: Annotated[float, Field(strict=True, ge=0.0)]
    min_budget: Budget


HeadSpec = Annotated[
    Union[DenseSpec, AShapeSpec, VerticalSlashSpec, BlockSparseSpec, XAttentionSpec, FlexPrefillSpec],
    Field(discriminator="type"),
]


@dataclass(frozen=True)
class Ref:
    """A function named ``"package.module:function"``, imported on its first call (an entry's torch side)."""

    path: str

    def resolve(self) -> Callable:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)


def _same(spec, factor: float):
    return spec


def _times(*fields: str) -> Callable:
    """Scaling rule: each of ``fields`` times the factor, at least 1."""

    def scale(spec, factor: float):
        return spec.model_copy(update={f: max(1, round(getattr(spec, f) * factor)) for f in fields})

    return scale


def _left_out_divided(*shares: str, counts: tuple[str, ...] = ()) -> Callable:
    """Scaling rule of the adaptive patterns: the attention mass a share leaves out (``1 - share``) is divided by
    the factor, so a factor above 1 keeps more, as budgets times it would; a factor below 1 leaves out at most
    0.99 (or what the share already left out, if more: a share never moves against the factor). ``counts`` scale
    like budgets."""

    def scale(spec, factor: float):
        update = {s: 1.0 - min((1.0 - getattr(spec, s)) / factor, max(1.0 - getattr(spec, s), 0.99))
                  for s in shares}
        update |= {c: max(1, round(getattr(spec, c) * factor)) for c in counts}
        return spec.model_copy(update=update)

    return scale


def _tiles(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# -- the search's candidates for a budget of B keys per row (see tools/search/candidates.py for the cost model) --
VERTICAL_SHARES = (0.03, 0.12, 0.4, 0.95)  # share of the budget spent on key columns, one candidate each
SINK = BLOCK  # A-shape sink columns: one key tile


def _a_shape_candidates(budget: int, est) -> list:
    return [AShapeSpec(sink=SINK, local=budget - SINK - BLOCK + 1)]


def _vertical_slash_candidates(budget: int, est) -> list:
    """Splits from slash-heavy to vertical-heavy (like the reference search's 30/800 .. 3500/100), never below
    the forced columns / diagonals the online estimation always keeps."""
    most_vertical = (budget - est.forced_local - BLOCK + 1) // BLOCK * BLOCK  # leaves the forced diagonals keys
    out = []
    for share in VERTICAL_SHARES:
        vertical = max(est.forced_sink, 1, min(round(share * budget), most_vertical))
        slash = max(est.forced_local, 1, budget - _tiles(vertical) - BLOCK + 1)
        out.append(VerticalSlashSpec(vertical=vertical, slash=slash))
    return out


def _block_sparse_candidates(budget: int, est) -> list:
    return [BlockSparseSpec(topk=max(1, round(budget / BLOCK)))]


def _xattention_candidates(budget: int, est) -> list:
    """The published setting; the search then fits the threshold to the budget per head."""
    return [XAttentionSpec(threshold=0.9, stride=8)]


def _flexprefill_candidates(budget: int, est) -> list:
    """The published gamma / tau, a floor of a quarter of the budget (whole tiles); gamma is then fitted."""
    return [FlexPrefillSpec(gamma=0.9, tau=0.1, min_budget=max(BLOCK, budget // 4 // BLOCK * BLOCK))]


@dataclass(frozen=True, kw_only=True)
class PatternType:
    """Everything the code base knows about one head pattern type."""

    spec: type[_Spec]  # the config class; its ``type`` literal is the pattern's name
    build: Ref  # online layout builder (uniform signature, module docstring)
    realise: Ref  # offline realisation for the search's recall
    cost: Callable[[Any], int]  # nominal keys per query row the kernel visits; -1 = unbounded / input-dependent
    budgets: tuple[str, ...] = ()  # spec fields handed to the builder per head (HeadSet budgets, on the device)
    group_by: tuple[str, ...] = ()  # spec fields every head of one builder call shares (host constants)
    scale: Callable[[Any, float], Any] = _same  # the spec with its budgets times a factor
    candidates: Callable[[int, Any], list] | None = None  # search candidates for a budget of keys per row
    fit: Ref | None = None  # per-head fit of a candidate to the budget on the calibration sequence
    minference: str | None = None  # name in MInference's [type, vertical, slash, score] lists
    from_minference: Callable[[Any, Any], dict] | None = None  # (vertical, slash) of such an entry -> spec dict

    @property
    def name(self) -> str:
        return self.spec.model_fields["type"].default


_UNIFORM = "sgl_minference.patterns.uniform"
_SELECTION = "sgl_minference.patterns.selection"

PATTERNS: dict[str, PatternType] = {p.name: p for p in (
    PatternType(spec=DenseSpec, build=Ref(f"{_UNIFORM}:dense"), realise=Ref(f"{_SELECTION}:realise_dense"),
                cost=lambda s: -1),
    PatternType(spec=AShapeSpec, budgets=("sink", "local"), build=Ref(f"{_UNIFORM}:a_shape"),
                realise=Ref(f"{_SELECTION}:realise_a_shape"), cost=lambda s: _tiles(s.sink) + s.local + BLOCK - 1,
                scale=_times("sink", "local"), candidates=_a_shape_candidates, minference="stream_llm",
                from_minference=lambda v, s: {"type": "a_shape", "sink": v, "local": s}),
    PatternType(spec=VerticalSlashSpec, budgets=("vertical", "slash"), build=Ref(f"{_UNIFORM}:vertical_slash"),
                realise=Ref(f"{_SELECTION}:realise_vertical_slash"),
                cost=lambda s: _tiles(s.vertical) + s.slash + BLOCK - 1, scale=_times("vertical", "slash"),
                candidates=_vertical_slash_candidates, fit=Ref(f"{_SELECTION}:fit_slash"),
                minference="vertical_and_slash",
                from_minference=lambda v, s: {"type": "vertical_slash", "vertical": v, "slash": s}),
    PatternType(spec=BlockSparseSpec, budgets=("topk",), build=Ref(f"{_UNIFORM}:block_sparse"),
                realise=Ref(f"{_SELECTION}:realise_block_sparse"), cost=lambda s: BLOCK * s.topk,
                scale=_times("topk"), candidates=_block_sparse_candidates, minference="block_sparse",
                # MInference's runtime ignores both numbers and always keeps 100 blocks (its search writes a
                # block *ratio* there, not a count), so we keep 100 too.
                from_minference=lambda v, s: {"type": "block_sparse", "topk": MINFERENCE_BLOCK_SPARSE_TOPK}),
    PatternType(spec=XAttentionSpec, budgets=("threshold", "stride"), group_by=("stride",),
                build=Ref("sgl_minference.patterns.xattention:build_xattention"),
                realise=Ref("sgl_minference.patterns.xattention:realise_xattention"), cost=lambda s: -1,
                scale=_left_out_divided("threshold"), candidates=_xattention_candidates,
                fit=Ref("sgl_minference.patterns.xattention:fit_xattention")),
    PatternType(spec=FlexPrefillSpec, budgets=("gamma", "tau", "min_budget"),
                build=Ref("sgl_minference.patterns.flexprefill:build_flexprefill"),
                realise=Ref("sgl_minference.patterns.flexprefill:realise_flexprefill"), cost=lambda s: -1,
                scale=_left_out_divided("gamma", counts=("min_budget",)), candidates=_flexprefill_candidates,
                fit=Ref("sgl_minference.patterns.flexprefill:fit_flexprefill")),
)}
MINFERENCE_NAMES: dict[str, PatternType] = {p.minference: p for p in PATTERNS.values() if p.minference}


def pattern_of(spec) -> PatternType:
    """The registry entry of a head spec (any of the spec classes above)."""
    entry = PATTERNS.get(getattr(spec, "type", None))
    if entry is None or not isinstance(spec, entry.spec):
        raise ValueError(f"spec: unsupported head spec {spec!r}")
    return entry


def group_key(spec) -> tuple:
    """Heads with equal keys share one builder call: the type plus its ``group_by`` fields."""
    entry = pattern_of(spec)
    return (entry.name, *(getattr(spec, f) for f in entry.group_by))


def head_budgets(specs: Sequence) -> dict[str, list]:
    """The per-head budget lists of heads with one group key, as ``HeadSet.build`` takes them."""
    entry = pattern_of(specs[0])
    return {name: [getattr(s, name) for s in specs] for name in entry.budgets}


def nominal_cost(spec) -> int:
    """Keys per query row the kernel visits for ``spec`` (-1: unbounded or input-dependent)."""
    return pattern_of(spec).cost(spec)


def scaled(spec, factor: float):
    """``spec`` with its budgets times ``factor`` (adaptive shares: see :func:`_left_out_divided`); factor 1 returns
    ``spec`` itself (``1 - (1 - share)`` is not ``share`` in floating point)."""
    return spec if factor == 1 else pattern_of(spec).scale(spec, factor)


def search_candidates(budget: int, est, types: Sequence[str]) -> list:
    """Candidates of the pattern types ``types`` (in registry order) for ``budget`` keys per row, no duplicates."""
    unknown = [t for t in types if t not in PATTERNS or PATTERNS[t].candidates is None]
    if unknown:
        searchable = [n for n, p in PATTERNS.items() if p.candidates is not None]
        raise ValueError(f"types: {unknown} not searchable (expected some of {searchable})")
    out = []
    for name, entry in PATTERNS.items():
        if name in types:
            out += [s for s in entry.candidates(budget, est) if s not in out]
    return out


def from_minference(kind: Any, vertical: Any, slash: Any) -> dict:
    """The spec dict of one MInference ``[kind, vertical, slash, score]`` entry (validated by the config later);
    raises ``ValueError`` for an unknown kind."""
    entry = MINFERENCE_NAMES.get(kind) if isinstance(kind, str) else None
    if entry is None:
        shown = repr(kind) if len(repr(kind)) <= 80 else f"{repr(kind)[:80]}... ({len(repr(kind))} characters)"
        raise ValueError(f"unknown pattern type {shown} (expected {', '.join(MINFERENCE_NAMES)})")
    return entry.from_minference(vertical, slash)
