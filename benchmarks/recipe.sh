#!/usr/bin/env bash
# The recipe's choices, one at a time: short runs from the shipped weights that differ in one setting
# only (same seed, same 12,800 training images, 1 epoch, cosine from the peak rate to 0), judged on the
# 5,000-image validation hold-out.
#
#   CIFAR10_SOURCE=../shared/data/cifar10-jpeg.tar.gz bash benchmarks/recipe.sh [runs/recipe]
#
# Prints a markdown table: validation accuracy of B1, B10 and the mean over the exits, and images/s.
# Batch size: benchmarks/batch_size.py measures throughput alone; here the accuracy side (the learning
# rate scaled with the batch).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/recipe}
common=(--preset cifar10-anytime --epochs 1 --train-subset 12800 --weight-decay 5e-4 --schedule cosine
        --warmup-epochs 0.1 --seed 5 --val-size 5000 --eval-split val
        --init-from data/pretrained/msdnet-cifar10-anytime.pt)
variants=(
  "A-base:--batch-size 128 --lr 0.06 --label-smoothing 0.1"
  "B-batch64:--batch-size 64 --lr 0.03 --label-smoothing 0.1"
  "C-kd0.5-T3:--batch-size 128 --lr 0.06 --label-smoothing 0.1 --distill 0.5 --distill-temperature 3"
  "D-ls0.2:--batch-size 128 --lr 0.06 --label-smoothing 0.2"
  "E-kd0.8-T3:--batch-size 128 --lr 0.06 --label-smoothing 0.1 --distill 0.8 --distill-temperature 3"
  "F-kd0.5-T1:--batch-size 128 --lr 0.06 --label-smoothing 0.1 --distill 0.5 --distill-temperature 1"
)
for v in "${variants[@]}"; do
  name=${v%%:*}
  [ -f "$OUT/$name/log.jsonl" ] && continue  # done before: rerun by deleting its folder
  # shellcheck disable=SC2086
  python -m helpers.train "${common[@]}" ${v#*:} --out "$OUT/$name"
done
python - "$OUT" "${variants[@]}" <<'PY'
import json, sys
from pathlib import Path
out, variants = Path(sys.argv[1]), sys.argv[2:]
print("| run | settings (A: the baseline) | val B1 | val B10 | val mean B1..B10 | train images/s |")
print("|---|---|---|---|---|---|")
for v in variants:
    name, flags = v.split(":", 1)
    r = json.loads((out / name / "log.jsonl").read_text().splitlines()[-1])
    acc = r["acc"]
    print(f"| {name} | `{flags}` | {acc[0]:.2%} | {acc[-1]:.2%} | {sum(acc) / len(acc):.2%} | {r['train_images_per_s']:.1f} |")
PY
