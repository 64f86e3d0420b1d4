#!/usr/bin/env bash
# The dense baseline: the same server as serve_minference.sh with SGLang's FlashInfer backend.
#   MODEL=launch/models/llama3-8b PORT=30000 bash launch/serve_dense.sh [extra launch_server flags]
# DENSE_BACKEND=fa3 selects FlashAttention 3 (Hopper) instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-$here/models/llama3-8b}
PORT=${PORT:-30000}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
extra=()
[ "$LOAD_FORMAT" = dummy ] && extra+=(--skip-tokenizer-init)
exec python -m sglang.launch_server --model-path "$MODEL" --load-format "$LOAD_FORMAT" --port "$PORT" \
  --attention-backend "${DENSE_BACKEND:-flashinfer}" \
  --context-length "${CONTEXT_LENGTH:-262144}" "${extra[@]}" "$@"
