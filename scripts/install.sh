#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv (or $IWSFT_VENV) with the project and every extra.
# CPU machines get torch's 2.13.0 CPU build first (a plain range would resolve to a multi-GB CUDA build);
# a machine that already has torch in the venv (e.g. a GPU node's CUDA build) keeps it.
# Every other dependency is held to the versions CI tested (constraints.txt, `pip -c`): pyproject.toml keeps open
# ranges for library users. IWSFT_CONSTRAINTS=none resolves the newest releases instead (to refresh the file:
# see scripts/update_constraints.py); IWSFT_CONSTRAINTS=FILE uses another file.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${IWSFT_VENV:-.venv}"
extras="${IWSFT_EXTRAS:-all}"
constraints="${IWSFT_CONSTRAINTS:-constraints.txt}"
pin=()
if [ "$constraints" != "none" ]; then
  [ -f "$constraints" ] || { echo "constraints file $constraints not found (IWSFT_CONSTRAINTS=none to resolve freely)"; exit 1; }
  pin=(-c "$constraints")
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q "torch==2.13.0" ${pin[@]+"${pin[@]}"}
fi
"$venv/bin/python" -m pip install -q -e ".[${extras}]" ${pin[@]+"${pin[@]}"}
echo "installed: $("$venv/bin/python" -c 'import torch, iwsft; print("iwsft", iwsft.__version__, "torch", torch.__version__)')" \
  "(constraints: ${constraints})"
