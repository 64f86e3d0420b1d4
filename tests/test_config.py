"""The config layer: published formats read as-is, own-format round trip, errors, precedence, TP slicing."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from sgl_minference.config import (
    ECHO_LIMIT,
    ENV_VAR,
    MAX_BUDGET,
    MAX_ERROR_LINES,
    AShapeSpec,
    BlockSparseSpec,
    ConfigError,
    DenseSpec,
    MInferenceConfig,
    VerticalSlashSpec,
    resolve,
)
from sgl_minference.config import QWEN_TABLE_FILE

FIXTURES = Path(__file__).parent / "fixtures" / "config"
MINFERENCE = FIXTURES / "minference_2x4.json"
QWEN_CONFIG = FIXTURES / "qwen_config.json"
QWEN_MODEL = FIXTURES / "qwen_model"
OWN = FIXTURES / "sgl_v1_partial.json"
DEFAULT_JSON = Path(__file__).parents[1] / "sgl_minference" / "configs" / "default.json"
VS = VerticalSlashSpec


def _json(path):
    return json.loads(Path(path).read_text())


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---- published formats ----------------------------------------------------------------------------


def test_minference_list_loads_as_complete_table():
    cfg = MInferenceConfig.load(MINFERENCE)
    assert (cfg.num_layers, cfg.num_heads) == (2, 4)
    assert cfg.layer_specs(0, 0, 4) == [
        VS(vertical=1000, slash=6096),
        AShapeSpec(sink=64, local=512),  # stream_llm: [sink, local]
        VS(vertical=30, slash=800),
        BlockSparseSpec(topk=100),  # MInference's runtime always keeps 100 blocks; the file's 8 is a ratio
    ]
    assert cfg.head_spec(1, 2) == AShapeSpec(sink=128, local=1024)
    assert cfg.min_context == 32768  # MInference files carry no global settings


def test_qwen_config_json_loads_table_threshold_and_last_q():
    cfg = MInferenceConfig.load(QWEN_CONFIG)
    assert (cfg.num_layers, cfg.num_heads) == (2, 4)
    assert cfg.min_context == 8192 and cfg.last_q == 32
    assert cfg.head_spec(0, 0) == VS(vertical=9192, slash=14288)
    assert cfg.head_spec(1, 3) == VS(vertical=13388, slash=18384)


def test_qwen_standalone_table_loads():
    cfg = MInferenceConfig.load(QWEN_MODEL / "sparse_attention_config.json")
    assert (cfg.num_layers, cfg.num_heads) == (2, 4)
    assert cfg.head_spec(1, 3) == VS(vertical=9192, slash=14288)


def test_own_format_partial_table_falls_back_to_default():
    cfg = MInferenceConfig.load(OWN)
    assert cfg.min_context == 65536 and cfg.dense_backend == "fa3"
    assert cfg.head_spec(0, 1) == AShapeSpec(sink=128, local=4096)
    assert cfg.head_spec(1, 0) == BlockSparseSpec(topk=16)
    assert cfg.head_spec(1, 3) == DenseSpec()
    assert cfg.head_spec(0, 0) == VS(vertical=512, slash=2048)  # not listed: the file's default


def test_shipped_default_json_is_the_defaults():
    assert MInferenceConfig.load(DEFAULT_JSON) == MInferenceConfig()
    assert MInferenceConfig().default == VS(vertical=1000, slash=6096)


@pytest.mark.parametrize("path", [MINFERENCE, QWEN_CONFIG, QWEN_MODEL / "sparse_attention_config.json", OWN])
def test_save_load_round_trip(tmp_path, path):
    cfg = MInferenceConfig.load(path)
    out = tmp_path / "saved.json"
    cfg.save(out)
    assert _json(out)["format"] == "sgl-minference/v1"
    again = MInferenceConfig.load(out)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    assert again.source == str(out)


# ---- errors: every message names file, layer, head and field -------------------------------------


def _minference_with(layer, head, *entry):
    """The MInference fixture with one head's ``[type, vertical, slash, score]`` entry replaced."""
    data = _json(MINFERENCE)
    data[layer][str(head)] = list(entry)
    return data


def _own_with(**changes):
    """The own-format fixture with some top-level keys replaced."""
    data = _json(OWN)
    data.update(changes)
    return data


def _own_head(layer, head, **spec):
    return _own_with(heads={str(layer): {str(head): spec}})


