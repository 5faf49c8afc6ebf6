#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv (or $IWSFT_VENV) with the project and every extra.
# torch is installed first as "torch==2.13.0" unless the venv already has a torch (e.g. a GPU node's CUDA build,
# which it keeps). From PyPI on a stock Linux x86-64 machine that is the CUDA build (several GB with its nvidia-*
# wheels; it also runs on CPU). IWSFT_TORCH_INDEX=URL takes torch from that index instead, e.g.
# IWSFT_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only build (opt-in: by default only
# PyPI, or whatever index the machine's pip config names, is used).
# Every other dependency is held to the versions CI tested (constraints.txt, `pip -c`): pyproject.toml keeps open
# ranges for library users. IWSFT_CONSTRAINTS=none resolves the newest releases instead (to refresh the file:
# see scripts/update_constraints.py); IWSFT_CONSTRAINTS=FILE uses another file. Relative paths in IWSFT_CONSTRAINTS
# and IWSFT_VENV are taken from the directory the script is called from; the defaults live in the checkout.
set -euo pipefail
abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
venv="${IWSFT_VENV:+$(abs "$IWSFT_VENV")}"
constraints="${IWSFT_CONSTRAINTS:-}"
if [ -n "$constraints" ] && [ "$constraints" != "none" ]; then constraints="$(abs "$constraints")"; fi
cd "$(dirname "$0")/.."
venv="${venv:-.venv}"
extras="${IWSFT_EXTRAS:-all}"
constraints="${constraints:-constraints.txt}"
pin=()
if [ "$constraints" != "none" ]; then
  [ -f "$constraints" ] || { echo "constraints file $constraints not found (IWSFT_CONSTRAINTS=none to resolve freely)"; exit 1; }
  pin=(-c "$constraints")
fi
torch_index=()
if [ -n "${IWSFT_TORCH_INDEX:-}" ]; then torch_index=(--index-url "$IWSFT_TORCH_INDEX"); fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q "torch==2.13.0" ${torch_index[@]+"${torch_index[@]}"} ${pin[@]+"${pin[@]}"}
fi
"$venv/bin/python" -m pip install -q -e ".[${extras}]" ${pin[@]+"${pin[@]}"}
echo "installed: $("$venv/bin/python" -c 'import torch, iwsft; print("iwsft", iwsft.__version__, "torch", torch.__version__)')" \
  "(constraints: ${constraints})"
