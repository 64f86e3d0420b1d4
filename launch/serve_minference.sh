#!/usr/bin/env bash
# SGLang server with the minference backend (sparse long-context prefill, dense decode).
#   MODEL=launch/models/llama3-8b PORT=30000 bash launch/serve_minference.sh [extra launch_server flags]
# Dummy weights and no tokenizer for the bundled model configs (send input_ids); set LOAD_FORMAT=auto and a
# real MODEL for a real checkpoint. The sparse config is the built-in default unless MINFERENCE_CONFIG (JSON
# object, see sgl_minference/config.py) or SGL_MINFERENCE_CONFIG (a file) says otherwise. The plugin turns
# the prefill CUDA graph off for this backend; decode CUDA graphs run as usual.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-$here/models/llama3-8b}
PORT=${PORT:-30000}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
MINFERENCE_CONFIG=${MINFERENCE_CONFIG:-'{}'}
extra=()
[ "$LOAD_FORMAT" = dummy ] && extra+=(--skip-tokenizer-init)
exec python -m sglang.launch_server --model-path "$MODEL" --load-format "$LOAD_FORMAT" --port "$PORT" \
  --attention-backend minference \
  --json-model-override-args "{\"minference\": $MINFERENCE_CONFIG}" \
  --context-length "${CONTEXT_LENGTH:-262144}" "${extra[@]}" "$@"
