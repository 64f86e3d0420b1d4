#!/usr/bin/env bash
# job J (for session 12): what session 11 left, in priority order, resumable; call it again until all are done.
# Issue 12: the kernel changed (pool runs, scalar range starts, an optional TMA path): GPU kernel tests, then what
# it buys on the dense layout (packed K/V) and on the paged pool (runs, slot table, TMA: one run). Issue 15: the
# dense-equivalence test on both real models against fa3 (flashinfer was not the model on Gemma-3); the cold runs'
# diagnosis and the serving checks, with the SmolLM2 config session 10 ran.
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
[ -f /tmp/res/done.models ] || setup_host
NEED=120 ONCE=1 step gpu_kernels 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_sparse_attention.py \
  tests/test_patterns.py tests/test_select.py tests/test_planner.py tests/test_stats.py tests/test_adaptive.py \
  --junitxml=/tmp/res/gpu_kernels_h200_session12.xml
NEED=120 step kernel_dense 200 python3 -m benchmarks.kernel_bench --lengths 32K,128K,256K --head-dims 64,128,256 \
  --cases fa3,ours_dense --budget-s 160 --out /tmp/res/kernel_h200_dense_runs.json
# the same dense layout with full tiles read by TMA (64-key tiles; head_dim 256 keeps its 2 stages)
for dl in 64,128:64x4x3d 256:64x4x2d; do
  NEED=60 step kernel_dense_tma_${dl%%:*} 150 python3 -m benchmarks.kernel_bench --lengths 32K,128K,256K \
    --head-dims ${dl%%:*} --cases fa3,ours_dense --launch ${dl#*:} --budget-s 110 \
    --out /tmp/res/kernel_h200_dense_tma_${dl%%:*}.json
done
NEED=100 step chunk_runs_8b 200 python3 -m benchmarks.chunk_bench --model llama3-8b --length 128K --chunk 8K \
  --data planted,synthetic --launches 64x4x3,64x4x3t,64x4x3d --out /tmp/res/chunk_h200_8b_128k_runs.json
NEED=100 step chunk_runs_1b 200 python3 -m benchmarks.chunk_bench --model llama3.2-1b --length 512K --chunk 8K \
  --data synthetic --launches 128x4x3,128x4x3t,64x4x3d --out /tmp/res/chunk_h200_1b_512k_runs.json
# Issue 12 item 3: realistic layouts, the shipped configs on the models' own q/k (eval prompts), against FA3
NEED=100 step chunk_gemma3 200 python3 -m benchmarks.chunk_bench --data captured --captured /tmp/models/gemma3-270m \
  --length 32512 --chunk 8K --config '{"config_path": "sgl_minference/configs/gemma3-270m.json"}' \
  --out /tmp/res/chunk_h200_gemma3_32k_captured.json
NEED=100 step chunk_smollm2 200 python3 -m benchmarks.chunk_bench --data captured --captured /tmp/models/smollm2 \
  --length 7936 --chunk 8K --config '{"config_path": "sgl_minference/configs/smollm2-135m.json"}' \
  --launches 128x4x3,128x4x3t,64x4x3d --out /tmp/res/chunk_h200_smollm2_8k_captured.json
for m in gemma3-270m:gemma3 smollm2:smollm2; do
  NEED=200 ONCE=1 step test_${m#*:} 330 env SGL_MINFERENCE_TEST_MODEL=/tmp/models/${m%:*} python3 -m pytest -m gpu \
    tests/test_sglang_gpu.py -k "not 64k" -q -p no:cacheprovider --junitxml=/tmp/res/test_sglang_gpu_${m#*:}_h200.xml
done
# Issue 11: TTFT at 128K with the kernel change (pool runs on a single prompt; stats report pool_run_chunk_share)
NEED=300 step e2e_128k 540 python3 -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference --lengths 128K \
  --scenarios single --structure dummy,synthetic --warmup-lens 4K,32K --reps 2 --rep-budget-s 45 --budget-s 500 \
  --out /tmp/res/e2e_h200_8b_128k_runs.json
mkdir -p /tmp/res/logs
# the cold and serving runs repeat session 10's, so they keep the SmolLM2 config it ran (shipped until 2026-12-03)
OLD_SMOL=benchmarks/results/multiturn/smollm2-135m_config_2026-11-24.json
python3 -c "import json; c = json.load(open('$OLD_SMOL')); c['dense_routing'] = False; \
json.dump(c, open('/tmp/res/smollm2_norouting.json', 'w'))"
# the server flags every reliability run below shares (runbook: SmolLM2 past its trained context, prefill graphs off)
SMOL=(--model /tmp/models/smollm2 --context-length 135168 --server-arg=--cuda-graph-backend-prefill=disabled
      --startup-timeout-s 400 --log-dir /tmp/res/logs)
cold() {  # NAME BACKEND CONFIG OUT ARGS...
  local name=$1 b=$2 cfg=$3 out=$4; shift 4
  NEED=240 ONCE=1 step $name 560 python3 -m benchmarks.multiturn.reliability cold --backend $b "${SMOL[@]}" \
    --minference-config $cfg --disable-radix-cache --out $out "$@"
}
cold cold_norouting minference /tmp/res/smollm2_norouting.json /tmp/res/rel_cold_smollm2_minference_norouting_radixoff_h200.json
cold cold_onechunk minference $OLD_SMOL /tmp/res/rel_cold_smollm2_minference_onechunk_radixoff_h200.json \
  --chunked-prefill-size 131072
cold cold_onechunk_fa3 fa3 $OLD_SMOL /tmp/res/rel_cold_smollm2_fa3_onechunk_radixoff_h200.json \
  --chunked-prefill-size 131072
for b in minference fa3; do
  NEED=300 ONCE=1 step serving_smol_$b 560 python3 -m benchmarks.multiturn.reliability serving --backend $b \
    "${SMOL[@]}" --minference-config $OLD_SMOL --out /tmp/res/rel_serving_smollm2_${b}_h200.json
done
ls /tmp/res; pack
