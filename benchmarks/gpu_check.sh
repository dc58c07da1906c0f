#!/usr/bin/env bash
# One GPU check in one command, at most 9 minutes wall (TOTAL_S), every part time-boxed:
#
#   a. environment (nvidia-smi, torch / CUDA versions, whether the CUDA MPS daemon can start)
#      and parity: bf16 autocast, channels_last and torch.compile against eager fp32, per
#      method, on the loss, the gradient, L_adv − L_clean and the perturbation δ itself;
#      then the trainer's captured steps (`cuda_graph`) against its eager steps, per method
#      (standard, ALFA, A-FAN): weights and loss after 2 epochs, seconds per step;
#   b. speed: `advfeat bench --order sequential` (rows kept as each method finishes) for every
#      method on ResNet-20 (32 px, batch 128, bf16, steps captured as CUDA graphs where the
#      method allows: `--cuda-graph`) and ResNet-50 (224 px, batch 256, bf16 +
#      channels_last, synthetic data on the device), beside the chip's limit (the measured bf16
#      matmul rate ÷ the step's training FLOPs per image); then several seeds of `standard`
#      ResNet-20 packed into one model (stacked weights, vmap) against the same seeds stepped
#      one after another, both captured (benchmarks/gpu_check_packing.py);
#   c. the papers' protocol: ResNet-20 on CIFAR-10 JPEG, standard / ALFA / A-FAN in their
#      Table 2 configurations, seeds 0-2, `--recipe afan`; a probe times a few steps of each
#      arm, the largest epoch count ≤ 200 that fits in the time left is trained (seed-major, each
#      run checkpointed every epoch, stopped at the time box), and `advfeat compare
#      --report-only` tabulates the finished runs beside the papers' numbers. The runs capture
#      their steps (`cuda_graph=auto`) and share the GPU through the CUDA MPS daemon when part
#      a found that a client runs through it (MPS=0 turns that off);
#   d. the ViT arms of docs/results.md section 15 (ViT-Tiny, patch 4, depth 4; standard, ALFA,
#      A-FAN, AdvProp with its auxiliary LayerNorm separate and shared; seeds 0-2, all at once;
#      VIT_EPOCHS epochs, T_D seconds), tabulated by `advfeat compare --report-only`.
#
# Everything is written to a scratch folder (SCRATCH); OUT receives at most 8 files: summary.md,
# results.tar.gz (every log, JSON and table; no checkpoints) and a few small files. The short
# table printed last says how each part ended. From the repository root, nothing downloaded:
#
#   DATA=data OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# DATA holds cifar10-jpeg.zip (without it part c trains on generated `shapes` images). A tiny run
# on the CPU (a few methods and steps per part, tiny sizes, `shapes` data) checks the plumbing:
#
#   TINY=1 DEVICE=cpu OUT=/tmp/gpu-check-tiny bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT=${OUT:?set OUT to the folder that receives the results}
DATA=${DATA:-data}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
TINY=${TINY:-0}
MPS=${MPS:-1}
export PYTHONPATH=${PYTHONPATH:-src}
SCRATCH=${SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$OUT" "$SCRATCH"
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$SCRATCH/cache}  # the decoded JPEG cache
: > "$SCRATCH/status.txt"
: > "$SCRATCH/parity.jsonl"

METHODS=standard,alfa,afan,l-alfa,advbn,advprop,fast-advprop,pgd-at,trades,mart,afa
# bench: cheap methods first, AFA (4 PGD-10 attacks per step) last
BENCH_METHODS=standard,alfa,afan,fast-advprop,advprop,advbn,l-alfa,alfa_inner=alfa,pgd-at,trades,mart,afa
if [[ "$TINY" == 1 ]]; then  # the plumbing only: a few methods, tiny sizes, one seed
  TOTAL_S=${TOTAL_S:-280} T_A=${T_A:-70} T_B=${T_B:-45}
  METHODS=alfa,afan,l-alfa,advbn,pgd-at
  PARITY=(--batch-size 2 --image-size 8 --variants bf16 --tiny)
  GRAPHS=(--batch-size 4 --image-size 8 --steps 2 --cpu-replay)
  T_GRAPHS=30
  R20=(--batch-size 2 --image-size 8 --iters 1 --warmup 0 --no-memory
       --methods standard,alfa,alfa_inner=alfa)
  R50=()  # not run: the same code as ResNet-20, at a cost this CPU cannot spare
  PACKING=(--seeds 2 --batch-size 4 --image-size 8 --check-steps 1 --warmup 1 --steps 1
           --rounds 1 --cpu-replay)
  T_PACK=20
  PAPER=(--tiny --shapes --seeds 0 --jobs 3 --probe-steps 1 --max-epochs 2 --reserve-s 12
         --probe-s 40)
  T_R20=$(( T_B - T_PACK ))
  T_D=${T_D:-45} VIT=(--tiny --seeds 0 --jobs 5 --epochs 1 --depth 1 --reserve-s 8)
