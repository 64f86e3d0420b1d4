#!/usr/bin/env bash
# job H (session 10, second host): SmolLM2 only (parts q3 + q4 hold its GGUF, the stream's last 98,362,432 bytes).
# Issue 15: the fa3 reference of the cold run; then issue 17's calibrated SmolLM2 search with what is left.
. benchmarks/gpu_session/common.sh
export CALL_S=${CALL_S:-585}
if [ ! -f /tmp/res/done.smol ]; then
  python3 -c "import sglang, flashinfer, sgl_kernel.flash_attn, transformers, pydantic; print('imports ok')" \
    || { echo "MISSING IMPORTS"; exit 3; }
  step install 150 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
  cat /tmp/parts/m.* | tail -c 98362432 > /tmp/smollm2.gguf
  grep smollm2 benchmarks/gpu_session/models.md5 | md5sum -c - || exit 4
  step smol 200 python3 -m sgl_minference.tools.gguf_loader /tmp/smollm2.gguf /tmp/models/smollm2
fi
mkdir -p /tmp/res/logs
NEED=200 ONCE=1 step cold_smol_fa3 400 python3 -m benchmarks.multiturn.reliability cold --backend fa3 \
  --model /tmp/models/smollm2 --minference-config sgl_minference/configs/smollm2-135m.json \
  --context-length 135168 --disable-radix-cache --server-arg=--cuda-graph-backend-prefill=disabled \
  --startup-timeout-s 400 --log-dir /tmp/res/logs --out /tmp/res/rel_cold_smollm2_fa3_radixoff_h200.json
step search_smol_cal 570 python3 -m sgl_minference.tools.search /tmp/models/smollm2 \
  --length 7936 --density 0.25 0.4 0.6 0.8 --target-recall 0.98 --max-key-share 0.8 \
  --patterns a_shape vertical_slash block_sparse xattention flexprefill --min-context 1024 --device cuda \
  --calibration kv_retrieval@0.5 niah_single@0.5 niah_multikey@0.8 --tail-rows 64 --seed 1000 \
  -o /tmp/res/search_smollm2_h200_8k_cal_t098.json
ls /tmp/res; pack
