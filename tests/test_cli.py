"""The command-line tools as a user meets them: they start in the environment tests/run.sh builds, a bad argument
is one line on stderr and exit status 2, nothing lands in the working directory uninvited; the main job's
backend choice, progress lines and ratio table with a stand-in engine; e2e_ttft's exit status."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, e2e_ttft
from sgl_minference import ttft

REPO = Path(__file__).resolve().parents[1]
HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU is told")


def run_tool(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process, with this checkout's package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_usage_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("tool", ["tools.search", "tools.eval", "tools.eval.curve", "tools.gguf_loader", "ttft"])
def test_help(tool, tmp_path):
    done = run_tool(["-m", f"sgl_minference.{tool}", "--help"], tmp_path)
    assert done.returncode == 0 and "usage: python -m sgl_minference." + tool in done.stdout, done.stderr[-2000:]


def test_bad_paths_are_one_line_and_exit_2(tmp_path):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    assert_usage_error(run_tool(["-m", "sgl_minference.tools.gguf_loader", str(tmp_path / "missing.gguf"),
                                 str(tmp_path / "out")], tmp_path), "source:", "missing.gguf")
    assert_usage_error(run_tool(["-m", "sgl_minference.tools.gguf_loader", str(not_gguf), str(tmp_path / "out")],
                                tmp_path), "not a GGUF file")
    assert_usage_error(run_tool(["-m", "sgl_minference.tools.search", str(tmp_path), "-o", "cfg.json"], tmp_path),
                       "model:", "without a config.json")
    assert_usage_error(run_tool(["-m", "sgl_minference.ttft", "--model", str(tmp_path)], tmp_path),
                       "--model: no config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bad_config_is_the_config_error_on_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "sgl-minference/v1", "default": {"type": "vertical_slash", "vertical": 0,
                                                                          "slash": 10}}))
    model = str(REPO / "sgl_minference" / "models" / "llama3-8b")
    assert_usage_error(run_tool(["-m", "sgl_minference.tools.eval", model, "--config", str(bad)], tmp_path),
                       "--config:", "vertical")
    assert_usage_error(run_tool(["-m", "sgl_minference.tools.eval", model, "--config", str(tmp_path / "no.json")],
                                tmp_path), "cannot read")
    assert_usage_error(run_tool(["-m", "sgl_minference.ttft", "--config", str(bad)], tmp_path), "vertical")
    assert_usage_error(run_tool(["-m", "sgl_minference.ttft", "--config", '{"heads": {"40": {}}}'], tmp_path),
                       "--config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


@no_gpu
def test_eval_says_it_needs_a_gpu_before_loading_anything(tmp_path):
    model = str(REPO / "sgl_minference" / "models" / "llama3-8b")  # a config only: loading it would fail
    done = run_tool(["-m", "sgl_minference.tools.eval", model, "--quick"], tmp_path)
    assert_usage_error(done, "needs a CUDA GPU", "nothing was loaded")
    assert list(tmp_path.iterdir()) == []


def test_eval_writes_outside_the_working_directory_by_default():
    from sgl_minference.tools.eval import __main__ as eval_main

    assert eval_main.RESULTS_DIR.is_absolute() and eval_main.RESULTS_DIR.parts[-3:] == (".cache", "sgl_minference",
                                                                                         "eval")


@pytest.mark.skipif(not HAVE_SGLANG, reason="needs the sglang package (tests/run.sh installs it)")
def test_plugin_loads_in_a_fresh_process(tmp_path):
    """SGLang imports torchvision, which needs the package's workaround next to a CPU-only torch."""
    script = ("from sgl_minference import plugin; plugin.register()\n"
              "from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES\n"
              "assert 'minference' in ATTENTION_BACKEND_CHOICES\nprint('ok')")
    done = run_tool(["-c", script], tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# The main job with a stand-in engine
# ----------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Stands in for ``sglang.Engine``: a request of n tokens takes ``SECONDS_PER_K[backend] * n / 1000`` on the
    fake clock."""

    SECONDS_PER_K = {"fa3": 0.02, "minference": 0.01}
    clock: Clock | None = None
    started: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.prompts, self.closed = kwargs, [], False
        FakeEngine.started.append(self)

    def generate(self, *, input_ids, sampling_params):
        assert sampling_params["max_new_tokens"] == 1
        self.prompts.append(tuple(input_ids))
        self.clock.now += self.SECONDS_PER_K[self.kwargs["attention_backend"]] * len(input_ids) / 1000
        return {"meta_info": {"cached_tokens": 0}}

    def shutdown(self):
        self.closed = True


def test_ttft_defaults_to_sglangs_dense_choice_then_minference():
    args = ttft.parse_args([])
    assert args.backends == ["auto", "minference"] and args.lengths == [131072]
    assert (args.model / "config.json").is_file()  # shipped in the package (sgl_minference/models)
    assert ttft.resolve_backends(args.backends, lambda name: "fa3") == ["fa3", "minference"]
    assert ttft.resolve_backends(["auto", "flashinfer", "fa3"], lambda name: "flashinfer") == ["flashinfer", "fa3"]


def test_ttft_prints_progress_and_the_ratio(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(ttft.time, "perf_counter", clock)
    monkeypatch.setattr(FakeEngine, "clock", clock)
    FakeEngine.started.clear()
    args = ttft.parse_args(["--lengths", "1000", "2000", "--config", '{"min_context": 512}', "--repeats", "3",
                            "--engine-args", '{"tp_size": 1}'])
    ttft.check_args(args)
    result = ttft.run(args, ttft.resolve_backends(args.backends, lambda name: "fa3"), engine_cls=FakeEngine,
                      used_memory=lambda: 3 * ttft.GIB, device="fake", progress=ttft.Progress(heartbeat_s=60))
    out = capsys.readouterr().out
    assert [r["ratio"] for r in result["ratios"]] == pytest.approx([2.0, 2.0])
    assert [(r["dense"], r["length"]) for r in result["ratios"]] == [("fa3", 1000), ("fa3", 2000)]
    assert "    2000 tokens: fa3 0.040 s, minference 0.020 s -> 2.00x (fa3 TTFT / minference TTFT)" in out
    for line in ("fa3: starting engine ...", "fa3: warm-up request of 1000 tokens ... (a first run",
                 "minference: starting engine: done in",
                 "minference: shutting the engine down: done in"):
        assert line in out
    assert out.count("compiles kernels") == 2  # the first warm-up of each engine
    fa3, sparse = FakeEngine.started
    assert fa3.kwargs["attention_backend"] == "fa3" and "json_model_override_args" not in fa3.kwargs
    assert json.loads(sparse.kwargs["json_model_override_args"]) == {"minference": {"min_context": 512}}
    assert sparse.kwargs["tp_size"] == 1 and sparse.kwargs["context_length"] == 2000 + 64
    assert fa3.closed and sparse.closed
    assert len(set(fa3.prompts)) == len(fa3.prompts) == 2 * (1 + 3)  # distinct prompts: no radix-cache hit
    assert result["results"][0]["used_before_gib"] == 3.0


def test_progress_reports_a_long_step_while_it_runs(capsys):
    import time

    progress = ttft.Progress(heartbeat_s=0.02)
    with progress.step("starting engine"):
        time.sleep(0.15)
    out = capsys.readouterr().out
    assert "starting engine: still running" in out and "starting engine: done in" in out


@no_gpu
def test_ttft_without_a_gpu_exits_2_before_importing_sglang(capsys):
    assert ttft.main(["--lengths", "4096"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# e2e_ttft's exit status
# ----------------------------------------------------------------------------------------------------------


def fake_worker(status: str):
    def run_worker(spec, timeout_s, log_path):
        lines = [{"model": spec.model, "backend": spec.backend, "scenario": s["name"], "input_lens": s["input_lens"],
                  "status": status, **({"ttft_ms": 5.0, "ttft_ms_all": [5.0]} if status == "ok" else
                                       {"reason": "RuntimeError: CUDA out of memory"})} for s in spec.scenarios]
        Path(spec.records_path).write_text("".join(json.dumps(x) + "\n" for x in lines))
        return "ok", ""
    return run_worker


def test_e2e_ttft_fails_and_appends_nothing_when_every_case_failed(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    out = tmp_path / "e2e.json"
    argv = ["--model", str(model_dir), "--backends", "fa3,minference", "--lengths", "1K", "--scenarios", "single",
            "--budget-s", "100", "--out", str(out)]
    monkeypatch.setattr(e2e_ttft, "run_worker", fake_worker("oom"))
    assert e2e_ttft.main(argv) == 1
    assert not out.exists() and "every one of the 2 cases failed" in capsys.readouterr().err
    monkeypatch.setattr(e2e_ttft, "run_worker", fake_worker("ok"))
    assert e2e_ttft.main(argv) == 0
    assert len(common.load_results(out, "e2e")["runs"]) == 1
    monkeypatch.setattr(e2e_ttft, "run_worker", fake_worker("error"))
    assert e2e_ttft.main(argv) == 1
    results = common.load_results(out, "e2e")
    assert len(results["runs"]) == 1 and {r["status"] for r in results["records"]} == {"ok"}  # left as it was
    assert e2e_ttft.main(argv + ["--resume"]) == 0  # nothing left to run
    assert "nothing to run" in capsys.readouterr().out


def test_e2e_ttft_bad_model_is_one_line(tmp_path):
    done = run_tool(["-m", "benchmarks.e2e_ttft", "--model", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "e2e.json")], REPO)
    assert_usage_error(done, "--model: no config.json")
    assert not (tmp_path / "e2e.json").exists()

