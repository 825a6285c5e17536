"""Training speed of float32, channels_last and bfloat16 autocast on this machine, side by side.

    python benchmarks/train_speed.py

For each variant: images/s of full training steps (forward, the 10-exit loss, backward, SGD) of
`cifar10-anytime` at the given batch size, the same random batches for every variant and the
steps interleaved (one variant after another, round by round) so a busy moment of the machine does
not favour one; and the test accuracy of the shipped checkpoint evaluated in that variant, which
shows what its numerics cost. Pick for `msdnet train` what wins (`--channels-last`,
`--amp bf16`). The table is also written to docs/results/train_speed.md, which the site's Benchmarks
page includes.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import data, evaluate, msdnet, pretrained, train

VARIANTS = {  # name: (channels_last, autocast dtype)
    "float32": (False, None),
    "channels_last": (True, None),
    "bfloat16 autocast": (False, torch.bfloat16),
    "channels_last + bfloat16": (True, torch.bfloat16),
}


def step_time(model, optimizer, x, y, channels_last: bool, dtype) -> float:
    """Seconds of one `train.train_step` (the step `msdnet train` takes)."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    train.train_step(model, optimizer, x, y, amp=dtype)
    return time.perf_counter() - start


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--eval-images", type=int, default=1000, help="test images for the accuracy column (0: skip)")
    _report.add_option(p)
    args = p.parse_args()
    torch.manual_seed(0)

    # Read first, so that a missing dataset stops the script before minutes of timing, not after.
    test = data.subset(data.load("test"), args.eval_images) if args.eval_images else None
    models, optimizers = {}, {}
    for name, (channels_last, _) in VARIANTS.items():
        torch.manual_seed(0)  # the same initial weights for every variant
        m = msdnet.build("cifar10-anytime").train()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        models[name] = m
        optimizers[name] = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    batches = [(torch.rand(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
               for _ in range(args.rounds + 1)]
    times = {name: [] for name in VARIANTS}
    for r, (x, y) in enumerate(batches):
        for name, (channels_last, dtype) in VARIANTS.items():
            t = step_time(models[name], optimizers[name], x, y, channels_last, dtype)
            if r > 0:  # the first round warms up
                times[name].append(t)

    accuracy = {}
    if test is not None:
        for name, (channels_last, dtype) in VARIANTS.items():
            model = pretrained.load()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
                accuracy[name] = evaluate.exit_accuracies(model, test)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU: {cpu_flags()}")
    print(f"batch {args.batch_size}, {args.rounds} timed training steps per variant (median)")
    head = f"{'variant':26s} {'images/s':>9s} {'vs float32':>10s}"
    if accuracy:
        head += f"  {'B1 acc':>7s} {'B10 acc':>7s}  (shipped weights, {args.eval_images} test images)"
    print(head)
    base = statistics.median(times["float32"])
    rows = []
    for name in VARIANTS:
        med = statistics.median(times[name])
        line = f"{name:26s} {args.batch_size / med:9.1f} {base / med:9.2f}x"
        rows.append([name, f"{args.batch_size / med:.1f}", f"{base / med:.2f}x"])
        if accuracy:
            line += f"  {accuracy[name][0]:7.2%} {accuracy[name][-1]:7.2%}"
            rows[-1] += [f"{accuracy[name][0]:.2%}", f"{accuracy[name][-1]:.2%}"]
        print(line)
    report = _report.Report("train_speed", args.results)
    report.text(f"Training steps at batch {args.batch_size}, the median of {args.rounds} per variant "
                f"(CPU: {cpu_flags()})"
                + (f"; accuracy of the shipped weights evaluated in each variant on {args.eval_images} test images."
                   if accuracy else "."))
    report.table(["variant", "images/s", "vs float32"] + (["B1 acc", "B10 acc"] if accuracy else []), rows)
    report.write()


if __name__ == "__main__":
    _errors.run(main)
