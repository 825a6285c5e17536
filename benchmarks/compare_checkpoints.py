"""Is one checkpoint better than another, exit by exit? Both are measured on the same images, so the
fair test is paired: per image, the second checkpoint right where the first is wrong (+1), the reverse
(-1), or both alike (0). The mean of that difference is the accuracy gap, and a bootstrap over the
images gives its 95% interval (`analysis.judge`): SUPPORTED when it lies above zero.

    python benchmarks/compare_checkpoints.py 3dcff3d HEAD                # an earlier shipped checkpoint against the current one
    python benchmarks/compare_checkpoints.py 3dcff3d HEAD --split val

A checkpoint is a commit (its shipped weights, read with `git show`) or a weights file, as in
`checkpoint_averages.py`. Seeded: the same command gives the same numbers. The table is also written to
DIR/compare_checkpoints.md with --results DIR.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from checkpoint_averages import read
from helpers import analysis, data
from helpers.evaluate import predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="commit or weights file: the baseline")
    p.add_argument("second", help="commit or weights file: the candidate")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--images", type=int, default=0, help="only N images, spread over the classes (0: all)")
    p.add_argument("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    _report.add_option(p, default="")  # a comparison of the reader's own checkpoints: no page part unless asked
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        first, second = read(args.first, Path(tmp)), read(args.second, Path(tmp))
    split = data.load(args.split, args.source)
    if args.images:
        split = data.subset(split, args.images, "--images")
    a = predict(first, split, cache=False).correct
    b = predict(second, split, cache=False).correct
    print(f"{args.split} accuracy (%) on {len(split):,} images; the paired difference {args.second} - {args.first}")
    print(f"{'exit':<5}{args.first:>10}{args.second:>10}  difference and its 95% interval (points)")
    rows = []
    for k in range(a.shape[1]):
        v = analysis.judge(b[:, k].double() - a[:, k].double())
        print(f"B{k + 1:<4}{a[:, k].double().mean() * 100:10.2f}{b[:, k].double().mean() * 100:10.2f}  "
              f"{v.effect * 100:+.2f} [{v.low * 100:+.2f}, {v.high * 100:+.2f}]  {v.word}", flush=True)
        rows.append([f"B{k + 1}", f"{a[:, k].double().mean() * 100:.2f}", f"{b[:, k].double().mean() * 100:.2f}",
                     f"{v.effect * 100:+.2f}", f"[{v.low * 100:+.2f}, {v.high * 100:+.2f}]", v.word])
    mean = analysis.judge((b.double() - a.double()).mean(1))
    print(f"mean over the exits: {mean.effect * 100:+.2f} [{mean.low * 100:+.2f}, {mean.high * 100:+.2f}]  {mean.word}")
    rows.append(["mean over the exits", "", "", f"{mean.effect * 100:+.2f}",
                 f"[{mean.low * 100:+.2f}, {mean.high * 100:+.2f}]", mean.word])
    report = _report.Report("compare_checkpoints", args.results)
    report.text(f"{args.split.capitalize()} accuracy on {len(split):,} images and the paired difference "
                f"{args.second} - {args.first}, image by image, with its bootstrap 95% interval: SUPPORTED when "
                "the interval lies above zero.")
    report.table(["exit", f"{args.first} %", f"{args.second} %", "difference, points", "95% interval, points",
                  "verdict"], rows)
    report.write()


if __name__ == "__main__":
    _errors.run(main)
