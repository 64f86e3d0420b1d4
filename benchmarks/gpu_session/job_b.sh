#!/usr/bin/env bash
# job B: SmolLM2 full evals of job A's two configs; Gemma-3 ladder search to 0.98 (key share 0.8), chosen again for 0.99
. benchmarks/gpu_session/common.sh
R=benchmarks/results
for t in t098 t099; do
  dense_for $R/eval_smollm2_h200.outputs.jsonl.gz /tmp/res/eval_smollm2_h200_$t.json
  [ -f /tmp/res/search_smollm2_h200_8k_$t.json ] && step eval_smol_$t 200 python3 -m sgl_minference.tools.eval \
    /tmp/models/smollm2 --lengths 2048 4096 7936 --depths 5 --samples 2 --min-context 1024 --resume \
    --config /tmp/res/search_smollm2_h200_8k_$t.json --out /tmp/res/eval_smollm2_h200_$t.json
done
step search_gemma 240 python3 -m sgl_minference.tools.search /tmp/models/gemma3-270m --length 32512 \
  --density 0.2 0.3 0.45 0.6 0.8 --target-recall 0.98 --max-key-share 0.8 \
  --patterns a_shape vertical_slash block_sparse xattention flexprefill --min-context 4096 --device cuda --no-progress \
  -o /tmp/res/search_gemma3_h200_32k_t098_ks08.json
for t in 99 995; do
  [ -f /tmp/res/done.search_gemma ] && step rechoose_gemma_$t 60 python3 -m sgl_minference.tools.search.rechoose \
    /tmp/res/search_gemma3_h200_32k_t098_ks08.json --target-recall 0.$t --max-key-share 0.8 \
    -o /tmp/res/search_gemma3_h200_32k_t0${t}_ks08.json
done
ls /tmp/res; pack
