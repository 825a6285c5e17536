#!/usr/bin/env bash
# The recipe on one CUDA GPU in under 9 minutes (issue 15), ready for a lent GPU machine.
#
#   bash tools/gpu_train.sh                    # on the GPU machine, in the repository root
#   bash tools/gpu_train.sh --preset tiny --epochs 1 --device cpu --amp bf16   # the same path on a CPU
#
# Arguments are passed on to `python -m helpers.train` after the recipe's own (the last one wins).
# bf16 autocast and channels_last on CUDA, the training images held on the GPU and augmented there
# (helpers.train does both by itself on CUDA). --time-limit stops it cleanly (resumable) should the
# GPU be slower than planned. Writes to $OUT (default runs/gpu): train.log, and in $OUT/export the
# run's log.jsonl and the weights chosen on validation in half precision (best.pt, 10 MB: small
# enough to bring back), which `python -m helpers.pretrained export --run <that folder> --command "..."`
# turns into a card naming the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
RUN="$OUT/run"
SOURCE=${SOURCE:-data/mirror/cifar10-jpeg.tar.gz}   # copy ../shared/data/cifar10-jpeg.tar.gz here and carry data/mirror
mkdir -p "$OUT"
$PY -m helpers.train --preset cifar10-anytime --source "$SOURCE" --out "$RUN" \
  --epochs 40 --batch-size 128 --lr 0.1 --weight-decay 5e-4 --schedule cosine --warmup-epochs 1 \
  --label-smoothing 0.1 --distill 0.5 --distill-temperature 3 --ema 0.999 --seed 0 \
  --val-size 5000 --eval-split val --channels-last --time-limit 480 "$@" 2>&1 | tee "$OUT/train.log"
mkdir -p "$OUT/export"
cp "$RUN/log.jsonl" "$OUT/export/log.jsonl"
$PY - "$RUN/best.pt" "$OUT/export/best.pt" <<'PY'
import sys
from helpers import atomic, checkpoint
best = checkpoint.read(sys.argv[1])
best["model"] = {k: v.half() if v.is_floating_point() else v for k, v in best["model"].items()}
atomic.save(best, sys.argv[2])
print(f"{sys.argv[2]}: epoch {best['epoch']}, {best['weights']} weights, val per exit {best['val_accuracy_per_exit']}")
PY
