#!/usr/bin/env bash
# job E (a fresh host after staging): install, models, then job B's SmolLM2 evals
. benchmarks/gpu_session/common.sh
setup_host
mkdir -p /tmp/res && cp .gpu/res/search_smollm2_h200_8k_t09*.json /tmp/res/
bash benchmarks/gpu_session/job_b.sh
