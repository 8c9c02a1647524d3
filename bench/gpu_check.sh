#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py, about 4 minutes on an H200), its output teed to a log:
#   bash bench/gpu_check.sh [OUT_DIR] [bench.gpu_check options ...]
# writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.log (OUT_DIR default: outputs/gpu_check).
# On a machine without a GPU: bash bench/gpu_check.sh /tmp/gpu_check --device cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-outputs/gpu_check}"
if [ "$#" -gt 0 ]; then shift; fi
PY="${PY:-.venv/bin/python}"
if [ ! -x "$PY" ]; then PY=python; fi
mkdir -p "$OUT_DIR"
"$PY" -m bench.gpu_check --out "$OUT_DIR/gpu_check.json" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
