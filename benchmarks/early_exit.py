"""Real early exit against the full network at the same accuracy, on this machine's CPU.

    CIFAR10_SOURCE=../shared/data/cifar10-jpeg.tar.gz python benchmarks/early_exit.py

Three exit policies, each with thresholds chosen on the validation hold-out only, as the cheapest
whose validation accuracy reaches the last exit's even Z standard errors below it (the margin of
safety Z, by default cross-validated inside the validation hold-out for each search: thresholds tuned
to 5,000 images fit their noise, and lose on test what they seemed to keep): the paper's (exit
shares proportional to q^k), one confidence threshold for all exits, and a threshold per exit
(coordinate descent) on the top-1 confidence, the margin between the top two, or the entropy. The per-exit thresholds are searched twice: for the fewest multiply-accumulates, and
for the lowest time, by each block's and classifier's time measured here first
(earlyexit.timed_costs; on a CPU the first, full-resolution blocks cost far more time per
multiply-accumulate than the late ones). For each policy it prints the test accuracy, the simulated
multiply-accumulates and the simulated time. Then, with the policy fastest on validation by the
measured costs, it times on the test split the shipped MSD-Net used as an ordinary classifier (every
block, last classifier only) against real early exit, batch against batch interleaved so a busy
moment of the machine hits both alike: for batches of several sizes (images leave the batch as they
exit), streamed (earlyexit.EarlyExitStream: the images that stay wait for a full batch before the next
block), and for one image at a time (latency, the case early exit is for). On a CPU the full network
is fastest at small batches and early exit at larger ones (fewer images reach the later blocks), so
the last line compares each at its own fastest: the speed-up a user would get.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
from helpers import data, earlyexit, evaluate, msdnet, policies, pretrained


def as_input(images: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """uint8 images -> the networks' input: floats in [0, 1], in the memory format the model runs in."""
    return (images.float() / 255).contiguous(memory_format=fmt)


def interleaved(full, early, images: torch.Tensor, batch_size: int,
                fmt: torch.memory_format = torch.contiguous_format) -> tuple[float, float, list, list]:
    """Seconds each of the two spends on all images, batch by batch in turn, and their outputs."""
    t_full = t_early = 0.0
    out_full, out_early = [], []
    for i in range(0, len(images), batch_size):
        x = as_input(images[i : i + batch_size], fmt)
        start = time.perf_counter()
        out_full.append(full(x))
        t_full += time.perf_counter() - start
        start = time.perf_counter()
        out_early.append(early(x))
        t_early += time.perf_counter() - start
    return t_full, t_early, out_full, out_early


