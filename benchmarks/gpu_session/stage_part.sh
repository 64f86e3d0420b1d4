#!/usr/bin/env bash
# copy one model part folder's pieces to /tmp/parts (the job concatenates them)
set -euo pipefail
mkdir -p /tmp/parts
cp "$1"/m.* /tmp/parts/
ls -la /tmp/parts
