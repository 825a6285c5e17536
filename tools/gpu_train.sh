#!/usr/bin/env bash
# The recipe on one CUDA GPU within a time budget, ready for a lent GPU machine.
#
#   bash tools/gpu_train.sh                    # on the GPU machine, in the repository root
#   bash tools/gpu_train.sh --preset tiny --epochs 1 --device cpu --amp bf16   # the same path on a CPU
#   bash tools/gpu_train.sh --init-from data/pretrained/msdnet-cifar10-anytime.pt --batch-size 512 --lr 0.05 \
#     --schedule constant --warmup-epochs 0.5 --swa --ema 0 --fit-to 0 --time-limit 440   # SWA (docs/appendix.md)
#
# Arguments are passed on to `python -m helpers.train` after the recipe's own (the last one wins).
# bf16 autocast and channels_last on CUDA, the training images held on the GPU and augmented there
# (helpers.train does both by itself on CUDA). --fit-to times the first epoch and gives the cosine
# schedule the epochs that fit in 450 s, whatever the GPU (--epochs is only the ceiling);
# --time-limit stops it cleanly (resumable) should the later epochs run slower than the first.
# Writes to $OUT (default runs/gpu): train.log, and in $OUT/export the run's log.jsonl, the weights
# chosen on validation (best.pt) and the last epoch's trained weights (last.pt, without the optimizer
# and the average), both in half precision, small enough to bring back. That last.pt
# is for the export to compare, not to resume (it lacks the optimizer and the average).
# `python -m helpers.export --run <that folder> --command "..."` turns them into a card
# naming the GPU. The run itself (full precision, resumable) stays in $RUN (default $OUT/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
RUN=${RUN:-$OUT/run}
SOURCE=${SOURCE:-data/mirror/cifar10-jpeg.tar.gz}   # copy ../shared/data/cifar10-jpeg.tar.gz here and carry data/mirror
mkdir -p "$OUT"
$PY -m helpers.train --preset cifar10-anytime --source "$SOURCE" --out "$RUN" \
  --epochs 300 --fit-to 450 --batch-size 128 --lr 0.1 --weight-decay 5e-4 --schedule cosine --warmup-epochs 1 \
  --label-smoothing 0.1 --distill 0.5 --distill-temperature 3 --ema 0.999 --seed 0 \
  --val-size 5000 --eval-split val --channels-last --time-limit 500 "$@" 2>&1 | tee "$OUT/train.log"
mkdir -p "$OUT/export"
cp "$RUN/log.jsonl" "$OUT/export/log.jsonl"
$PY - "$RUN" "$OUT/export" <<'PY'
import sys
from pathlib import Path
from helpers import checkpoint
run, export = Path(sys.argv[1]), Path(sys.argv[2])
half = checkpoint.half
best = checkpoint.read(run / "best.pt")
best["model"] = half(best["model"])
checkpoint.write(best, export / "best.pt")
print(f"{export / 'best.pt'}: epoch {best['epoch']}, {best['weights']} weights, val per exit {best['val_accuracy_per_exit']}")
# The last epoch's trained weights: at the end of the schedule they can beat their lagging average,
# and the export compares the two on validation. The optimizer and the average stay behind (size).
last = {k: v for k, v in checkpoint.read(run / "last.pt").items() if k not in ("optimizer", "scaler", "average")}
last["model"] = half(last["model"])
checkpoint.write(last, export / "last.pt")
print(f"{export / 'last.pt'}: epoch {last['epoch']}, batch {last['batch_in_epoch']}")
PY
