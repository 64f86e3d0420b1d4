"""Which sparse pattern each attention head runs during prefill, and when sparse prefill is used at all.

Own format ``sgl-minference/v1`` (a JSON object; every key but ``format`` is optional)::

    {
      "format": "sgl-minference/v1",
      "min_context": 32768,      # a request whose context (cached prefix + new tokens) is shorter runs dense
      "min_chunk": 64,           # an extend chunk with fewer new tokens runs dense, even against a long prefix
      "last_q": 64,              # queries (the chunk's last ones) used to estimate dynamic indices, 1..64
      "forced_sink": 30,         # key columns vertical-slash always keeps (the first tokens)
      "forced_local": 100,       # diagonals vertical-slash always keeps (the local band)
      "block_size": 64,          # query rows / keys per block; only 64
      "dense_backend": "auto",   # fa3 on Hopper when FA3 is installed, else flashinfer; or "flashinfer", "fa3", "triton"
      "dense_routing": true,     # a layer predicted to cost more sparse than dense runs dense (see "Choosing the dense side")
      "num_layers": 32, "num_heads": 32,   # the model shape the table was made for (optional)
      "default": {"type": "vertical_slash", "vertical": 1000, "slash": 6096},   # every head not listed
      "heads": {"0": {"5": {"type": "a_shape", "sink": 128, "local": 4096}}}    # layer -> query head -> spec
    }

Head specs (budgets are strict positive integers up to ``MAX_BUDGET`` = 2**29; a budget larger than the context
is clamped to the context at run time):
``{"type": "dense"}``; ``{"type": "a_shape", "sink": S, "local": L}`` (the first S keys plus the last L
keys before each query); ``{"type": "vertical_slash", "vertical": V, "slash": D}`` (top-V key columns plus
top-D diagonals, estimated per input); ``{"type": "block_sparse", "topk": K}`` (top-K 64x64 key blocks per
64-row query block); the adaptive ``{"type": "xattention", "threshold": T, "stride": S}`` and
``{"type": "flexprefill", "gamma": G, "tau": U, "min_budget": N}`` (budgets chosen per input; mass shares in
(0, 1], see ``sgl_minference.registry``). Heads use global query-head numbers, before tensor-parallel slicing.

Also read as published (:func:`load` detects the format):

* MInference: a JSON list, one object per layer, mapping head index (string) to
  ``[type, vertical, slash, score]``: ``vertical_and_slash`` -> ``vertical_slash(vertical, slash)``,
  ``stream_llm`` -> ``a_shape(sink=vertical, local=slash)``, ``block_sparse`` -> ``block_sparse(topk=100)``.
  MInference's runtime ignores both numbers of a ``block_sparse`` entry and always keeps 100 blocks (its
  search writes a block *ratio* there, not a count), so we keep 100 too. ``score`` is ignored. Such a
  table is complete: every layer lists heads ``0..H-1``, which fixes ``num_layers`` and ``num_heads``.
* Qwen2.5-1M: a standalone ``sparse_attention_config.json`` (the same list), or a model ``config.json``
  whose ``dual_chunk_attention_config`` holds ``sparse_attention_config`` (the same list, or an object keyed
  by layer index) and optionally ``sparse_attention_threshold`` (-> ``min_context``) and
  ``sparse_attention_last_q`` (-> ``last_q``).

At startup the backend calls :func:`resolve`; highest precedence first: the ``minference`` object of
``--json-model-override-args '{"minference": {...}}'`` (inline fields, or ``"config_path"`` naming a file of
any format plus inline global fields), the file named by ``$SGL_MINFERENCE_CONFIG``,
``sparse_attention_config.json`` in the model directory, ``dual_chunk_attention_config`` in the model's
config, the defaults (the model config's ``sparse_attention_threshold`` / ``_last_q`` apply to the last three).
Every bad input raises :class:`ConfigError` naming the file, layer, head and field; the input values it repeats
are cut to ``ECHO_LIMIT`` characters, and at most ``MAX_ERROR_LINES`` problems are listed.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from .registry import (MAX_BUDGET, PATTERNS, AShapeSpec, BlockSparseSpec, Budget, Count, DenseSpec, FlexPrefillSpec,  # noqa: F401
                       HeadSpec, VerticalSlashSpec, XAttentionSpec, from_minference)

FORMAT = "sgl-minference/v1"
ENV_VAR = "SGL_MINFERENCE_CONFIG"
QWEN_TABLE_FILE = "sparse_attention_config.json"

ECHO_LIMIT = 80  # characters of an input value an error message repeats (a bad file may hold a 50 MB string)
MAX_ERROR_LINES = 20  # problems listed in one ConfigError; the rest are counted

_REPR = reprlib.Repr()  # bounded repr of nested input (cuts long lists, dicts and strings inside them)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxstring = 3, 4, 4, 4, ECHO_LIMIT // 2
_REPR.maxlong = _REPR.maxother = ECHO_LIMIT


def _cut(text: str) -> str:
    """``text`` itself if short, else its first ``ECHO_LIMIT`` characters, an ellipsis and its length."""
    return text if len(text) <= ECHO_LIMIT else f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


def _show(value: Any) -> str:
    """``repr(value)`` for an error message, at most about ``ECHO_LIMIT`` characters."""
    if isinstance(value, str):
        return repr(value) if len(value) <= ECHO_LIMIT else f"{value[:ECHO_LIMIT]!r}... ({len(value)} characters)"
    try:
        return _cut(_REPR.repr(value))
    except ValueError:  # an int with more digits than Python converts to text
        return f"<an integer of {value.bit_length()} bits>"


LastQ = Annotated[int, Field(strict=True, ge=1, le=64)]


class ConfigError(ValueError):
    """An unusable configuration; the message names the source file, layer, head and field where they apply."""


class Estimation(BaseModel):
    """How the online estimation of dynamic patterns reads a chunk: the one home of these settings (the
    config's ``last_q`` / ``forced_sink`` / ``forced_local``, see :attr:`MInferenceConfig.estimation`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    last_q: LastQ = 64  # the chunk's last queries that estimate dynamic indices
    forced_sink: Count = 30  # vertical-slash always keeps key columns 0 .. forced_sink-1
    forced_local: Count = 100  # ... and diagonals 0 .. forced_local-1 (offsets p - j)


DEFAULT_ESTIMATION = Estimation()


def _loc(layer=None, head=None, field: str | None = None) -> str:
    """``layer L, head H, field 'F'``, leaving out the parts that are None (each part cut to ``ECHO_LIMIT``)."""
    parts = [f"layer {_cut(str(layer))}" if layer is not None else "",
             f"head {_cut(str(head))}" if head is not None else ""]
    parts.append(f"field '{_cut(field)}'" if field else "")
    return ", ".join(p for p in parts if p)


def _where(source: str, layer=None, head=None, field: str | None = None) -> str:
    located = _loc(layer, head, field)
    return f"{source}: {located}" if located else source


def _index(key: Any) -> int | None:
    """A layer/head index from a JSON object key (a decimal string) or a Python int; None if it is neither."""
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


class MInferenceConfig(BaseModel):
    """Model-level sparse prefill settings plus the per-(layer, query head) pattern table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: Literal[64] = 64
    last_q: LastQ = DEFAULT_ESTIMATION.last_q
    min_context: Count = 32768
    # Chunks this short (a multi-turn follow-up, a radix-cache hit leaving a few tokens) gain nothing from
    # sparsity but would pay the estimation cost, so they run dense whatever the prefix length.
    min_chunk: Annotated[int, Field(strict=True, ge=1)] = 64
    forced_sink: Count = DEFAULT_ESTIMATION.forced_sink  # see Estimation
    forced_local: Count = DEFAULT_ESTIMATION.forced_local
    # "auto" follows SGLang's own default for dense MHA: fa3 on Hopper (when FA3 is installed), else flashinfer.
    # Measured on the H100 (2026-11-24, Llama-3-8B dummy, TTFT): flashinfer dense is 0.89-0.95x of fa3 at
    # 8K-32K, so with it the length gate could not make short prompts free (BENCHMARKS.md).
    dense_backend: Literal["auto", "flashinfer", "fa3", "triton"] = "auto"
    # Per layer and batch, run the dense backend instead when the sparse path is predicted to cost more, from the
    # keys its layouts kept in earlier batches (backend/routing.py); false: every sparse-eligible layer runs the
    # sparse kernel (tests of the kernel path, benchmarks of the kernel alone).
    dense_routing: bool = True
    default: HeadSpec = VerticalSlashSpec(vertical=1000, slash=6096)
    num_layers: Budget | None = None
    num_heads: Budget | None = None
    heads: dict[int, dict[int, HeadSpec]] = {}
    _source: str = PrivateAttr(default="<inline config>")  # named in error messages

    @field_validator("block_size", mode="before")
    @classmethod
    def _block_size_is_int(cls, value: Any) -> Any:
        # Literal alone would accept 64.0.
        if type(value) is not int:
            raise ValueError(f"expected the integer 64, got {_show(value)}")
        return value

    @field_validator("heads", mode="before")
    @classmethod
    def _int_keys(cls, heads: Any) -> Any:
        # JSON object keys are strings; accept decimal strings and ints, nothing else.
        if not isinstance(heads, Mapping):
            return heads
        out = {}
        for layer_key, per_head in heads.items():
            layer = _index(layer_key)
            if layer is None:
                raise ValueError(f"layer {_show(layer_key)}: not a non-negative integer index")
            if isinstance(per_head, Mapping):
                bad = [k for k in per_head if _index(k) is None]
                if bad:
                    raise ValueError(f"layer {layer}, head {_show(bad[0])}: not a non-negative integer index")
                per_head = {_index(k): spec for k, spec in per_head.items()}
            out[layer] = per_head
        return out

    @model_validator(mode="after")
    def _table_within_shape(self) -> MInferenceConfig:
        for layer, per_head in self.heads.items():
            if self.num_layers is not None and layer >= self.num_layers:
                where = _loc(layer, min(per_head, default=None), "heads")
                raise ValueError(f"{where}: out of range for num_layers={self.num_layers}")
            for head in per_head:
                if self.num_heads is not None and head >= self.num_heads:
                    raise ValueError(f"{_loc(layer, head, 'heads')}: out of range for num_heads={self.num_heads}")
        return self

    def __eq__(self, other: object) -> bool:
        # Equal content is equal config, wherever it was read from (pydantic would compare _source too).
        return isinstance(other, MInferenceConfig) and self.model_dump() == other.model_dump()

    @property
    def estimation(self) -> Estimation:
        """The estimation settings of this config, as one frozen object."""
        return Estimation(last_q=self.last_q, forced_sink=self.forced_sink, forced_local=self.forced_local)

    @property
    def source(self) -> str:
        """Where this config was read from, as named in error messages."""
        return self._source

    def head_spec(self, layer: int, head: int) -> HeadSpec:
        """The spec of one (layer, global query head); ``default`` where the table has none."""
        return self.heads.get(layer, {}).get(head, self.default)

    def layer_specs(self, layer: int, head_start: int, head_count: int) -> list[HeadSpec]:
        """Specs of query heads ``head_start .. head_start + head_count - 1`` of ``layer`` (one TP rank's slice:
        ``head_start = tp_rank * tp_q_head_num``, ``head_count = tp_q_head_num``)."""
        end = head_start + head_count
        if head_start < 0 or head_count < 1 or (self.num_heads is not None and end > self.num_heads):
            raise ConfigError(
                f"{_where(self._source, layer, head_start, 'num_heads')}: "
                f"head slice [{head_start}, {end}) is outside the table's {self.num_heads} heads"
            )
        if layer < 0 or (self.num_layers is not None and layer >= self.num_layers):
            raise ConfigError(f"{_where(self._source, layer, None, 'num_layers')}: outside {self.num_layers} layers")
        return [self.head_spec(layer, h) for h in range(head_start, end)]

    def validate_for_model(self, num_layers: int, num_heads: int) -> None:
        """Check the table against the model (``num_heads``: all query heads, before TP); raises ``ConfigError``."""

        def fail(layer, head, field, msg):
            raise ConfigError(f"{_where(self._source, layer, head, field)}: {msg}")

        shape = f"the model has {num_layers} layers x {num_heads} query heads"
        if self.num_layers is not None and self.num_layers < num_layers:
            fail(self.num_layers, None, "num_layers", f"missing: the table has {self.num_layers} layers, {shape}")
        if self.num_heads is not None and self.num_heads < num_heads:
            fail(0, self.num_heads, "num_heads", f"missing: the table has {self.num_heads} heads per layer, {shape}")
        if self.num_layers is not None and self.num_layers > num_layers:
            fail(num_layers, None, "num_layers", f"out of range: the table has {self.num_layers} layers, {shape}")
        if self.num_heads is not None and self.num_heads > num_heads:
            fail(0, num_heads, "num_heads", f"out of range: the table has {self.num_heads} heads per layer, {shape}")
        for layer, per_head in sorted(self.heads.items()):
            if layer >= num_layers:
                fail(layer, min(per_head, default=None), "heads", f"layer out of range: {shape}")
            for head in sorted(per_head):
                if head >= num_heads:
                    fail(layer, head, "heads", f"head out of range: {shape}")

    def save(self, path: str | os.PathLike) -> None:
        """Write this config in the ``sgl-minference/v1`` format."""
        data = {"format": FORMAT, **self.model_dump(mode="json")}
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> MInferenceConfig:
        """Read any supported format (own, MInference list, Qwen ``config.json`` / ``sparse_attention_config.json``)."""
        source = str(path)
        try:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):  # a FIFO or device would block the read, a directory cannot be parsed
                raise ConfigError(f"{source}: not a regular file")
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read ({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8-sig")  # a leading byte-order mark, as some editors write, is allowed
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{source}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); config files are UTF-8 JSON"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        except ValueError as e:  # e.g. an integer literal longer than Python's int conversion limit
            raise ConfigError(f"{source}: not usable JSON ({_cut(str(e))})") from None
        if isinstance(data, list):
            return _from_table(data, source)
        if isinstance(data, dict) and "format" in data:
            if data["format"] != FORMAT:
                raise ConfigError(f"{_where(source, field='format')}: {_show(data['format'])} is not {FORMAT!r}")
            return _build({k: v for k, v in data.items() if k != "format"}, source)
        if isinstance(data, dict) and "dual_chunk_attention_config" in data:
            return _from_dca(data["dual_chunk_attention_config"], f"{source}:dual_chunk_attention_config")
        found = f"keys {_show(sorted(data)[:8])}" if isinstance(data, dict) else type(data).__name__
        raise ConfigError(
            f"{source}: unknown format ({found}): expected an object with \"format\": \"{FORMAT}\", a MInference "
            "list of layers, or a model config.json with dual_chunk_attention_config"
        )

    @classmethod
    def from_overrides(
        cls, d: Mapping, *, base: MInferenceConfig | None = None, source: str = "minference override"
    ) -> MInferenceConfig:
        """Build from the ``minference`` object of ``--json-model-override-args``.

        ``d`` holds inline fields of this class and/or ``"config_path"`` (a file of any format). Inline fields
        replace those of the file, else of ``base`` (the lower-precedence config), else the defaults.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        inline = dict(d)
        path = inline.pop("config_path", None)
        if path is not None:
            if not isinstance(path, str):
                raise ConfigError(f"{_where(source, field='config_path')}: expected a path string, got {_show(path)}")
            base = cls.load(path)
        if base is None:
            return _build(inline, source)
        return _build({**base.model_dump(), **inline}, f"{base.source} + {source}" if inline else base.source)


def _error_line(err: Mapping, source: str) -> str:
    """One pydantic error as ``source: layer L, head H, field 'F': message`` (echoed input cut by ``_show``)."""
    loc, layer, head, prefix = list(err["loc"]), None, None, []
    if loc[:1] == ["heads"] and len(loc) > 1:
        layer, head, loc = loc[1], (loc[2] if len(loc) > 2 else None), loc[3:]
    elif loc[:1] == ["default"]:
        prefix, loc = ["default"], loc[1:]
    if head is not None or prefix:
        if loc and loc[0] in PATTERNS:  # the discriminated union puts the tag into the location
            loc = loc[1:]
        if err["type"].startswith("union_tag"):
            loc.append("type")
    field = ".".join(str(p) for p in prefix + loc) or ("heads" if layer is not None else None)
    if err["type"] == "value_error":
        msg = str(err["ctx"]["error"])
    elif err["type"] == "union_tag_invalid":  # pydantic's message repeats the tag in full
        msg = f"unknown pattern type {_show(err['ctx']['tag'])} (expected {err['ctx']['expected_tags']})"
    else:
        msg = err["msg"]
        if isinstance(err.get("input"), (int, float, str, type(None))):
            msg += f" (got {_show(err['input'])})"
    return f"{_where(source, layer, head, field)}: {msg}"


def _error_text(errors: list, source: str) -> str:
    """The first ``MAX_ERROR_LINES`` pydantic errors, one line each, and how many more there were."""
    lines = [_error_line(err, source) for err in errors[:MAX_ERROR_LINES]]
    if len(errors) > MAX_ERROR_LINES:
        lines.append(f"{source}: ... and {len(errors) - MAX_ERROR_LINES} more problems")
    return "\n".join(lines)


def _build(data: Mapping, source: str) -> MInferenceConfig:
    try:
        cfg = MInferenceConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_error_text(e.errors(), source)) from None
    cfg._source = source
    return cfg


