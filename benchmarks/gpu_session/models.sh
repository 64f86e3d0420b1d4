#!/usr/bin/env bash
set -euo pipefail
cat /tmp/parts/m.* > /tmp/stream.bin
ls -la /tmp/stream.bin
head -c 253113024 /tmp/stream.bin > /tmp/gemma.gguf
tail -c 98362432 /tmp/stream.bin > /tmp/smollm2.gguf
md5sum /tmp/gemma.gguf /tmp/smollm2.gguf
md5sum -c benchmarks/gpu_session/models.md5
rm -f /tmp/stream.bin
python3 -m sgl_minference.tools.gguf_loader /tmp/gemma.gguf /tmp/models/gemma3-270m
python3 -m sgl_minference.tools.gguf_loader /tmp/smollm2.gguf /tmp/models/smollm2
ls -la /tmp/models/*
