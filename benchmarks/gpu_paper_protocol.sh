#!/usr/bin/env bash
# The papers' CIFAR-10 protocol (ALFA §4.1 / A-FAN S2.1) on one GPU: ResNet-20 on CIFAR-10 (JPEG),
# standard vs alfa vs afan, seeds 0-2, SGD lr 0.1 momentum 0.9 weight decay 5e-4, batch 128,
# step decay x0.1 at 1/4 and 3/4 of the run, linear warm-up over the first 200 iterations.
#
# The papers train 200 epochs; this script trains EPOCHS (default 30) so that the nine runs,
# all at once on one GPU, fit in about ten minutes of device time. It is an ordinary
# `advfeat compare`: re-running it with the same OUT resumes unfinished runs, and a larger
# EPOCHS needs a new OUT. Usage, from the repository root:
#
#   DATA=data OUT=/tmp/paper EPOCHS=30 bash benchmarks/gpu_paper_protocol.sh
#
# DATA is the folder holding cifar10-jpeg.zip. The script stops itself after BUDGET_S seconds
# (default 540) and still writes the table of the runs finished by then.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
OUT=${OUT:-runs/paper-protocol}
EPOCHS=${EPOCHS:-30}
BUDGET_S=${BUDGET_S:-540}
PY=${PY:-python3}
export PYTHONPATH=${PYTHONPATH:-src}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
args=(--methods standard,alfa,afan --seeds 0 1 2 --dataset cifar10-jpeg --data-dir "$DATA"
      --epochs "$EPOCHS" --batch-size 128 --lr 0.1 --device cuda
      --set schedule=multistep --set "milestones=[0.25, 0.75]" --set warmup_steps=200
      --set eval_every=5 --set eval_shifted=false --set workers=2
      --out "$OUT" --jobs 9 --threads 1)
timeout "$BUDGET_S" "$PY" -m advfeat.cli compare "${args[@]}" || true
"$PY" -m advfeat.cli compare "${args[@]}" --report-only
