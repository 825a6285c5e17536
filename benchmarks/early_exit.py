"""Real early exit against the full network at the same accuracy, on this machine's CPU.

    CIFAR10_SOURCE=../shared/data/cifar10-jpeg.tar.gz python benchmarks/early_exit.py

Thresholds are chosen on the validation hold-out: the cheapest setting (the paper's q) whose
validation accuracy reaches that of the last exit. Then, on the test split, it times the shipped
MSD-Net used as an ordinary classifier (every block, last classifier only) against real early
exit (an image leaves at the first confident exit and stops computing), and prints the measured
wall-clock speed-up beside the simulated one (the ratio of multiply-accumulates).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import data, evaluate, msdnet, pretrained


def timed(fn, images: torch.Tensor, batch_size: int, repeats: int) -> tuple[float, list]:
    """The fastest of `repeats` passes over the images in batches, and the outputs of the last."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [fn(images[i : i + batch_size].float() / 255) for i in range(0, len(images), batch_size)]
        best = min(best, time.perf_counter() - start)
    return best, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="test images to time (spread over the classes)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=2, help="timings per method; the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = pretrained.load()
    costs = msdnet.exit_costs(model)
    split = data.load("test")
    split = data.subset(split, args.images) if args.images < len(split) else split
    val, test = evaluate.predict(model, "val"), evaluate.predict(model, split)
    target = val.correct[:, -1].double().mean().item()
    q, thresholds = evaluate.cheapest_matching(val, costs, target)
    sim = evaluate.budgeted(test, thresholds, costs)

    baseline = evaluate.LastExitOnly(model)
    with FlopCounterMode(display=False) as counter:
        baseline(torch.zeros(1, 3, 32, 32))
    baseline_macs = counter.get_total_flops() // 2
    early = evaluate.EarlyExit(model, thresholds)

    with torch.no_grad():
        timed(baseline, split.images[: args.batch_size], args.batch_size, 1)  # warm-up
        t_full, full_out = timed(baseline, split.images, args.batch_size, args.repeats)
        t_early, early_out = timed(early, split.images, args.batch_size, args.repeats)
    full_pred = torch.cat(full_out).argmax(1)
    predicted = torch.cat([p for p, _ in early_out])
    acc_early = (predicted == split.labels).double().mean().item()
    acc_full = (full_pred == split.labels).double().mean().item()

    print(f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, batch {args.batch_size}, "
          f"{len(split):,} test images")
    print(f"thresholds from the validation hold-out: q = {q:.2f}, exits used on test: {sim.exit_counts}")
    print(f"full network (last exit): accuracy {acc_full:.2%}, {baseline_macs / 1e6:.1f} M MACs/image, "
          f"{t_full:.1f} s ({len(split) / t_full:.0f} images/s)")
    print(f"real early exit:          accuracy {acc_early:.2%}, {sim.average_macs / 1e6:.1f} M MACs/image "
          f"on average, {t_early:.1f} s ({len(split) / t_early:.0f} images/s)")
    print(f"speed-up: measured {t_full / t_early:.1f}x wall-clock, simulated {baseline_macs / sim.average_macs:.1f}x "
          "(multiply-accumulates)")


if __name__ == "__main__":
    main()