VAS = "vertical_and_slash"
# name -> (file content, substrings the error message must contain besides the file name)
ERROR_CASES = {
    "mi unknown type": (_minference_with(1, 2, "diagonal", 10, 20, 0.5), ["layer 1", "head 2", "'type'", "diagonal"]),
    "mi zero vertical": (_minference_with(0, 3, VAS, 0, 800, 0.5), ["layer 0", "head 3", "'vertical'", "than 0"]),
    "mi negative slash": (_minference_with(1, 0, VAS, 100, -5, 0.5), ["layer 1", "head 0", "'slash'", "-5"]),
    "mi float budget": (_minference_with(0, 0, VAS, 12.5, 800, 0.5), ["layer 0", "head 0", "'vertical'", "12.5"]),
    "mi string budget": (_minference_with(0, 2, VAS, "100", 800, 0.5), ["layer 0", "head 2", "'vertical'", "'100'"]),
    "mi bool budget": (_minference_with(0, 2, VAS, True, 800, 0.5), ["layer 0", "head 2", "'vertical'"]),
    "mi zero sink": (_minference_with(1, 2, "stream_llm", 0, 1024, 0.5), ["layer 1", "head 2", "'sink'"]),
    "mi extra head": (_minference_with(1, 4, VAS, 1, 2, 0.5), ["layer 1", "head 4", "'num_heads'"]),
    "mi bad head key": (_minference_with(1, "x", VAS, 1, 2, 0.5), ["layer 1", "head 'x'"]),
    "own unknown top-level key": (_own_with(sparsity=0.5), ["'sparsity'", "not permitted"]),
    "own unknown spec type": (_own_head(1, 2, type="strided", topk=4), ["layer 1", "head 2", "'type'", "strided"]),
    "own zero budget": (_own_head(0, 3, type="a_shape", sink=4, local=0), ["layer 0", "head 3", "'local'"]),
    "own float budget": (_own_head(1, 1, type="block_sparse", topk=2.0), ["layer 1", "head 1", "'topk'", "2.0"]),
    "own extra spec field": (_own_head(0, 0, type="dense", topk=3), ["layer 0", "head 0", "'topk'"]),
    "own head out of shape": (_own_head(1, 4, type="dense"), ["layer 1", "head 4", "'heads'", "num_heads=4"]),
    "own layer out of shape": (_own_head(2, 0, type="dense"), ["layer 2", "head 0", "'heads'", "num_layers=2"]),
    "own bad default": (_own_with(default={"type": "vertical_slash", "vertical": 8, "slash": -1}), ["'default.slash'"]),
    "own string global": (_own_with(min_context="65536"), ["'min_context'", "'65536'"]),
    "own last_q too large": (_own_with(last_q=128), ["'last_q'", "64"]),
    "own wrong version": (_own_with(format="sgl-minference/v9"), ["'format'", "v9"]),
    # int32 overflow at start-up, after the weights load, unless refused here
    "mi vertical over int32": (_minference_with(0, 1, VAS, 2**31, 800, 0.5),
                               ["layer 0", "head 1", "'vertical'", "2147483648", "largest budget 536870912"]),
    "mi local over the cap": (_minference_with(1, 2, "stream_llm", 64, MAX_BUDGET + 1, 0.5),
                              ["layer 1", "head 2", "'local'", "largest budget"]),
    "own topk over the cap": (_own_head(1, 1, type="block_sparse", topk=2**40), ["layer 1", "head 1", "'topk'"]),
    "own default over the cap": (_own_with(default={"type": "vertical_slash", "vertical": 8, "slash": 2**31}),
                                 ["'default.slash'", "largest budget"]),
}


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_bad_files_raise_config_error_naming_location(tmp_path, name):
    data, needles = ERROR_CASES[name]
    path = _write(tmp_path, "bad_config.json", data)
    with pytest.raises(ConfigError) as info:
        MInferenceConfig.load(path)
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_missing_head_in_a_layer(tmp_path):
    data = _json(MINFERENCE)
    del data[1]["3"]
    path = _write(tmp_path, "short_layer.json", data)
    with pytest.raises(ConfigError, match=r"short_layer\.json: layer 1, head 3, field 'num_heads': missing"):
        MInferenceConfig.load(path)


