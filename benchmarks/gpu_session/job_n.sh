#!/usr/bin/env bash
# job N (session 16): what job M left, most valuable first, resumable; call it again until all are done.
# Issue 11 item 1: the GPU tests and the captured layouts' index profiles after the FlexPrefill / XAttention launch
# cuts (builders and concat_heads changed); issue 11: the minference e2e rows (1B 512K / 1M, then 8B); issue 15:
# Gemma-3's dense-equivalence test. The serving faults are done (session 15): on a fresh host
# `touch /tmp/res/done.serving_smol_minference /tmp/res/done.serving_smol_fa3`. The soak gets a session of its own.
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
# TAG names the files of runs that repeat per session (TAG=session17 bash ...)
TAG=${TAG:-session16}
# ONLY_FA3_SERVING=1: the minference serving run is done (a second host that lost the first one's files)
# NO_PROFILE=1: skip the captured-layout profiles
[ -f /tmp/res/done.models ] || setup_host
NEED=120 ONCE=1 step gpu_kernels 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_sparse_attention.py \
  tests/test_routing.py tests/test_patterns.py tests/test_select.py \
  --junitxml=/tmp/res/gpu_kernels_h200_$TAG.xml
[ -z "$NO_PROFILE" ] && NEED=90 step profile_smol 200 python3 -m benchmarks.chunk_bench --data captured --captured /tmp/models/smollm2 \
  --length 7936 --chunk 8K --config '{"config_path": "sgl_minference/configs/smollm2-135m.json"}' --profile \
  --out /tmp/res/chunk_h200_smollm2_8k_captured_profile_$TAG.json
[ -z "$NO_PROFILE" ] && NEED=90 step profile_gemma 240 python3 -m benchmarks.chunk_bench --data captured --captured /tmp/models/gemma3-270m \
  --length 32512 --chunk 8K --config '{"config_path": "sgl_minference/configs/gemma3-270m.json"}' --profile \
  --out /tmp/res/chunk_h200_gemma3_32k_captured_profile_$TAG.json
mkdir -p /tmp/res/logs
# the serving runs keep the SmolLM2 config session 10's runs used (shipped until 2026-12-03)
OLD_SMOL=benchmarks/results/multiturn/smollm2-135m_config_2026-11-24.json
SMOL=(--model /tmp/models/smollm2 --context-length 135168 --server-arg=--cuda-graph-backend-prefill=disabled
      --startup-timeout-s 400 --log-dir /tmp/res/logs --minference-config $OLD_SMOL)
for b in $([ -n "$ONLY_FA3_SERVING" ] || echo minference) fa3; do
  NEED=200 ONCE=1 step serving_smol_$b 400 python3 -m benchmarks.multiturn.reliability serving --backend $b \
    "${SMOL[@]}" --out /tmp/res/rel_serving_smollm2_${b}_h200.json
done
# Issue 11 item 4: the H200 rows never run since routing (8B: 8K, 32K, 256K; 1B: 512K, 1M), resumable (--resume
# skips the cases the file has); each call's e2e gets what the call has left
E8=/tmp/res/e2e_h200_8b_rows.json E1=/tmp/res/e2e_h200_1b_rows.json
# an earlier session's rows (committed under benchmarks/results/) are kept: --resume then runs only the rest
for f in $E8 $E1; do [ -f $f ] || [ ! -f benchmarks/results/${f##*/} ] || cp benchmarks/results/${f##*/} $f; done
NEED=300 step e2e_1b 560 python3 -m benchmarks.e2e_ttft --model llama3.2-1b --backends fa3,minference \
  --lengths 512K,1M --scenarios single --structure synthetic --warmup-lens 4K,64K --reps 2 --rep-budget-s 60 \
  --budget-s $((CALL_S - SECONDS - 30)) --resume --out $E1
NEED=240 step e2e_8b 560 python3 -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference \
  --lengths 8K,32K,256K --scenarios single --structure dummy,synthetic --warmup-lens 4K,32K --reps 2 \
  --rep-budget-s 40 --budget-s $((CALL_S - SECONDS - 30)) --resume --out $E8
NEED=240 ONCE=1 step gemma_equiv 400 env SGL_MINFERENCE_TEST_MODEL=/tmp/models/gemma3-270m python3 -m pytest \
  -p no:cacheprovider -m gpu -q tests/test_sglang_gpu.py -k "not 64k" --junitxml=/tmp/res/test_sglang_gpu_gemma3_h200_$TAG.xml
# Issue 11 items 2 and 4: the 8B 128K row (routing now weighs the index) and the chunk-size choice, 8192 (SGLang's
# default here) against 32768, at 128K and 256K, synthetic structure; resumable like the rows above
EC=/tmp/res/e2e_h200_8b_chunks.json
NEED=240 step chunks_8b 560 python3 -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference \
  --lengths 128K,256K --scenarios single --structure synthetic --chunk-sizes 8192,32768 --warmup-lens 4K,32K \
  --reps 2 --rep-budget-s 60 --budget-s $((CALL_S - SECONDS - 30)) --resume --out $EC
ls /tmp/res; pack
