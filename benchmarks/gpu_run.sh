#!/usr/bin/env bash
# The GPU measurement of issue 2 in one command, for a lent device machine (see benchmarks/RESULTS.md,
# "GPU measurement"). That machine has torch + CUDA but no network: the missing packages travel as wheels in the
# git-ignored folder .whl/ (fetched beforehand with the `pip download` command in RESULTS.md). From the repo root:
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=540)
#
# Writes to $OUT (at most 8 files come back): console.log, table.md, results.json, one log per variant and
# loss_22k.json.
# Expected wall time on one H100: about 6 minutes (wheels ~20 s, assets ~30 s, 4 runs of ~60 s each, then the
# fused-vs-chunked loss benchmark at T = 22,000, V = 152,064, d = 5,120 bf16, ~1 min).
# Extra arguments are passed to bench_gpu.py (e.g. `bash benchmarks/gpu_run.sh --steps 4 --variants sft,iwsft_model`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/iwsft_gpu_out}
mkdir -p "$OUT"

main() {
ls .whl/*.whl >/dev/null 2>&1 || {
    echo "no wheels in .whl/: run the pip download command of benchmarks/RESULTS.md and carry .whl"; return 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || return 3
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF' || return 4
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for p in ("torchtune", "torchao", "torchdata", "omegaconf", "datasets", "pyarrow", "fsspec", "huggingface_hub",
          "tokenizers", "safetensors", "transformers", "kagglehub"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} MISSING")
import torchtune, torchtune._cli.tune, datasets, omegaconf, torchdata.stateful_dataloader  # fail fast, not per run
EOF

python3 benchmarks/bench_gpu.py --device cuda --shape 1.5b --seq-len 8192 --steps 8 --warmup-steps 1 \
    --batch-size 1 --grad-accum 4 --timeout 180 --out "$OUT" --work /tmp/iwsft_bench "$@"
rc=$?

# Issue 12: the loss alone at the paper's 32B shape (one 22,000-token sequence, V = 152,064, d = 5,120, bf16):
# torchtune's chunked CE vs iw-SFT on chunked logits vs the fused path (and cut-cross-entropy if its wheel is in
# .whl/). fwd+bwd time (median of 3, CUDA-synchronised) and torch.cuda.max_memory_allocated per variant; about
# 1 minute. Output: its table in console.log, loss_22k.json in $OUT (8 files in all come back).
python3 benchmarks/bench_loss.py --device cuda --dtype bf16 --batch 1 --seq 22000 --vocab 152064 --dim 5120 \
    --chunks 16 --repeats 3 --json "$OUT/loss_22k.json"
rc2=$?
[ "$rc" -eq 0 ] && rc=$rc2
df -h /tmp | tail -1
return $rc
}

main "$@" 2>&1 | tee "$OUT/console.log"
exit "${PIPESTATUS[0]}"
