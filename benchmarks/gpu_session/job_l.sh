#!/usr/bin/env bash
# job L (session 14): what sessions 12-13 built and did not measure, most valuable first, resumable; call it again
# until all are done. Issue 12: the GPU kernel and routing tests (pool runs share the slot table's code path; routing
# weighs the index on the device timeline), the shared-path runs against the table, the sgl_kernel comparison.
# Issue 11/12 item 3: where the captured layouts' index time goes (--profile). Issue 15: serving faults, cold with the
# radix cache on, cold with one chunk per prompt (mem_fraction_static set: SGLang derives a negative one from
# --chunked-prefill-size 131072 on the H200). Issue 11: TTFT at 128K last (index is 1-4% of it there).
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
[ -f /tmp/res/done.models ] || setup_host
NEED=120 ONCE=1 step gpu_kernels 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_sparse_attention.py \
  tests/test_routing.py tests/test_patterns.py tests/test_select.py \
  --junitxml=/tmp/res/gpu_kernels_h200_session14.xml
NEED=100 step chunk_runs_8b 200 python3 -m benchmarks.chunk_bench --model llama3-8b --length 128K --chunk 8K \
  --data planted,synthetic --launches 64x4x3,64x4x3t --out /tmp/res/chunk_h200_8b_128k_sharedruns.json
# where the realistic layouts' index time goes (session 12: 1-12 ms per layer against FA3's 0.2-1.3 ms)
NEED=100 step profile_smol 200 python3 -m benchmarks.chunk_bench --data captured --captured /tmp/models/smollm2 \
  --length 7936 --chunk 8K --config '{"config_path": "sgl_minference/configs/smollm2-135m.json"}' --profile \
  --out /tmp/res/chunk_h200_smollm2_8k_captured_profile.json
NEED=100 step profile_gemma 240 python3 -m benchmarks.chunk_bench --data captured --captured /tmp/models/gemma3-270m \
  --length 32512 --chunk 8K --config '{"config_path": "sgl_minference/configs/gemma3-270m.json"}' --profile \
  --out /tmp/res/chunk_h200_gemma3_32k_captured_profile.json
# Issue 12 item 4: our kernel against sgl_kernel's sparse_attn_func on the same key set (packed K/V), then with TMA
for l in default; do
  NEED=100 step sgl_cmp_$l 200 python3 -m benchmarks.kernel_bench --lengths 8K,32K,128K --head-dims 128 --chunk 8K \
    --cases ours_vs,sgl_vs,ours_sgl_layout $([ $l = tma ] && echo --launch 64x4x3d) --budget-s 160 \
    --out /tmp/res/kernel_h200_sgl_compare_$l.json
done
mkdir -p /tmp/res/logs
# the cold and serving runs repeat session 10's, so they keep the SmolLM2 config it ran (shipped until 2026-12-03)
OLD_SMOL=benchmarks/results/multiturn/smollm2-135m_config_2026-11-24.json
# the server flags every reliability run below shares (runbook: SmolLM2 past its trained context, prefill graphs off)
SMOL=(--model /tmp/models/smollm2 --context-length 135168 --server-arg=--cuda-graph-backend-prefill=disabled
      --startup-timeout-s 400 --log-dir /tmp/res/logs --minference-config $OLD_SMOL)
cold() {  # NAME BACKEND OUT ARGS...
  local name=$1 b=$2 out=$3; shift 3
  NEED=240 ONCE=1 step $name 560 python3 -m benchmarks.multiturn.reliability cold --backend $b "${SMOL[@]}" \
    --out $out "$@"
}
for b in minference fa3; do
  NEED=300 ONCE=1 step serving_smol_$b 560 python3 -m benchmarks.multiturn.reliability serving --backend $b \
    "${SMOL[@]}" --out /tmp/res/rel_serving_smollm2_${b}_h200.json
done
for b in minference fa3; do
  cold cold_radixon_$b $b /tmp/res/rel_cold_smollm2_${b}_radixon_h200.json
done
NEED=100 step chunk_runs_1b 200 python3 -m benchmarks.chunk_bench --model llama3.2-1b --length 512K --chunk 8K \
  --data synthetic --launches 128x4x3,128x4x3t --out /tmp/res/chunk_h200_1b_512k_sharedruns.json
ONE=(--chunked-prefill-size 131072 --mem-fraction-static 0.85 --disable-radix-cache)
cold cold_onechunk minference /tmp/res/rel_cold_smollm2_minference_onechunk_radixoff_h200.json "${ONE[@]}"
cold cold_onechunk_fa3 fa3 /tmp/res/rel_cold_smollm2_fa3_onechunk_radixoff_h200.json "${ONE[@]}"
NEED=100 step sgl_cmp_tma 200 python3 -m benchmarks.kernel_bench --lengths 8K,32K,128K --head-dims 128 --chunk 8K \
  --cases ours_vs,sgl_vs,ours_sgl_layout --launch 64x4x3d --budget-s 160 --out /tmp/res/kernel_h200_sgl_compare_tma.json
# Issue 11: TTFT at 128K (stats report pool_run_chunk_share and the attended share next to the TTFT)
NEED=300 step e2e_128k 540 python3 -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference --lengths 128K \
  --scenarios single --structure dummy,synthetic --warmup-lens 4K,32K --reps 2 --rep-budget-s 45 --budget-s 500 \
  --out /tmp/res/e2e_h200_8b_128k.json
ls /tmp/res; pack
