#!/usr/bin/env bash
# Does our GPU run equal our CPU run? tools/gpu_check.py's table (its docstring says what each row
# compares and why those tolerances), started the way a bare GPU node needs:
#   tools/gpu_check.sh [--wheelhouse DIR] [--device cpu] [--json FILE] [--only PIECES] [--deadline S]
# 1. Interpreter: $PYTHON, else the checkout's .venv/bin/python where it exists, else python3 (a
#    GPU node's image: no .venv there). Give PYTHON=... where .venv's torch has no CUDA but
#    python3's has.
# 2. Wheelhouse (--wheelhouse DIR, else .whl/ in the checkout when it exists; made by
#    tools/wheelhouse.sh): when a module the check needs is missing, its wheels (not trinityx-ds's:
#    the checkout is what is checked) are installed with no network into $TRINITYX_SITE
#    [/tmp/trinityx-site/site-packages: "site-packages" in the path, or dill, which datasets hashes
#    with, pickles those modules by value and fails], put on PYTHONPATH after the checkout, its
#    bin/ on PATH (ninja). A site from an earlier call on the same machine is reused. The first
#    piece (imports) then imports everything once, so the pieces do not each compile the bytecode.
# 3. gpu_check.py's gates, one line each and a non-zero exit: modules still missing (all named;
#    exit 2), torch without CUDA (exit 3) unless --device cpu (the whole check CPU against CPU).
# 4. The pieces, each with its budget, in sessions of their own; the whole call is capped at
#    $GPU_CHECK_LIMIT seconds [470, wheelhouse install included] by an outer `timeout`, the last
#    resort (the pieces' --deadline ends 25 s before it; SIGTERM prints the table so far).
#    --device cpu has no cap.
# Exit 0 only when every row is OK. The rows also go to --json [$OUT/gpu_check.json, else ./gpu_check.json].
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LIMIT=${GPU_CHECK_LIMIT:-470}
wheels="" device=cuda deadline="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) wheels="${2:-}"; shift 2 || shift ;;
    --wheelhouse=*) wheels="${1#*=}"; shift ;;
    --device) device="${2:-}"; args+=("$1" "${2:-}"); shift 2 || shift ;;
    --device=*) device="${1#*=}"; args+=("$1"); shift ;;
    --deadline|--deadline=*) deadline=given; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$wheels" ] && [ -d "$ROOT/.whl" ]; then wheels="$ROOT/.whl"; fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
SITE=${TRINITYX_SITE:-/tmp/trinityx-site/site-packages}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$wheels" ]; then
  [ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$SITE/bin:$PATH"
  if ! "$PY" "$ROOT/tools/gpu_check.py" --missing >/dev/null 2>&1; then
    shopt -s nullglob
    whl=()
    for f in "$wheels"/*.whl; do case "$(basename "$f")" in trinityx_ds-*) ;; *) whl+=("$f") ;; esac; done
    if [ ${#whl[@]} -eq 0 ]; then
      echo "gpu_check: --wheelhouse $wheels: no wheels there"; exit 2
    fi
    log=$(mktemp)
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
         "${whl[@]}" >"$log" 2>&1; then
      echo "gpu_check: installing ${#whl[@]} wheels of $wheels into $SITE failed: $(grep -v '^\s*$' "$log" | tail -n 1)"
      exit 2
    fi
    rm -f "$log"
    case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$SITE" PATH="$SITE/bin:$PATH" ;; esac
  fi
fi
if [ "$device" = cpu ]; then
  exec "$PY" "$ROOT/tools/gpu_check.py" ${args[@]+"${args[@]}"}
fi
left=$((LIMIT - SECONDS))
[ -z "$deadline" ] && args+=(--deadline "$((left - 25))")
exec timeout --kill-after=10 "$left" "$PY" "$ROOT/tools/gpu_check.py" ${args[@]+"${args[@]}"}