else
  TOTAL_S=${TOTAL_S:-540} T_A=${T_A:-110} T_B=${T_B:-125}
  METHODS=${PARITY_METHODS:-$METHODS}
  PARITY=(--batch-size 32 --image-size 32 --variants "${PARITY_VARIANTS:-bf16,channels_last,compile}")
  GRAPHS=(--batch-size 128 --image-size 32 --steps 40)
  T_GRAPHS=${T_GRAPHS:-70}
  R20=(--batch-size 128 --image-size 32 --iters 5 --warmup 2 --amp bf16 --cuda-graph
       --methods "$BENCH_METHODS")
  R50=(--batch-size 256 --image-size 224 --iters 3 --warmup 1 --amp bf16 --channels-last
       --methods "${R50_METHODS:-$BENCH_METHODS}")
  # JOBS=9: the nine runs at once (through MPS), the probe at the same concurrency
  PAPER=(--seeds 0 1 2 --jobs "${JOBS:-9}" --probe-steps 100 --max-epochs 200 --reserve-s 25)
  PACKING=(--seeds 3,9 --batch-size 128 --image-size 32)
  T_PACK=${T_PACK:-25}
  T_R20=${T_R20:-$(( (T_B - T_PACK) * 3 / 5 ))}
  T_D=${T_D:-100} VIT=(--epochs "${VIT_EPOCHS:-3}")
fi
SETS=(--set alfa_inner.site=layer3.2.bn2)
[[ "$TINY" == 1 ]] || SETS+=(--set advprop.eps=1)
R50_SETS=(--set alfa_inner.site=layer4.2.conv3 --set advprop.eps=1)  # bottleneck adds in place
[[ -n "${R50_METHODS:-}" ]] && R50_SETS=()  # a chosen list may leave those labels out
PACK_S=15  # summary, tar and copy
DEADLINE=$(( $(date +%s) + TOTAL_S - PACK_S ))

left() { echo $(( START + TOTAL_S - PACK_S - SECONDS )); }
part() {  # part NAME SECONDS COMMAND...: run with a time box, record how it ended
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  (( seconds > $(left) )) && seconds=$(left)
  if (( seconds < 3 )); then
    echo "$name: not run (no time left)" | tee -a "$SCRATCH/status.txt"
    return
  fi
  echo "== $name (time box ${seconds}s)"
  timeout --kill-after=5 "$seconds" "$@" > "$SCRATCH/$name.log" 2>&1
  local rc=$?
  local msg="ok"
  if [[ $rc == 124 || $rc == 137 ]]; then msg="ran out of time"; elif [[ $rc != 0 ]]; then msg="failed (exit $rc)"; fi
  echo "$name: $msg after $((SECONDS - start)) s (box ${seconds} s)" | tee -a "$SCRATCH/status.txt"
}

mps_check() {  # can the CUDA MPS control daemon start? (started in a private pipe folder, stopped)
  if ! command -v nvidia-cuda-mps-control > /dev/null; then
    echo "MPS: nvidia-cuda-mps-control not present"
    return
  fi
  local pipe="$SCRATCH/mps-pipe" logs="$SCRATCH/mps-log"
  mkdir -p "$pipe" "$logs"
  if CUDA_MPS_PIPE_DIRECTORY=$pipe CUDA_MPS_LOG_DIRECTORY=$logs timeout 10 nvidia-cuda-mps-control -d; then
    echo "MPS: control daemon started"
    CUDA_MPS_PIPE_DIRECTORY=$pipe timeout 20 "$PY" -c \
      "import torch; torch.ones(1, device='cuda').sum().item(); print('MPS: a CUDA client ran through it')" \
      || echo "MPS: a CUDA client failed through it"
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$pipe timeout 10 nvidia-cuda-mps-control \
      && echo "MPS: daemon stopped" || echo "MPS: stopping the daemon failed"
  else
    echo "MPS: the control daemon did not start (exit $?)"
  fi
  tail -n 3 "$logs/control.log" 2>/dev/null | sed 's/^/MPS log: /'
}

env_part() {
  nvidia-smi 2>&1 | head -n 20 || echo "no nvidia-smi"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'python', platform.python_version())"
  if [[ "$DEVICE" == cuda* ]]; then mps_check; else echo "MPS: not checked (DEVICE=$DEVICE)"; fi
}

