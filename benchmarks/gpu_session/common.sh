# sourced by the jobs: environment, resumable steps, results packed after each step
export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1
mkdir -p /tmp/res
pack() { tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null || true; }
# [NEED=S] [ONCE=1] step NAME TIMEOUT_S CMD... : skipped when /tmp/res/done.NAME exists
step() {
  local name=$1 t=$2; shift 2
  if [ -f /tmp/res/done.$name ]; then echo "== $name: done before, skipped"; return 0; fi
  # CALL_S: this device call's own limit; a step gets what is left of it (resumable steps go on next call).
  # NEED: the least a step that cannot resume must have left to start (default 60 s), else it waits for the next call
  if [ -n "$CALL_S" ]; then
    local left=$((CALL_S - SECONDS))
    if [ $left -lt "${NEED:-60}" ]; then echo "== $name: ${left}s left in this call, next call"; return 0; fi
    [ $left -lt $t ] && t=$left
  fi
  echo "== $name: start $(date -u +%H:%M:%S) (limit ${t}s)"
  local s=$SECONDS rc=0
  timeout "$t" "$@" > /tmp/res/$name.log 2>&1 || rc=$?
  echo "== $name: rc=$rc in $((SECONDS - s)) s"
  # a killed eval leaves SGLang's scheduler processes holding the GPU
  [ $rc -ne 0 ] && { pkill -9 -f "sglang::" || true; pkill -9 -f "sgl_minference.tools" || true; sleep 2; }
  tail -n 25 /tmp/res/$name.log
  # ONCE=1: a test or check, whose failure is its result: done either way (a timeout, 124, excepted)
  { [ $rc -eq 0 ] || { [ -n "$ONCE" ] && [ $rc -ne 124 ]; }; } && touch /tmp/res/done.$name
  pack
  return 0
}
# dense outputs of the earlier runs, placed where --resume finds them for OUT.json
dense_for() { [ -f "${2%.json}.outputs.jsonl" ] || gunzip -c "$1" > "${2%.json}.outputs.jsonl"; }
# a fresh host after staging: the staged imports (pydantic: a missing w1 chunk), the project, the two models
setup_host() {
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -c "import sglang, flashinfer, sgl_kernel, transformers, gguf, accelerate, pydantic; import sgl_kernel.flash_attn; print('imports ok', sglang.__version__, transformers.__version__)" || { echo "MISSING IMPORTS"; exit 3; }
  step install 150 python3 -m pip install --no-deps --no-build-isolation --no-index -e .
  step models 400 bash benchmarks/gpu_session/models.sh
}
