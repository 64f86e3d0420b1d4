#!/usr/bin/env bash
# job K (for session 13): what session 12 left, in priority order, resumable; call it again until all are done.
# Issue 12: pool runs now share the slot table's code path (session 12's dual-path kernel doubled shared memory and
# lost to the table alone): GPU kernel tests, then runs against the table on the paged pool; the sgl_kernel
# comparison (item 4). Issue 11: TTFT at 128K. Issue 15: one chunk per prompt (SGLang derives a negative
# mem_fraction_static from --chunked-prefill-size 131072 on the H200, so it is set), serving, radix on.
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
[ -f /tmp/res/done.models ] || setup_host
NEED=120 ONCE=1 step gpu_kernels 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_sparse_attention.py \
  tests/test_patterns.py tests/test_select.py tests/test_planner.py tests/test_stats.py tests/test_adaptive.py \
  --junitxml=/tmp/res/gpu_kernels_h200_session13.xml
NEED=100 step chunk_runs_8b 200 python3 -m benchmarks.chunk_bench --model llama3-8b --length 128K --chunk 8K \
  --data planted,synthetic --launches 64x4x3,64x4x3t --out /tmp/res/chunk_h200_8b_128k_sharedruns.json
NEED=100 step chunk_runs_1b 200 python3 -m benchmarks.chunk_bench --model llama3.2-1b --length 512K --chunk 8K \
  --data synthetic --launches 128x4x3,128x4x3t --out /tmp/res/chunk_h200_1b_512k_sharedruns.json
# Issue 12 item 4: our kernel against sgl_kernel's sparse_attn_func on the same key set (packed K/V), then with TMA
for l in default tma; do
  NEED=100 step sgl_cmp_$l 200 python3 -m benchmarks.kernel_bench --lengths 8K,32K,128K --head-dims 128 --chunk 8K \
    --cases ours_vs,sgl_vs,ours_sgl_layout $([ $l = tma ] && echo --launch 64x4x3d) --budget-s 160 \
    --out /tmp/res/kernel_h200_sgl_compare_$l.json
done
# Issue 11: TTFT at 128K (stats report pool_run_chunk_share and the attended share next to the TTFT)
NEED=300 step e2e_128k 540 python3 -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference --lengths 128K \
  --scenarios single --structure dummy,synthetic --warmup-lens 4K,32K --reps 2 --rep-budget-s 45 --budget-s 500 \
  --out /tmp/res/e2e_h200_8b_128k.json
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
ONE=(--chunked-prefill-size 131072 --mem-fraction-static 0.85 --disable-radix-cache)
cold cold_onechunk minference /tmp/res/rel_cold_smollm2_minference_onechunk_radixoff_h200.json "${ONE[@]}"
cold cold_onechunk_fa3 fa3 /tmp/res/rel_cold_smollm2_fa3_onechunk_radixoff_h200.json "${ONE[@]}"
for b in minference fa3; do
  NEED=300 ONCE=1 step serving_smol_$b 560 python3 -m benchmarks.multiturn.reliability serving --backend $b \
    "${SMOL[@]}" --out /tmp/res/rel_serving_smollm2_${b}_h200.json
done
for b in minference fa3; do
  cold cold_radixon_$b $b /tmp/res/rel_cold_smollm2_${b}_radixon_h200.json
done
ls /tmp/res; pack
