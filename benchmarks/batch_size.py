"""Training images per second of `cifar10-anytime` at several batch sizes, side by side.

    python benchmarks/batch_size.py                     # batch 64, 128, 256

Full training steps (forward, the 10-exit loss, backward, SGD) on random images, the batch sizes
interleaved round by round so a busy moment of the machine does not favour one. The winner is
what `msdnet train --batch-size` should use on this machine, with the learning rate
scaled in proportion (the linear scaling rule, Goyal et al. 2017). The table is also written to
docs/results/batch_size.md, which the site's Benchmarks page includes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import msdnet, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--rounds", type=int, default=5, help="timed steps per batch size (after one warm-up step)")
    _report.add_option(p)
    args = p.parse_args()
    torch.manual_seed(0)
    model = msdnet.build("cifar10-anytime").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    rates: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    for r in range(args.rounds + 1):
        for b in args.batch_sizes:
            x, y = torch.rand(b, 3, 32, 32), torch.randint(0, 10, (b,))
            start = time.perf_counter()
            train.train_step(model, optimizer, x, y)
            if r:  # the first round warms up
                rates[b].append(b / (time.perf_counter() - start))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} timed steps each (median)")
    base = statistics.median(rates[args.batch_sizes[0]])
    rows = []
    for b in args.batch_sizes:
        med = statistics.median(rates[b])
        print(f"batch {b:4d}: {med:6.1f} images/s  ({med / base:.2f}x batch {args.batch_sizes[0]})")
        rows.append([b, f"{med:.1f}", f"{med / base:.2f}x"])
    report = _report.Report("batch_size", args.results)
    report.text(f"Training steps of cifar10-anytime on random images, the median of {args.rounds} per batch size.")
    report.table(["batch", "images/s", f"vs batch {args.batch_sizes[0]}"], rows)
    report.write()


if __name__ == "__main__":
    main()
