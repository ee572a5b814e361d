#!/usr/bin/env bash
# An offline wheelhouse for nodes with no network (HPC compute nodes, the borrowed GPU machines):
# run it where PyPI can be reached; it collects the wheels that the node's image lacks for
# trinityx-ds, for the node's Python and platform. The work is in tools/wheelhouse.py; --help says all.
#   tools/wheelhouse.sh --python 3.12 --base tools/wheelhouse/gpu_node_image.txt --out wheelhouse
# then, on the node, with no network:
#   python3 -m pip install --no-index --find-links wheelhouse trinityx-ds
# The helper runs under $PYTHON, else the project's .venv python (made by tools/setup_env.sh),
# else python3; DeepSpeed's build needs an interpreter with torch (--build-python, default .venv's).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then PY="$here/../.venv/bin/python"; else PY=python3; fi
fi
exec "$PY" "$here/wheelhouse.py" "$@"
