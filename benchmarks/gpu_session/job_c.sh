#!/usr/bin/env bash
# job C: Gemma-3 eval of the 0.99 config at 8K/16K/32K; the default config at budget scales 0.5 and 0.25 (32K)
. benchmarks/gpu_session/common.sh
R=benchmarks/results
dense_for $R/eval_gemma3_h200.outputs.jsonl.gz /tmp/res/eval_gemma3_h200_t099.json
[ -f /tmp/res/search_gemma3_h200_32k_t099_ks08.json ] && step eval_gemma_t099 330 python3 -m sgl_minference.tools.eval \
  /tmp/models/gemma3-270m --lengths 8192 16384 32512 --depths 5 --samples 2 --min-context 4096 --resume \
  --config /tmp/res/search_gemma3_h200_32k_t099_ks08.json --out /tmp/res/eval_gemma3_h200_t099.json
for s in 0.5 0.25; do
  dense_for $R/eval_gemma3_h200.outputs.jsonl.gz /tmp/res/eval_gemma3_h200_default_s${s}_32k.json
  step eval_gemma_s$s 200 python3 -m sgl_minference.tools.eval /tmp/models/gemma3-270m --lengths 32512 --depths 5 \
    --samples 2 --min-context 4096 --resume --budget-scale $s --out /tmp/res/eval_gemma3_h200_default_s${s}_32k.json
done
ls /tmp/res; pack
