#!/usr/bin/env bash
# job E (a fresh host after staging): install, models, then job B's SmolLM2 evals
. benchmarks/gpu_session/common.sh
python3 -c "import sglang, flashinfer, sgl_kernel, transformers, gguf, accelerate, pydantic; print('imports ok')" || { echo "MISSING IMPORTS"; exit 3; }
step install 150 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
step models 400 bash benchmarks/gpu_session/models.sh
mkdir -p /tmp/res && cp .gpu/res/search_smollm2_h200_8k_t09*.json /tmp/res/
bash benchmarks/gpu_session/job_b.sh
