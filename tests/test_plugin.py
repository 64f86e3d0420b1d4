"""The SGLang plugin on CPU: entry-point registration, ServerArgs with ``--attention-backend minference``, the
prefill-graph default, the config path through ``--json-model-override-args``, and the backend factory.

Needs ``pip install -e .`` (the entry point) and tests/requirements-sglang-cpu.txt; skips without SGLang.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang_cpu import import_server_args

server_args = import_server_args()

from sglang.srt.configs.model_config import ModelConfig  # noqa: E402
from sglang.srt.layers.attention import attention_registry  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402

from sgl_minference import plugin  # noqa: E402
from sgl_minference.backend.attn_backend import MInferenceAttnBackend  # noqa: E402
from sgl_minference.config import ConfigError, VerticalSlashSpec  # noqa: E402

MODEL = str(Path(__file__).parents[1] / "launch" / "models" / "llama3.2-1b")  # 16 layers, 32 q / 8 kv heads


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    load_plugins()


def make_server_args(**kwargs):
    # device="cuda": ServerArgs asks for an accelerator otherwise; nothing here touches one.
    return server_args.ServerArgs(model_path=MODEL, load_format="dummy", skip_tokenizer_init=True, device="cuda",
                                  **kwargs)


def test_entry_point_registers_the_backend():
    assert plugin.BACKEND_NAME in server_args.ATTENTION_BACKEND_CHOICES
    assert attention_registry.ATTENTION_BACKENDS[plugin.BACKEND_NAME] is plugin.create_backend


def test_register_twice_adds_the_choice_once():
    plugin.register()
    plugin.register()
    assert server_args.ATTENTION_BACKEND_CHOICES.count(plugin.BACKEND_NAME) == 1


def test_cli_accepts_the_backend():
    import argparse

    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(["--model-path", MODEL, "--attention-backend", "minference"])
    assert ns.attention_backend == "minference"
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", MODEL, "--attention-backend", "no-such-backend"])


def test_server_args_turn_the_prefill_graph_off_for_minference_only():
    sa = make_server_args(attention_backend="minference")
    assert sa.attention_backend == "minference"
    assert sa.cuda_graph_config.prefill.backend == "disabled"
    assert sa.cuda_graph_config.decode.backend == "full"  # decode graphs stay (the dense backend runs them)
    dense = make_server_args(attention_backend="flashinfer")
    assert dense.cuda_graph_backend_prefill is None
    chosen = make_server_args(attention_backend="minference", cuda_graph_backend_prefill="tc_piecewise")
    assert chosen.cuda_graph_config.prefill.backend == "tc_piecewise"  # an explicit choice is kept


def test_config_reaches_hf_config_through_json_model_override_args():
    override = {"minference": {"min_context": 1, "default": {"type": "vertical_slash", "vertical": 7, "slash": 9}}}
    sa = make_server_args(attention_backend="minference", json_model_override_args=json.dumps(override))
    model_config = ModelConfig.from_server_args(sa)
    from sgl_minference.config import resolve

    cfg = resolve(model_config.hf_config, sa.model_path, {})
    assert cfg.min_context == 1 and cfg.default == VerticalSlashSpec(vertical=7, slash=9)


# ---- the factory SGLang calls with its ModelRunner --------------------------------------------------------------


class FakeDense:
    def __init__(self, runner):
        self.runner = runner


def fake_runner(*, override=None, draft=False, **server_kwargs):
    sa = make_server_args(attention_backend="minference", **server_kwargs)
    model_config = ModelConfig.from_server_args(sa)
    if override:
        # Where --json-model-override-args puts it; set after ServerArgs is built, so that the launch-time check
        # (tested above) does not pre-empt the factory's own.
        model_config.hf_config.minference = override
    return SimpleNamespace(server_args=sa, model_config=model_config, is_draft_worker=draft,
                           use_mla_backend=False, token_to_kv_pool=object(),
                           req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(4, 16, dtype=torch.int32)))


@pytest.fixture
def dense_and_tp(monkeypatch):
    """FlashInfer needs a GPU: a fake stands in; attention TP rank 1 of 2 (no distributed setup on CPU)."""
    monkeypatch.setitem(attention_registry.ATTENTION_BACKENDS, "flashinfer", FakeDense)
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel",
                        lambda: SimpleNamespace(attn_tp_rank=1, attn_tp_size=2))


@pytest.mark.parametrize("override, match", [({"heads": {"20": {"0": {"type": "dense"}}}}, "layer 20"),
                                             ({"default": {"type": "vertical_slash", "vertical": 0, "slash": 8}},
                                              "vertical"),
                                             ({"config_path": "/no/such/minference.json"}, "minference.json")])
def test_a_bad_config_stops_server_args_in_the_launching_process(override, match):
    with pytest.raises(ConfigError, match=match):
        make_server_args(attention_backend="minference", json_model_override_args=json.dumps({"minference": override}))
    # Another backend never reads it.
    make_server_args(attention_backend="flashinfer", json_model_override_args=json.dumps({"minference": override}))


def test_a_bad_config_file_from_the_environment_stops_server_args(monkeypatch, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "sgl-minference/v1", "default": {"type": "diagonal_magic"}}')
    monkeypatch.setenv("SGL_MINFERENCE_CONFIG", str(bad))
    with pytest.raises(ConfigError, match="bad.json"):
        make_server_args(attention_backend="minference")


def test_factory_composes_the_dense_backend_and_slices_heads(dense_and_tp):
    override = {"min_context": 4096, "heads": {"3": {"17": {"type": "dense"}}}}
    runner = fake_runner(override=override)
    backend = plugin.create_backend(runner)
    assert isinstance(backend, MInferenceAttnBackend) and isinstance(backend.dense, FakeDense)
    assert backend.dense.runner is runner and backend.config.min_context == 4096
    assert sorted(backend.layers) == list(range(16))
    layer3 = backend.layers[3]
    assert layer3.num_q_heads == 16  # 32 heads over 2 ranks
    assert [g.heads.heads for g in layer3.groups if g.kind == "dense"] == [[1]]  # global head 17 on rank 1
    assert backend.all_heads.kv_head.tolist() == [h // 4 for h in range(16)]  # 4 KV heads per rank
    assert backend.layers[0].groups[0].heads.q_head.device == runner.req_to_token_pool.req_to_token.device


def test_factory_rejects_a_table_that_does_not_fit_the_model(dense_and_tp):
    with pytest.raises(ConfigError, match="layer 20"):
        plugin.create_backend(fake_runner(override={"heads": {"20": {"0": {"type": "dense"}}}}))
    with pytest.raises(ConfigError, match="last_q"):
        plugin.create_backend(fake_runner(override={"last_q": 0}))


def test_factory_rejects_unsupported_setups(dense_and_tp):
    runner = fake_runner()
    runner.use_mla_backend = True
    with pytest.raises(ValueError, match="MLA"):
        plugin.create_backend(runner)
    fp8 = fake_runner()
    fp8.server_args = SimpleNamespace(**{**vars(fp8.server_args), "kv_cache_dtype": "fp8_e4m3"})
    with pytest.raises(ValueError, match="kv-cache-dtype fp8_e4m3"):
        plugin.create_backend(fp8)


@pytest.mark.parametrize("field, value, needle", [("head_dim", 96, "head_dim 96 is not supported"),
                                                   ("v_head_dim", 128, "value head size 128")])
def test_models_the_kernel_cannot_serve_get_the_dense_backend_at_startup(dense_and_tp, caplog, field, value, needle):
    runner = fake_runner()
    setattr(runner.model_config, field, value)  # llama3.2-1b has head_dim 64
    with caplog.at_level("WARNING", logger=plugin.__name__):
        backend = plugin.create_backend(runner)
    assert isinstance(backend, FakeDense) and backend.runner is runner  # no sparse path to fail mid-request
    lines = [r.getMessage() for r in caplog.records if r.name == plugin.__name__]
    assert len(lines) == 1 and needle in lines[0] and "dense backend flashinfer" in lines[0], lines
    bad = fake_runner(override={"heads": {"20": {"0": {"type": "dense"}}}})
    bad.model_config.head_dim = 96
    with pytest.raises(ConfigError, match="layer 20"):  # a bad config still stops start-up
        plugin.create_backend(bad)


def test_supported_head_dims_keep_the_sparse_path(dense_and_tp):
    from sgl_minference.kernels.sparse_attention import SUPPORTED_HEAD_DIMS

    for head_dim in SUPPORTED_HEAD_DIMS:
        runner = fake_runner()
        runner.model_config.head_dim = runner.model_config.v_head_dim = head_dim
        assert plugin.dense_only_reason(runner.model_config) is None
        assert isinstance(plugin.create_backend(runner), MInferenceAttnBackend)


def test_draft_models_get_the_dense_backend(dense_and_tp):
    assert isinstance(plugin.create_backend(fake_runner(draft=True)), FakeDense)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_ttft_refuses_without_a_gpu(capsys):
    from sgl_minference import ttft

    assert ttft.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("hopper, fa3, expected", [(True, True, "fa3"), (True, False, "flashinfer"),
                                                    (False, True, "flashinfer"), (False, False, "flashinfer")])
def test_auto_dense_backend_follows_sglang_hopper_default(monkeypatch, hopper, fa3, expected):
    monkeypatch.setattr("sglang.srt.utils.common.is_hopper_with_cuda_12_3", lambda: hopper)
    monkeypatch.setattr(plugin, "_fa3_installed", lambda: fa3)
    assert plugin.resolve_dense_backend("auto") == expected
    assert plugin.resolve_dense_backend("triton") == "triton"  # an explicit choice is kept as it is


def test_factory_builds_the_resolved_dense_backend(dense_and_tp, monkeypatch):
    monkeypatch.setattr(plugin, "resolve_dense_backend", lambda name: "fake-dense")
    monkeypatch.setitem(attention_registry.ATTENTION_BACKENDS, "fake-dense", FakeDense)
    backend = plugin.create_backend(fake_runner())
    assert isinstance(backend.dense, FakeDense) and backend.config.dense_backend == "auto"


def test_chunk_size_default_applies_to_minference_only_and_never_over_the_user(monkeypatch):
    sglang_default = make_server_args(attention_backend="flashinfer").chunked_prefill_size
    assert make_server_args(attention_backend="minference").chunked_prefill_size == sglang_default  # unset: SGLang's
    monkeypatch.setattr(plugin, "CHUNKED_PREFILL_SIZE", 3 * sglang_default)
    assert make_server_args(attention_backend="minference").chunked_prefill_size == 3 * sglang_default
    assert make_server_args(prefill_attention_backend="minference", decode_attention_backend="flashinfer"
                            ).chunked_prefill_size == 3 * sglang_default
    assert make_server_args(attention_backend="flashinfer").chunked_prefill_size == sglang_default
    assert make_server_args(attention_backend="minference", chunked_prefill_size=1024).chunked_prefill_size == 1024
    assert make_server_args(attention_backend="minference", chunked_prefill_size=-1).chunked_prefill_size == -1