def test_qwen_layer_keyed_table_with_missing_layer(tmp_path):
    data = _json(QWEN_CONFIG)
    table = data["dual_chunk_attention_config"]["sparse_attention_config"]
    data["dual_chunk_attention_config"]["sparse_attention_config"] = {"0": table[0], "2": table[1]}
    path = _write(tmp_path, "config.json", data)
    where = r"config\.json:dual_chunk_attention_config\.sparse_attention_config: layer 1: missing"
    with pytest.raises(ConfigError, match=where):
        MInferenceConfig.load(path)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("{not json", "not JSON"),
        ('{"min_context": 4096}', "unknown format"),
        ('"vertical_slash"', "unknown format"),
        ("[]", "non-empty list of layers"),
        ('[{"0": ["vertical_and_slash", 1, 2]}]', "expected [type, vertical, slash, score]"),
    ],
)
def test_unreadable_files(tmp_path, text, needle):
    path = _write(tmp_path, "odd.json", text)
    with pytest.raises(ConfigError) as info:
        MInferenceConfig.load(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_budgets_up_to_the_cap_are_accepted(tmp_path):
    from sgl_minference.layout import SENTINEL

    assert MAX_BUDGET == SENTINEL  # the cap is the kernels' "no entry" mark: no position reaches it
    data = _minference_with(0, 1, VAS, MAX_BUDGET, MAX_BUDGET, 0.5)
    assert MInferenceConfig.load(_write(tmp_path, "cap.json", data)).head_spec(0, 1) == VS(vertical=MAX_BUDGET,
                                                                                           slash=MAX_BUDGET)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"format": "sgl-minference/v1", "min_context": 1}  // caf\xe9'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.json: not UTF-8 text \(byte 0xe9 at offset 57\)"):
        MInferenceConfig.load(path)
    bom = tmp_path / "bom.json"  # a byte-order mark, as some editors write, is fine
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"format": "sgl-minference/v1", "min_context": 7}).encode())
    assert MInferenceConfig.load(bom).min_context == 7