def _minference_spec(entry: Any, where: str) -> dict:
    """One MInference/Qwen ``[type, vertical, slash, score]`` entry as a spec dict (validated later)."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        raise ConfigError(f"{where}: expected [type, vertical, slash, score], got {_show(entry)}")
    kind, vertical, slash, _score = entry
    try:
        return from_minference(kind, vertical, slash)
    except ValueError as e:
        raise ConfigError(f"{where}, field 'type': {e}") from None


def _from_table(table: Any, source: str) -> MInferenceConfig:
    """A complete MInference/Qwen table: a list of layers (or an object keyed by layer index)."""
    if isinstance(table, Mapping):
        by_index = {_index(k): v for k, v in table.items()}
        if None in by_index:
            bad = next(k for k in table if _index(k) is None)
            raise ConfigError(f"{_where(source, layer=_show(bad))}: not a non-negative integer layer index")
        missing = [i for i in range(len(by_index)) if i not in by_index]
        if missing:
            have = sorted(by_index)
            raise ConfigError(f"{_where(source, layer=missing[0])}: missing (table has layers {have}; list 0..N-1)")
        table = [by_index[i] for i in range(len(by_index))]
    if not isinstance(table, list) or not table:
        raise ConfigError(f"{source}: expected a non-empty list of layers, got {_show(table)}")
    heads: dict[int, dict[int, dict]] = {}
    for layer, per_head in enumerate(table):
        if not isinstance(per_head, Mapping):
            raise ConfigError(f"{_where(source, layer)}: expected an object mapping head index -> entry")
        specs = {}
        for key, entry in per_head.items():
            head = _index(key)
            if head is None:
                raise ConfigError(f"{_where(source, layer, _show(key))}: not a non-negative integer head index")
            specs[head] = _minference_spec(entry, _where(source, layer, head))
        expected = len(heads[0]) if heads else len(specs)
        for head in range(max(expected, len(specs))):
            if head not in specs:
                raise ConfigError(
                    f"{_where(source, layer, head, 'num_heads')}: missing (layer 0 has {expected} heads; "
                    "every layer must list heads 0..H-1)"
                )
            if head >= expected:
                raise ConfigError(
                    f"{_where(source, layer, head, 'num_heads')}: layer {layer} has {len(specs)} heads, "
                    f"layer 0 has {expected}"
                )
        heads[layer] = specs
    return _build({"num_layers": len(table), "num_heads": len(heads[0]), "heads": heads}, source)


# Qwen's dual_chunk_attention_config fields -> ours.
_QWEN_GLOBALS = {"sparse_attention_threshold": "min_context", "sparse_attention_last_q": "last_q"}


def _qwen_globals(dca: Mapping, source: str) -> dict:
    """Global settings a Qwen ``dual_chunk_attention_config`` supplies, as fields of MInferenceConfig.

    Checked here, so that an error names the Qwen field and ``source`` (where ``dca`` came from), not ours and
    the file the table came from.
    """
    values = {ours: dca[theirs] for theirs, ours in _QWEN_GLOBALS.items() if theirs in dca}
    try:
        MInferenceConfig.model_validate(values)
    except ValidationError as e:
        theirs = {ours: name for name, ours in _QWEN_GLOBALS.items()}
        errors = [{**err, "loc": (theirs[err["loc"][0]], *err["loc"][1:])} for err in e.errors()]
        raise ConfigError(_error_text(errors, source)) from None
    return values


def _from_dca(dca: Any, source: str) -> MInferenceConfig:
    if not isinstance(dca, Mapping):
        raise ConfigError(f"{source}: expected an object, got {type(dca).__name__}")
    table = dca.get("sparse_attention_config")
    if not table:
        raise ConfigError(f"{_where(source, field='sparse_attention_config')}: missing or empty")
    qwen = _qwen_globals(dca, source)
    cfg = _from_table(table, f"{source}.sparse_attention_config")
    return _build({**cfg.model_dump(), **qwen}, cfg.source)


def _get(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]``: SGLang hands over a transformers config, tests may pass a dict."""
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def resolve(hf_config: Any, model_path: str | None, env: Mapping[str, str] = os.environ) -> MInferenceConfig:
    """The config the SGLang backend runs with (precedence in the module docstring).

    ``hf_config``: the model's transformers config (or a dict); ``model_path``: the model directory (a hub
    id is not a directory and is skipped: nothing is downloaded here); ``env``: the environment.
    """
    overrides = _get(hf_config, "minference")
    source = "--json-model-override-args minference"
    if overrides is not None and isinstance(overrides, Mapping) and "config_path" in overrides:
        return MInferenceConfig.from_overrides(overrides, source=source)
    base = _lower_precedence(hf_config, model_path, env)
    if overrides is None:
        return base
    return MInferenceConfig.from_overrides(overrides, base=base, source=source)


def _lower_precedence(hf_config: Any, model_path: str | None, env: Mapping[str, str]) -> MInferenceConfig:
    if env.get(ENV_VAR):
        path = env[ENV_VAR]
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such file (named by ${ENV_VAR})")
        return MInferenceConfig.load(path)
    dca = _get(hf_config, "dual_chunk_attention_config") or {}
    if not isinstance(dca, Mapping):
        raise ConfigError(f"hf_config.dual_chunk_attention_config: expected an object, got {type(dca).__name__}")
    model_dir = model_path if model_path and os.path.isdir(model_path) else None
    dca_source = f"{os.path.join(model_dir, 'config.json') if model_dir else 'hf_config'}:dual_chunk_attention_config"
    qwen = _qwen_globals(dca, dca_source)
    table_file = os.path.join(model_dir, QWEN_TABLE_FILE) if model_dir else None
    if table_file and os.path.isfile(table_file):
        cfg = MInferenceConfig.load(table_file)
    elif dca.get("sparse_attention_config"):
        cfg = _from_table(dca["sparse_attention_config"], dca_source)
    else:
        cfg = MInferenceConfig()
    return _build({**cfg.model_dump(), **qwen}, cfg.source) if qwen else cfg
