#!/usr/bin/env bash
# job D: issue 15 item 4, the dense-equivalence GPU tests through SGLang on SmolLM2 (real weights)
. benchmarks/gpu_session/common.sh
step test_sglang_gpu 560 env SGL_MINFERENCE_TEST_MODEL=/tmp/models/smollm2 python3 -m pytest -m gpu tests/test_sglang_gpu.py \
  -q -p no:cacheprovider --junitxml=/tmp/res/test_sglang_gpu_smollm2_h200.xml
ls /tmp/res; pack
