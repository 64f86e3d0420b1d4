#!/usr/bin/env bash
# job F (session 9): every remaining run in priority order, resumable; call it again until all are done.
# Issue 17: Gemma-3 ladder search, rechosen to 0.99 / 0.995, eval of 0.99 at 8K-32K, default config at budget
# scales 0.5 / 0.25 (32K). Issue 12: the paired launch's plan timed apart. Issue 11: e2e 128K with routing.
# Issue 17: eval of 0.995. Issue 15: dense-equivalence tests on SmolLM2.
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
[ -f /tmp/res/done.models ] || setup_host
R=benchmarks/results
step search_gemma 300 python3 -m sgl_minference.tools.search /tmp/models/gemma3-270m --length 32512 \
  --density 0.2 0.3 0.45 0.6 0.8 --target-recall 0.98 --max-key-share 0.8 \
  --patterns a_shape vertical_slash block_sparse xattention flexprefill --min-context 4096 --device cuda --no-progress \
  -o /tmp/res/search_gemma3_h200_32k_t098_ks08.json
for t in 99 995; do
  [ -f /tmp/res/done.search_gemma ] && step rechoose_gemma_$t 60 python3 -m sgl_minference.tools.search.rechoose \
    /tmp/res/search_gemma3_h200_32k_t098_ks08.json --target-recall 0.$t --max-key-share 0.8 \
    -o /tmp/res/search_gemma3_h200_32k_t0${t}_ks08.json
done
gemma_eval() {  # NAME OUT_JSON ARGS...
  local name=$1 out=$2; shift 2
  dense_for $R/eval_gemma3_h200.outputs.jsonl.gz $out
  step $name 500 python3 -m sgl_minference.tools.eval /tmp/models/gemma3-270m --depths 5 --samples 2 \
    --min-context 4096 --resume --out $out "$@"
}
[ -f /tmp/res/done.rechoose_gemma_99 ] && gemma_eval eval_gemma_t099 /tmp/res/eval_gemma3_h200_t099.json \
  --lengths 8192 16384 32512 --config /tmp/res/search_gemma3_h200_32k_t099_ks08.json
for s in 0.5 0.25; do
  gemma_eval eval_gemma_s$s /tmp/res/eval_gemma3_h200_default_s${s}_32k.json --lengths 32512 --budget-scale $s
done
step chunk_pairplan 200 python3 -m benchmarks.chunk_bench --model llama3-8b --length 128K --chunk 8K \
  --data planted,synthetic --launches 64x4x3,64x8x3p --out /tmp/res/chunk_h200_8b_128k_pairplan.json
step e2e_128k 560 python3 -m benchmarks.e2e_ttft --model llama3-8b --backends fa3,minference --lengths 128K \
  --scenarios single --structure dummy,synthetic --warmup-lens 4K,32K --reps 2 --rep-budget-s 45 --budget-s 520 \
  --out /tmp/res/e2e_h200_8b_128k_routing.json
[ -f /tmp/res/done.rechoose_gemma_995 ] && gemma_eval eval_gemma_t0995 /tmp/res/eval_gemma3_h200_t0995.json \
  --lengths 8192 16384 32512 --config /tmp/res/search_gemma3_h200_32k_t0995_ks08.json
step test_sglang_gpu 560 env SGL_MINFERENCE_TEST_MODEL=/tmp/models/smollm2 python3 -m pytest -m gpu \
  tests/test_sglang_gpu.py -q -p no:cacheprovider --junitxml=/tmp/res/test_sglang_gpu_smollm2_h200.xml
ls /tmp/res; pack
