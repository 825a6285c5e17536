#!/usr/bin/env bash
# Re-execute the notebooks in full mode, in place, as they are committed; then drop the stored
# progress bars. Two lanes of one thread each, so every notebook's stated run time is "on one
# thread while another notebook ran on the second core". Order: 04, 05 and 07 read the predictions
# notebook 03 caches, 08 the maps notebook 06 caches.
#
#   CIFAR10_SOURCE=path/to/cifar10-jpeg.tar.gz bash tools/execute_notebooks.sh [NN ...]
#
# With numbers (e.g. `03 04`), only those notebooks run, one after the other. Each notebook's wall
# time is printed and appended to ${TIMES:-/tmp/execute_notebooks.times}.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CIFAR10_SOURCE:?set CIFAR10_SOURCE to the CIFAR-10 copy (see the README)}"
export CIFAR10_SOURCE="$(realpath "$CIFAR10_SOURCE")" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
unset MSDNET_QUICK
TIMES="${TIMES:-/tmp/execute_notebooks.times}"

run() {  # run NN: execute notebooks/NN_*.ipynb in place and record its wall time
    local nb start
    nb=$(ls notebooks/"$1"_*.ipynb)
    start=$(date +%s)
    jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 "$nb" \
        > "/tmp/execute_$1.log" 2>&1 || { echo "FAILED: $nb (see /tmp/execute_$1.log)"; return 1; }
    echo "$nb $(( $(date +%s) - start )) s" | tee -a "$TIMES"
}

side_by_side() {  # side_by_side "NN ..." "NN ...": two lanes at once, each running its notebooks in order
    (for n in $1; do run "$n" || exit 1; done) & local a=$!
    (for n in $2; do run "$n" || exit 1; done) & local b=$!
    local status=0
    wait $a || status=1
    wait $b || status=1
    return $status
}

if [ $# -gt 0 ]; then
    for n in "$@"; do run "$n"; done
else
    side_by_side "03" "01 02"        # 03 caches the predictions that 04, 05 and 07 read
    side_by_side "06 08" "04 05 07"  # 06 caches the maps that 08 reads
fi
python tools/drop_progress_bars.py notebooks/*.ipynb
