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
