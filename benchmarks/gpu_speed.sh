#!/usr/bin/env bash
# Speed of every classification method on one GPU, in one command that fits in 10 minutes:
#
#   1. equivalence: bf16 autocast and channels_last (then torch.compile, last, with what time
#      is left) give the eager fp32 training step's loss and gradients within tolerance, for
#      every method (ResNet-20, 32 px);
#   2. step time of each method (ratio to standard, images/s, FLOP prediction, peak CUDA
#      memory) with `advfeat bench`: ResNet-20 at 32 px (batch 128), ResNet-50 at 224 px
#      (batch 64) in fp32, and ResNet-50 again with bf16 autocast + channels_last;
#      `alfa_inner` is ALFA at a site inside the last residual block (tail-only through the
#      captured frontier).
#
# Every part has its own time box; a part that fails or runs out of time is reported in
# $OUT/status.txt and the script goes on. Nothing is downloaded. From the repository root:
#
#   OUT=/tmp/gpu-speed bash benchmarks/gpu_speed.sh
#
# The tables end up in $OUT/gpu_speed.md. A CPU dry run with tiny sizes (checks the plumbing):
#
#   DEVICE=cpu TINY=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_speed.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-speed}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p "$OUT"
: > "$OUT/status.txt"
METHODS=standard,alfa,afan,advprop,fast-advprop,advbn,l-alfa,pgd-at,trades,mart,afa,alfa_inner=alfa
SETS=(--set alfa_inner.site=layer3.2.bn2 --set advprop.eps=1)
# torchvision writes the last BN of a bottleneck in place (out += identity): a conv site
R50_SETS=(--set alfa_inner.site=layer4.2.conv3 --set advprop.eps=1)
if [[ "${TINY:-0}" == 1 ]]; then
  R20=(--batch-size 4 --image-size 16 --iters 1 --warmup 0 --no-memory)
  R50=(--batch-size 2 --image-size 32 --iters 1 --warmup 0 --no-memory)
  CHECK=(--batch-size 2 --image-size 16)
  T_CHECK=120 T_R20=300 T_R50=300 T_R50_BF16=300 T_COMPILE=60
else
  R20=(--batch-size 128 --image-size 32 --iters 10 --warmup 3)
  R50=(--batch-size 64 --image-size 224 --iters 5 --warmup 2)
  CHECK=(--batch-size 32 --image-size 32)
  T_CHECK=80 T_R20=80 T_R50=150 T_R50_BF16=90 T_COMPILE=120
fi

part() {  # part NAME SECONDS COMMAND...: run with a time box, record how it ended
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  echo "== $name (time box ${seconds}s)"
  timeout --kill-after=10 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local msg="ok"
  if [[ $rc == 124 || $rc == 137 ]]; then msg="ran out of time"; elif [[ $rc != 0 ]]; then msg="failed (exit $rc)"; fi
  echo "$name: $msg after $((SECONDS - start)) s" | tee -a "$OUT/status.txt"
  tail -n 3 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'python', platform.python_version())"
} | tee "$OUT/machine.txt"

part check_bf16_channels_last "$T_CHECK" "$PY" benchmarks/gpu_speed.py check --device "$DEVICE" \
  "${CHECK[@]}" --variants bf16,channels_last --budget-s $((T_CHECK - 15)) --out "$OUT/checks.jsonl"
part bench_resnet20 "$T_R20" "$PY" -m advfeat.cli bench --model resnet20 "${R20[@]}" \
  --device "$DEVICE" --methods "$METHODS" "${SETS[@]}" --json "$OUT/bench_resnet20.json"
part bench_resnet50 "$T_R50" "$PY" -m advfeat.cli bench --model resnet50 "${R50[@]}" \
  --device "$DEVICE" --methods "$METHODS" "${R50_SETS[@]}" --json "$OUT/bench_resnet50.json"
part bench_resnet50_bf16_cl "$T_R50_BF16" "$PY" -m advfeat.cli bench --model resnet50 "${R50[@]}" \
  --device "$DEVICE" --methods "$METHODS" "${R50_SETS[@]}" --amp bf16 --channels-last \
  --json "$OUT/bench_resnet50_bf16_cl.json"
part check_compile "$T_COMPILE" "$PY" benchmarks/gpu_speed.py check --device "$DEVICE" \
  "${CHECK[@]}" --variants compile --budget-s $((T_COMPILE - 40)) --out "$OUT/checks.jsonl"

"$PY" benchmarks/gpu_speed.py table --checks "$OUT/checks.jsonl" --bench \
  "$OUT/bench_resnet20.json" "$OUT/bench_resnet50.json" "$OUT/bench_resnet50_bf16_cl.json" \
  > "$OUT/gpu_speed.md" 2>> "$OUT/status.txt"
{ echo; echo "machine:"; cat "$OUT/machine.txt"; echo; echo "parts:"; cat "$OUT/status.txt"; } >> "$OUT/gpu_speed.md"
cat "$OUT/gpu_speed.md"