# decode the JPEG zip into the cache while parts a and b use the GPU (CPU only)
if [[ "$TINY" != 1 && -f "$DATA/cifar10-jpeg.zip" ]]; then
  nice "$PY" -c "from advfeat.data import build_dataset; build_dataset('cifar10-jpeg', root='$DATA')" \
    > "$SCRATCH/decode.log" 2>&1 &
fi

# ---- a. environment and parity
A_START=$SECONDS
export -f env_part mps_check
export SCRATCH PY DEVICE
part a_env 30 bash -c env_part
cp "$SCRATCH/a_env.log" "$SCRATCH/env.txt"
P_BOX=$(( T_A - T_GRAPHS - (SECONDS - A_START) ))
part a_parity "$P_BOX" "$PY" benchmarks/gpu_check.py parity \
  --device "$DEVICE" "${PARITY[@]}" --methods "$METHODS" \
  --budget-s $(( P_BOX - 8 )) --env "$SCRATCH/env.json" --out "$SCRATCH/parity.jsonl"
part a_graphs "$T_GRAPHS" "$PY" benchmarks/gpu_check_graphs.py --device "$DEVICE" "${GRAPHS[@]}" \
  --budget-s $(( T_GRAPHS * 3 / 5 )) --out "$SCRATCH/graphs.jsonl"

# ---- b. speed
B_START=$SECONDS
part b_packing "$T_PACK" "$PY" benchmarks/gpu_check_packing.py --device "$DEVICE" "${PACKING[@]}" \
  --budget-s $(( T_PACK * 2 / 5 )) --out "$SCRATCH/packing.jsonl"
part b_bench_resnet20 "$T_R20" "$PY" -m advfeat.cli bench --model resnet20 "${R20[@]}" \
  --device "$DEVICE" "${SETS[@]}" --order sequential --json "$SCRATCH/bench_resnet20.json"
if (( ${#R50[@]} )); then
  part b_bench_resnet50 $(( T_B - (SECONDS - B_START) )) "$PY" -m advfeat.cli bench --model resnet50 \
    "${R50[@]}" --device "$DEVICE" "${R50_SETS[@]}" --order sequential \
    --json "$SCRATCH/bench_resnet50.json"
else
  echo "b_bench_resnet50: not run (TINY)" | tee -a "$SCRATCH/status.txt"
fi

# ---- c. the papers' protocol, until the deadline (through MPS when a client ran through it)
if [[ "$MPS" == 1 && "$DEVICE" == cuda* ]] && grep -q "a CUDA client ran through it" "$SCRATCH/env.txt"; then
  export CUDA_MPS_PIPE_DIRECTORY="$SCRATCH/mps-pipe" CUDA_MPS_LOG_DIRECTORY="$SCRATCH/mps-log"
  if timeout 10 nvidia-cuda-mps-control -d; then
    echo "c: the runs share the GPU through MPS" | tee -a "$SCRATCH/status.txt"
  else
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
part c_paper $(( $(left) - T_D )) "$PY" benchmarks/gpu_check.py paper --scratch "$SCRATCH" \
  --data "$DATA" --device "$DEVICE" --deadline $(( DEADLINE - T_D )) "${PAPER[@]}"

# ---- d. the ViT arms (docs/results.md section 15), until the deadline
part d_vit $(( $(left) )) "$PY" benchmarks/gpu_check_vit.py --scratch "$SCRATCH" --data "$DATA" \
  --device "$DEVICE" --deadline "$DEADLINE" "${VIT[@]}"

if [[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]]; then
  echo quit | timeout 10 nvidia-cuda-mps-control || true
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi

# ---- summary and packing (no checkpoints, no decoded data)
"$PY" benchmarks/gpu_check.py summary --scratch "$SCRATCH" --out "$SCRATCH/summary.md" \
  > "$SCRATCH/short.txt" 2> "$SCRATCH/summary.log"
tar -C "$SCRATCH" --exclude='*.pt' --exclude='cache' --exclude='mps-pipe' -czf "$OUT/results.tar.gz" . 2>/dev/null
for f in summary.md parity.jsonl graphs.jsonl env.json bench_resnet20.json bench_resnet50.json; do
  [[ -f "$SCRATCH/$f" ]] && cp "$SCRATCH/$f" "$OUT/"
done
[[ -f "$SCRATCH/paper/compare.md" ]] && cp "$SCRATCH/paper/compare.md" "$OUT/compare.md"
echo
echo "scratch: $SCRATCH; results: $OUT ($(ls "$OUT" | wc -l) files); $((SECONDS - START)) s"
cat "$SCRATCH/summary.log" 2>/dev/null | tail -n 5
cat "$SCRATCH/short.txt"
