"""The pattern registry: one entry per head spec type, and everything else looks patterns up there."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from sgl_minference import registry
from sgl_minference.config import ConfigError, MInferenceConfig


def test_every_spec_of_the_config_union_has_one_entry():
    union = typing.get_args(typing.get_args(registry.HeadSpec)[0])
    assert {p.spec for p in registry.PATTERNS.values()} == set(union)
    assert all(registry.PATTERNS[name].name == name for name in registry.PATTERNS)
    assert all(name in p.spec.model_fields for p in registry.PATTERNS.values() for name in p.budgets + p.group_by)


def test_every_torch_side_reference_resolves():
    for entry in registry.PATTERNS.values():
        for ref in (entry.build, entry.realise, entry.fit):
            if ref is not None:
                assert callable(ref.resolve()), ref.path


def test_config_and_registry_load_without_torch():
    code = ("import sys; import sgl_minference.config, sgl_minference.registry; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_block_matches_the_layout():
    from sgl_minference.layout import BLOCK

    assert registry.BLOCK == BLOCK


def test_group_key_and_budgets():
    a = registry.AShapeSpec(sink=4, local=64)
    b = registry.AShapeSpec(sink=8, local=32)
    assert registry.group_key(a) == registry.group_key(b) == ("a_shape",)
    assert registry.head_budgets([a, b]) == {"sink": [4, 8], "local": [64, 32]}
    assert registry.head_budgets([registry.DenseSpec()]) == {}
    with pytest.raises(ValueError, match="spec"):
        registry.pattern_of(object())


def test_minference_names_and_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"0": ["nope", 1, 2, 0.0]}]')
    assert registry.from_minference("stream_llm", 64, 512) == {"type": "a_shape", "sink": 64, "local": 512}
    assert registry.from_minference("block_sparse", 8, 0.5)["topk"] == registry.MINFERENCE_BLOCK_SPARSE_TOPK
    with pytest.raises(ValueError, match="vertical_and_slash"):
        registry.from_minference("dense", 1, 2)  # our own names are not MInference names
    with pytest.raises(ConfigError, match=r"t.json: layer 0, head 0, field 'type': unknown pattern type 'nope'"):
        MInferenceConfig.from_overrides({"config_path": str(path)})


def test_search_candidates_reject_unsearchable_types():
    from sgl_minference.config import DEFAULT_ESTIMATION

    with pytest.raises(ValueError, match="dense"):
        registry.search_candidates(1024, DEFAULT_ESTIMATION, ["dense"])


def test_adaptive_specs_validate_and_round_trip(tmp_path):
    cfg = MInferenceConfig.model_validate({"heads": {"0": {
        "0": {"type": "xattention", "threshold": 0.9, "stride": 8},
        "1": {"type": "flexprefill", "gamma": 0.95, "tau": 0, "min_budget": 1024}}}})
    assert cfg.head_spec(0, 0) == registry.XAttentionSpec(threshold=0.9, stride=8)
    assert cfg.head_spec(0, 1) == registry.FlexPrefillSpec(gamma=0.95, tau=0.0, min_budget=1024)
    cfg.save(tmp_path / "c.json")
    assert MInferenceConfig.load(tmp_path / "c.json") == cfg
    bad = {"xattention": [({"threshold": 0.0, "stride": 8}, "'threshold'"),
                          ({"threshold": 1.5, "stride": 8}, "'threshold'"),
                          ({"threshold": 0.9, "stride": 5}, "'stride'"),
                          ({"threshold": "0.9", "stride": 8}, "'threshold'"),
                          ({"threshold": 0.9, "stride": 8.0}, "'stride'")],
           "flexprefill": [({"gamma": 0.9, "tau": -0.1, "min_budget": 8}, "'tau'"),
                           ({"gamma": 0.9, "tau": 0.1, "min_budget": 0}, "'min_budget'"),
                           ({"gamma": 0.9, "tau": 0.1}, "'min_budget'")]}
    for kind, cases in bad.items():
        for fields, named in cases:
            with pytest.raises(ConfigError, match=rf"layer 2, head 3, field {named}"):
                MInferenceConfig.from_overrides({"heads": {"2": {"3": {"type": kind, **fields}}}})


def test_scaling_rules():
    x = registry.XAttentionSpec(threshold=0.9, stride=8)
    f = registry.FlexPrefillSpec(gamma=0.8, tau=0.1, min_budget=1000)
    assert registry.scaled(x, 2.0).threshold == pytest.approx(0.95)  # half the mass left out
    assert registry.scaled(x, 0.5).threshold == pytest.approx(0.8) and registry.scaled(x, 0.5).stride == 8
    assert registry.scaled(x, 1e-3).threshold == pytest.approx(0.01)  # at most 0.99 left out
    # a share that already leaves out more than 0.99 (a searched FlexPrefill head, gamma 1e-4) is kept by factor 1
    # and never raised by a factor below 1 (before 2026-12-03 both raised it to 0.01)
    tiny = registry.FlexPrefillSpec(gamma=1e-4, tau=0.1, min_budget=384)
    assert registry.scaled(tiny, 1.0) == tiny and registry.scaled(tiny, 0.5).gamma == pytest.approx(1e-4)
    assert registry.scaled(tiny, 2.0).gamma == pytest.approx(1 - 0.9999 / 2)
    half = registry.scaled(f, 0.5)
    assert half.gamma == pytest.approx(0.6) and half.min_budget == 500 and half.tau == 0.1
    assert registry.scaled(registry.VerticalSlashSpec(vertical=10, slash=3), 0.1) == \
        registry.VerticalSlashSpec(vertical=1, slash=1)
    assert registry.nominal_cost(x) == registry.nominal_cost(f) == -1  # input-dependent
    assert registry.group_key(x) == ("xattention", 8)


def test_benchmark_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("benchmarks/configs/*.json")):
        assert MInferenceConfig.load(path).default.type == path.stem