def switched_off(thresholds) -> str:
    """The exits nobody may leave at (threshold +inf): early exit skips their classifiers."""
    off = [f"B{k + 1}" for k in range(len(thresholds) - 1) if thresholds[k].item() == float("inf")]
    return f" (switched off: {', '.join(off)})" if off else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="test images for the batch timing (spread over the classes)")
    p.add_argument("--latency-images", type=int, default=500, help="test images timed one at a time")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 250, 500])
    p.add_argument("--cost-batch", type=int, default=250, help="batch size at which each block's time is measured")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--channels-last", action="store_true",
                   help="run both networks in the channels_last memory format (faster on this CPU for both)")
    p.add_argument("--safety", default="auto", metavar="Z",
                   help="the threshold searches keep the target even Z standard errors below their validation "
                        "accuracy (see policies.one_threshold); 0: the validation accuracy itself; auto (the default): "
                        "each search's Z chosen by cross-validation inside the validation hold-out "
                        "(policies.cross_validated_safety), the smallest that keeps held-out halves within 0.1 point")
    args = p.parse_args()
    if args.safety != "auto":
        try:
            args.safety = float(args.safety)
        except ValueError:
            p.error(f"--safety must be a number or auto, got {args.safety!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    model = pretrained.load()
    costs = msdnet.exit_costs(model)
    full_split, val_split = data.load("test"), data.load("val")
    val, test = evaluate.predict(model, val_split), evaluate.predict(model, full_split)  # cached: the usual format
    model = model.to(memory_format=fmt)  # from here on, what is timed
    # Each block's and classifier's time on this machine, on validation images: the costs that wall
    # clock follows (multiply-accumulates overstate the late blocks and the classifiers).
    seconds_per_exit = earlyexit.timed_costs(model, as_input(val_split.images[: args.cost_batch], fmt))
    target = val.correct[:, -1].double().mean().item()  # the full network's validation accuracy
    q, paper = policies.cheapest_matching(val, costs, target)

    def safety_of(search, score: str = "confidence") -> float:
        """--safety, or (auto) the margin cross-validated for this search and score; it is about the noise
        of the validation accuracy, not the unit of cost, so the timed searches reuse it."""
        if args.safety != "auto":
            return args.safety
        return policies.cross_validated_safety(val, costs, score=score, search=search)

    z_one = safety_of(policies.one_threshold)
    choices = {  # name: (thresholds, the score they threshold, the safety they were searched with)
        f"paper (q^k shares, q = {q:.2f})": (paper, "confidence", 0.0),
        "one confidence threshold": (policies.one_threshold(val, costs, target, safety=z_one), "confidence", z_one),
    }
    for score in evaluate.SCORES:
        z = safety_of(policies.per_exit_thresholds, score)
        for unit, c in (("", costs), (", timed", seconds_per_exit)):
            choices[f"a threshold per exit ({score}{unit})"] = (
                policies.per_exit_thresholds(val, c, target, score=score, safety=z), score, z)
    baseline = earlyexit.LastExitOnly(model)
    with FlopCounterMode(display=False) as counter:
        baseline(torch.zeros(1, 3, 32, 32))
    full_macs = counter.get_total_flops() // 2  # every block, the last classifier only
    full_seconds = seconds_per_exit[-1].seconds - sum(c.classifier_seconds for c in seconds_per_exit[:-1])

    print(f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, {'channels_last' if args.channels_last else 'contiguous'} "
          f"memory format; thresholds from the 5,000 validation images (target: the full network's {target:.2%} there, "
          f"safety z: {'cross-validated on them' if args.safety == 'auto' else f'{args.safety:g}'} standard errors), "
          f"accuracy on the {len(test):,} test images")
    print(f"each block with its classifier, measured at batch {args.cost_batch}, ms per image: "
          + " ".join(f"B{c.exit} {(c.seconds - (seconds_per_exit[i - 1].seconds if i else 0)) * 1e3:.3f}"
                     for i, c in enumerate(seconds_per_exit))
          + f"; full network {full_seconds * 1e3:.2f} ms")
    print("'timed': thresholds searched for the lowest measured time instead of the fewest multiply-accumulates")
    print(f"{'policy':42s} {'z':>3s} {'val acc':>8s} {'test acc':>8s} {'M MACs':>7s} {'fewer':>6s} {'ms/im':>6s} {'faster':>6s}  exits used on test")
    chosen, best_val_seconds = None, float("inf")
    for name, (thresholds, score, z) in choices.items():
        v, t = policies.budgeted(val, thresholds, costs, score), policies.budgeted(test, thresholds, costs, score)
        t_sec = policies.budgeted(test, thresholds, seconds_per_exit, score).average_cost
        print(f"{name:42s} {z:3g} {v.accuracy:8.2%} {t.accuracy:8.2%} {t.average_macs / 1e6:7.1f} "
              f"{full_macs / t.average_macs:5.2f}x {t_sec * 1e3:6.3f} {full_seconds / t_sec:5.2f}x  "
              f"{t.exit_counts}{switched_off(thresholds)}")
        v_sec = policies.budgeted(val, thresholds, seconds_per_exit, score).average_cost
        if v_sec < best_val_seconds:  # chosen on validation, like the thresholds, by the time it predicts
            chosen, best_val_seconds = name, v_sec
    thresholds, score, _ = choices[chosen]
    sim = policies.budgeted(test, thresholds, costs, score)
    sim_seconds = policies.budgeted(test, thresholds, seconds_per_exit, score).average_cost
    early = earlyexit.EarlyExit(model, thresholds, score=score)

    split = data.subset(full_split, args.images) if args.images < len(full_split) else full_split
    one = data.subset(full_split, args.latency_images)
    print(f"\ntimed with '{chosen}' (the fastest on validation by the measured costs), {len(split):,} test images "
          f"({full_macs / 1e6:.1f} vs {sim.average_macs / 1e6:.1f} M MACs per image):")
    print(f"{'batch':>6s} {'full network':>13s} {'early exit':>11s} {'speed-up':>9s} {'streamed':>9s} {'speed-up':>9s}")
    full_s, early_s, stream_s = {}, {}, {}
    with torch.no_grad():
        interleaved(baseline, early, split.images[:500], 100, fmt)  # warm-up
        for b in args.batch_sizes:
            full_s[b], early_s[b], full_out, early_out = interleaved(baseline, early, split.images, b, fmt)
            start = time.perf_counter()
            streamed, _ = earlyexit.EarlyExitStream(early, b)(as_input(split.images, fmt))
            stream_s[b] = time.perf_counter() - start
            print(f"{b:6d} {len(split) / full_s[b]:9.0f} im/s {len(split) / early_s[b]:7.0f} im/s {full_s[b] / early_s[b]:8.2f}x "
                  f"{len(split) / stream_s[b]:5.0f} im/s {full_s[b] / stream_s[b]:8.2f}x")
        l_full, l_early, _, _ = interleaved(baseline, early, one.images, 1, fmt)
    acc_full = (torch.cat(full_out).argmax(1) == split.labels).double().mean().item()
    acc_early = (torch.cat([p for p, _ in early_out]) == split.labels).double().mean().item()
    same = int((streamed == torch.cat([p for p, _ in early_out])).sum())  # all, unless rounding tips an image at a threshold
    b_full = min(full_s, key=full_s.get)
    modes = {f"early exit, batch {b}": t for b, t in early_s.items()}
    modes.update({f"streamed early exit, batches of {b}": t for b, t in stream_s.items()})
    best = min(modes, key=modes.get)
    print(f"one image at a time ({len(one)} test images): full network {l_full / len(one) * 1e3:.2f} ms per image, "
          f"early exit {l_early / len(one) * 1e3:.2f} ms per image on average ({l_full / l_early:.2f}x)")
    print(f"streamed early exit gave early exit's answer for {same:,} of {len(split):,} images")
    print(f"each at its fastest: full network {len(split) / full_s[b_full]:.0f} images/s (batch {b_full}), "
          f"{best} {len(split) / modes[best]:.0f} images/s")
    print(f"simulated from the measured block times: {full_seconds / sim_seconds:.1f}x")
    print(f"early exit: {full_s[b_full] / modes[best]:.1f}x measured, {full_macs / sim.average_macs:.1f}x simulated, "
          f"accuracy {acc_early:.2%} vs {acc_full:.2%} (full network)")


if __name__ == "__main__":
    _errors.run(main)
