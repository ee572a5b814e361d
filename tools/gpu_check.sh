#!/usr/bin/env bash
# The GPU checks of issue #14 in one table: backbone parity against transformers on CUDA (fp32,
# bf16), sdpa vs eager, stage-1 and stage-2 ZeRO-3 training steps at world size 1, bench_gpu's
# MFU and memory, bench_attention's memory and time. About 6 minutes on one H100/H200, capped at 8.
#   tools/gpu_check.sh               # on the GPU machine
#   tools/gpu_check.sh --device cpu  # the same code paths on CPU at tiny sizes (no time cap)
# Without a GPU (and without --device cpu) it prints why and runs nothing.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--device" ] && [ "${2:-}" = "cpu" ]; then
  exec "$PY" tools/gpu_check.py "$@"
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch here (torch.cuda.is_available() is False): nothing run." \
       "tools/gpu_check.sh --device cpu runs the same code paths on CPU at tiny sizes."
  exit 0
fi
exec timeout --kill-after=10 480 "$PY" tools/gpu_check.py "$@"  # gpu_check.py keeps its pieces within 450 s