def test_special_files_are_refused_without_reading(tmp_path):
    import os

    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)  # reading it would block start-up until something writes to it
    with pytest.raises(ConfigError, match=r"config\.fifo: not a regular file"):
        MInferenceConfig.load(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        MInferenceConfig.load(tmp_path)


def test_integer_beyond_pythons_conversion_limit(tmp_path):
    path = _write(tmp_path, "digits.json", '{"format": "sgl-minference/v1", "min_context": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError) as info:
        MInferenceConfig.load(path)
    assert str(info.value).startswith(f"{path}: not usable JSON") and len(str(info.value)) < 400


HUGE = "x" * 50_000_000  # a 50 MB string where a short value belongs


@pytest.mark.parametrize("data, needles", [
    (_own_head(0, 1, type=HUGE), ["layer 0", "head 1", "'type'", "unknown pattern type"]),
    (_minference_with(1, 0, HUGE, 1, 2, 0.5), ["layer 1", "head 0", "'type'"]),
    (_minference_with(1, 0, VAS, HUGE, 2, 0.5), ["layer 1", "head 0", "'vertical'"]),
    (_own_with(min_context=HUGE), ["'min_context'"]),
    (_own_with(**{HUGE: 1}), ["not permitted"]),
    (_own_with(format=HUGE), ["'format'"]),
    (_own_with(heads={HUGE: {}}), ["'heads'"]),
    ({HUGE: 1}, ["unknown format"]),
], ids=["own type", "mi type", "mi budget", "global", "extra key", "format", "layer key", "unknown format"])
def test_error_messages_cut_huge_values(tmp_path, data, needles):
    path = _write(tmp_path, "huge.json", data)
    with pytest.raises(ConfigError) as info:
        MInferenceConfig.load(path)
    msg = str(info.value)
    assert str(path) in msg and len(msg) < len(str(path)) + 500, msg[:1000]
    assert "x" * (ECHO_LIMIT // 5) in msg  # the value is still recognisable
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_error_messages_list_the_first_problems_and_count_the_rest(tmp_path):
    bad = {str(h): {"type": "a_shape", "sink": 0, "local": 1} for h in range(MAX_ERROR_LINES + 15)}
    path = _write(tmp_path, "many.json", {"format": "sgl-minference/v1", "heads": {"0": bad}})
    with pytest.raises(ConfigError) as info:
        MInferenceConfig.load(path)
    lines = str(info.value).splitlines()
    assert len(lines) == MAX_ERROR_LINES + 1 and lines[0].startswith(f"{path}: layer 0, head 0, field 'sink'")
    assert lines[-1] == f"{path}: ... and 15 more problems"


def test_missing_file():
    with pytest.raises(ConfigError, match="nowhere.json: cannot read"):
        MInferenceConfig.load("/nonexistent/nowhere.json")


def test_specs_are_strict_and_frozen():
    for bad in (dict(vertical=12.5, slash=1), dict(vertical="100", slash=1), dict(vertical=0, slash=1)):
        with pytest.raises(ValidationError):
            VS(**bad)
    with pytest.raises(ValidationError):
        DenseSpec(topk=1)
    with pytest.raises(ValidationError):
        VS(vertical=1, slash=1).vertical = 2
    with pytest.raises(ValidationError):
        MInferenceConfig(block_size=64.0)
    assert VS(vertical=10**7, slash=1).vertical == 10**7  # larger than any sequence: clamped at run time


# ---- model checks and TP slicing ------------------------------------------------------------------


def test_validate_for_model_complete_table():
    cfg = MInferenceConfig.load(MINFERENCE)
    cfg.validate_for_model(2, 4)
    cases = [
        ((3, 4), ["layer 2", "'num_layers'", "missing"]),
        ((1, 4), ["layer 1", "'num_layers'", "out of range"]),
        ((2, 8), ["layer 0", "head 4", "'num_heads'", "missing"]),
        ((2, 2), ["layer 0", "head 2", "'num_heads'", "out of range"]),
    ]
    for (layers, heads), needles in cases:
        with pytest.raises(ConfigError) as info:
            cfg.validate_for_model(layers, heads)
        msg = str(info.value)
        assert msg.startswith(str(MINFERENCE))
        for needle in needles:
            assert needle in msg, f"{needle!r} not in {msg!r}"


def test_validate_for_model_partial_table():
    cfg = MInferenceConfig(heads={3: {5: DenseSpec()}})
    cfg.validate_for_model(4, 8)
    cfg.validate_for_model(32, 32)
    with pytest.raises(ConfigError, match=r"layer 3, head 5, field 'heads': head out of range"):
        cfg.validate_for_model(4, 4)
    with pytest.raises(ConfigError, match=r"layer 3, head 5, field 'heads': layer out of range"):
        cfg.validate_for_model(2, 8)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layer_specs_tp_slices_cover_the_layer(tp):
    cfg = MInferenceConfig.load(MINFERENCE)
    per_rank = 4 // tp
    for layer in range(2):
        slices = [cfg.layer_specs(layer, rank * per_rank, per_rank) for rank in range(tp)]
        assert [spec for s in slices for spec in s] == [cfg.head_spec(layer, h) for h in range(4)]
    assert cfg.layer_specs(0, 2, 2) == [VS(vertical=30, slash=800), BlockSparseSpec(topk=100)]


def test_layer_specs_out_of_range():
    cfg = MInferenceConfig.load(MINFERENCE)
    with pytest.raises(ConfigError, match="head slice"):
        cfg.layer_specs(0, 2, 4)
    with pytest.raises(ConfigError, match="layer 2"):
        cfg.layer_specs(2, 0, 4)
    assert MInferenceConfig().layer_specs(40, 60, 4) == [VS(vertical=1000, slash=6096)] * 4  # no shape declared


# ---- overrides and precedence ----------------------------------------------------------------------


def test_from_overrides_inline_fields():
    cfg = MInferenceConfig.from_overrides(
        {
            "min_context": 1024,
            "default": {"type": "a_shape", "sink": 64, "local": 1024},
            "heads": {"0": {"1": {"type": "dense"}}},
        }
    )
    assert cfg.min_context == 1024
    assert cfg.head_spec(0, 1) == DenseSpec() and cfg.head_spec(0, 0) == AShapeSpec(sink=64, local=1024)


def test_from_overrides_config_path_plus_globals():
    overrides = {"config_path": str(MINFERENCE), "min_context": 131072, "dense_backend": "triton"}
    cfg = MInferenceConfig.from_overrides(overrides)
    assert cfg.min_context == 131072 and cfg.dense_backend == "triton"
    assert cfg.layer_specs(0, 0, 4) == MInferenceConfig.load(MINFERENCE).layer_specs(0, 0, 4)
    assert str(MINFERENCE) in cfg.source


def test_from_overrides_errors():
    with pytest.raises(ConfigError, match=r"minference override: field 'sparsity': Extra inputs are not permitted"):
        MInferenceConfig.from_overrides({"sparsity": 0.5})
    with pytest.raises(ConfigError, match=r"field 'config_path'"):
        MInferenceConfig.from_overrides({"config_path": 3})
    with pytest.raises(ConfigError, match=r"layer 0, head 0, field 'vertical'"):
        MInferenceConfig.from_overrides({"heads": {"0": {"0": {"type": "vertical_slash", "vertical": -1, "slash": 2}}}})
    with pytest.raises(ConfigError, match="expected a JSON object"):
        MInferenceConfig.from_overrides('{"min_context": 1}')


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "Qwen-tiny-1M"
    shutil.copytree(QWEN_MODEL, path)
    return path


def _hf_config(model_dir, **extra):
    return {**_json(model_dir / "config.json"), **extra}


def test_resolve_defaults_without_any_source(tmp_path):
    assert resolve({"model_type": "llama"}, str(tmp_path), env={}) == MInferenceConfig()
    assert resolve(None, None, env={}) == MInferenceConfig()


def test_resolve_dca_table_from_model_config():
    hf = _json(QWEN_CONFIG)
    cfg = resolve(hf, "Qwen/Qwen2.5-7B-Instruct-1M", env={})  # a hub id: not a directory, nothing downloaded
    assert cfg == MInferenceConfig.load(QWEN_CONFIG)
    assert "hf_config:dual_chunk_attention_config" in cfg.source


def test_resolve_model_dir_table_beats_dca_and_takes_threshold(model_dir):
    dca_table = _json(QWEN_CONFIG)["dual_chunk_attention_config"]["sparse_attention_config"]
    hf = _hf_config(model_dir)
    hf["dual_chunk_attention_config"]["sparse_attention_config"] = dca_table
    cfg = resolve(hf, str(model_dir), env={})
    file_cfg = MInferenceConfig.load(model_dir / "sparse_attention_config.json")
    assert cfg.layer_specs(1, 0, 4) == file_cfg.layer_specs(1, 0, 4)
    assert cfg.min_context == 16384  # the model config's sparse_attention_threshold
    assert cfg.source == str(model_dir / "sparse_attention_config.json")


@pytest.mark.parametrize("field, value, problem", [
    ("sparse_attention_threshold", "8k", "Input should be a valid integer (got '8k')"),
    ("sparse_attention_last_q", 0, "Input should be greater than or equal to 1 (got 0)")])
def test_bad_qwen_globals_name_the_qwen_field_and_its_file(tmp_path, model_dir, field, value, problem):
    data = _json(QWEN_CONFIG)
    data["dual_chunk_attention_config"][field] = value
    path = _write(tmp_path, "config.json", data)
    with pytest.raises(ConfigError) as info:
        MInferenceConfig.load(path)
    assert str(info.value) == f"{path}:dual_chunk_attention_config: field '{field}': {problem}"
    # The table from sparse_attention_config.json next to the model, the bad value from the model's config.json.
    hf = _hf_config(model_dir)
    hf["dual_chunk_attention_config"][field] = value
    with pytest.raises(ConfigError) as info:
        resolve(hf, str(model_dir), env={})
    msg = str(info.value)
    assert msg.startswith(f"{model_dir / 'config.json'}:dual_chunk_attention_config: field '{field}'"), msg
    assert QWEN_TABLE_FILE not in msg and "min_context" not in msg and "'last_q'" not in msg
    with pytest.raises(ConfigError, match=rf"^hf_config:dual_chunk_attention_config: field '{field}'"):
        resolve(hf, None, env={})


def test_resolve_threshold_applies_to_defaults_when_no_table(tmp_path):
    hf = {"dual_chunk_attention_config": {"chunk_size": 262144, "sparse_attention_threshold": 4096}}
    assert resolve(hf, str(tmp_path), env={}) == MInferenceConfig(min_context=4096)


def test_resolve_env_file_beats_model_files(model_dir):
    env = {ENV_VAR: str(OWN)}
    assert resolve(_hf_config(model_dir), str(model_dir), env=env) == MInferenceConfig.load(OWN)
    with pytest.raises(ConfigError, match=rf"missing\.json: no such file \(named by \${ENV_VAR}\)"):
        resolve({}, None, env={ENV_VAR: str(model_dir / "missing.json")})


def test_resolve_override_config_path_beats_env(model_dir):
    hf = _hf_config(model_dir, minference={"config_path": str(MINFERENCE), "min_chunk": 256})
    cfg = resolve(hf, str(model_dir), env={ENV_VAR: str(OWN)})
    assert cfg.layer_specs(0, 0, 4) == MInferenceConfig.load(MINFERENCE).layer_specs(0, 0, 4)
    assert cfg.min_chunk == 256 and cfg.min_context == 32768  # the env file's 65536 does not leak in


def test_resolve_inline_override_applies_on_top_of_lower_sources(model_dir):
    hf = SimpleNamespace(**_hf_config(model_dir, minference={"min_context": 200000, "dense_backend": "fa3"}))
    cfg = resolve(hf, str(model_dir), env={})
    file_cfg = MInferenceConfig.load(model_dir / "sparse_attention_config.json")
    assert cfg.layer_specs(0, 0, 4) == file_cfg.layer_specs(0, 0, 4)
    assert cfg.min_context == 200000 and cfg.dense_backend == "fa3"  # override beats the Qwen threshold
    with pytest.raises(ConfigError, match=r"--json-model-override-args minference: field 'last_q'"):
        resolve({"minference": {"last_q": 0}}, None, env={})
