#!/usr/bin/env bash
# The shipped checkpoint's recipe on a CUDA GPU: the same command as on a CPU, with --device cuda and the
# GPU's speed options (bf16 autocast, channels_last, torch.compile), stopped cleanly after TIME_LIMIT seconds.
#
#   bash tools/gpu_train.sh                      # in the repository root of the GPU machine
#   TIME_LIMIT=30 bash tools/gpu_train.sh --preset tiny --epochs 1 --device cpu --amp off   # the same path on a CPU
#
# Extra arguments go to `msdnet train` after these (the last one wins). The run stays in $RUN, resumable by
# the same command; $OUT gets the console log, the run's log.jsonl and its best weights in half precision
# (small enough to bring back from a lent machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
RUN=${RUN:-runs/laptop}
mkdir -p "$OUT"
set +e
$PY -m helpers train --recipe laptop --out "$RUN" --device cuda --amp bf16 --channels-last --compile \
  --time-limit "${TIME_LIMIT:-480}" ${SOURCE:+--source "$SOURCE"} "$@" 2>&1 | tee "$OUT/train.log"
status=${PIPESTATUS[0]}
set -e
[ -f "$RUN/log.jsonl" ] && cp "$RUN/log.jsonl" "$OUT/log.jsonl"
[ -f "$RUN/best.pt" ] && $PY -m helpers checkpoint compact --weights "$RUN/best.pt" --out "$OUT/best-half.pt"
exit "$status"
