#!/usr/bin/env bash
# job G (session 10): the remaining runs in priority order, resumable; call it again until all are done.
# Issue 15: dense equivalence on Gemma-3. Issue 17: SmolLM2 searched on calibration prompts of the eval's kind
# (3 prompts, question rows scored apart), chosen to 0.98 and 0.99, each evaluated at 2K-8K. Issue 15: cold
# concurrent prefills, radix cache off, minference then fa3 (runbook line 7's form on SmolLM2). Issue 12: the
# dense-layout kernel baseline.
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
[ -f /tmp/res/done.models ] || setup_host
R=benchmarks/results
NEED=330 ONCE=1 step test_gemma 560 env SGL_MINFERENCE_TEST_MODEL=/tmp/models/gemma3-270m python3 -m pytest -m gpu \
  tests/test_sglang_gpu.py -q -p no:cacheprovider --junitxml=/tmp/res/test_sglang_gpu_gemma3_h200.xml
CAL=/tmp/res/search_smollm2_h200_8k_cal_t098.json
NEED=${SEARCH_NEED:-420} step search_smol_cal 570 python3 -m sgl_minference.tools.search /tmp/models/smollm2 \
  --length 7936 --density 0.25 0.4 0.6 0.8 --target-recall 0.98 --max-key-share 0.8 \
  --patterns a_shape vertical_slash block_sparse xattention flexprefill --min-context 1024 --device cuda --no-progress \
  --calibration kv_retrieval@0.5 niah_single@0.5 niah_multikey@0.8 --tail-rows 64 --seed 1000 -o $CAL
[ -f /tmp/res/done.search_smol_cal ] && step rechoose_smol_99 60 python3 -m sgl_minference.tools.search.rechoose \
  $CAL --target-recall 0.99 --max-key-share 0.8 -o /tmp/res/search_smollm2_h200_8k_cal_t099.json
smol_eval() {  # NAME OUT_JSON ARGS...
  local name=$1 out=$2; shift 2
  dense_for $R/eval_smollm2_h200.outputs.jsonl.gz $out
  step $name 500 python3 -m sgl_minference.tools.eval /tmp/models/smollm2 --lengths 2048 4096 7936 --depths 5 \
    --samples 2 --min-context 1024 --resume --out $out "$@"
}
for t in 98 99; do
  [ -f /tmp/res/search_smollm2_h200_8k_cal_t0$t.json ] && smol_eval eval_smol_cal_t0$t \
    /tmp/res/eval_smollm2_h200_cal_t0$t.json --config /tmp/res/search_smollm2_h200_8k_cal_t0$t.json
done
mkdir -p /tmp/res/logs
for b in minference fa3; do
  NEED=240 ONCE=1 step cold_smol_$b 560 python3 -m benchmarks.multiturn.reliability cold --backend $b \
    --model /tmp/models/smollm2 --minference-config sgl_minference/configs/smollm2-135m.json \
    --context-length 135168 --disable-radix-cache --server-arg=--cuda-graph-backend-prefill=disabled \
    --startup-timeout-s 400 --log-dir /tmp/res/logs --out /tmp/res/rel_cold_smollm2_${b}_radixoff_h200.json
done
# Issue 12: our kernel on the dense layout against FA3 on this H200 (the throughput target's baseline)
NEED=120 step kernel_dense 240 python3 -m benchmarks.kernel_bench --lengths 32K,128K,256K --head-dims 64,128,256 \
  --cases fa3,ours_dense --budget-s 220 --out /tmp/res/kernel_h200_dense.json
ls /tmp/res; pack
