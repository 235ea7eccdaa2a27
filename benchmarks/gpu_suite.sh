#!/usr/bin/env bash
# One GPU run of every accelerator benchmark, in under 6 minutes on one H100/H200:
# LoRA vs PEFT at a 1B shape (bf16, d=2048 x 16 layers, 4 x 1024 tokens) and at a
# launch-bound shape (d=512 x 8, 4 x 128), the same with LoRA dropout 0.05 (our own mask
# draws and autograd path on CUDA), the torch.compile'd train step, and LoRA on a
# bitsandbytes NF4 base against PEFT's QLoRA (bf16 compute, CUDA memory).
# Tables land in benchmarks/results/gpu/ with date, device and versions (the harness,
# `python -m benchmarks`, writes them). Run from the repository root:
#
#   bash benchmarks/gpu_suite.sh            # on a machine with CUDA
#   bash benchmarks/gpu_suite.sh --dry-run  # CPU, tiny shapes: checks the script works
#
# Each step has its own time limit, so one slow step cannot eat the others' budget.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu
scale=1
if [[ "${1:-}" == "--dry-run" ]]; then
  out=benchmarks/out/gpu-dry-run
  scale=6  # 2 shared CPU cores and a cold inductor cache: the limits are for a GPU
  device=(--device cpu --dtype float32 --quick --no-memory)
  big=() small=() compiled=()
  qlora=(--quick)
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
  device=(--device cuda --dtype bfloat16)
  big=(--hidden 2048 --layers 16 --intermediate 5504 --heads 16 --vocab 32000 --batch 4 --seq 1024 --rounds 7)
  small=(--hidden 512 --layers 8 --intermediate 1376 --heads 8 --vocab 32000 --batch 4 --seq 128 --rounds 9)
  qlora=(--device cuda --dtype bfloat16)
  compiled=(--hidden 1024 --layers 8 --intermediate 2752 --heads 8 --vocab 32000 --batch 4 --seq 512)
fi
mkdir -p "$out"
rm -f "$out"/*.failed  # from an earlier run
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$(($2 * scale))
  shift 2
  echo "== $name (limit ${limit}s)"
  if ! timeout "$limit" "$@" --out "$out/$name.md"; then
    echo "!! $name failed or ran past ${limit}s" | tee "$out/$name.failed"
  fi
}
step lora_1b 150 python -m benchmarks --method lora "${device[@]}" "${big[@]}"
step lora_launch_bound 45 python -m benchmarks --method lora "${device[@]}" "${small[@]}"
step lora_dropout 35 python -m benchmarks --method lora "${device[@]}" "${small[@]}" --dropout 0.05
step compiled 80 python -m benchmarks --method compiled "${device[@]}" "${compiled[@]}"
step qlora 50 python -m benchmarks --method qlora "${qlora[@]}"
ls -l "$out"
