"""Real early exit against the full network at the same accuracy, on this machine's CPU.

    python benchmarks/early_exit.py

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
block, last classifier only) against real early exit and the stream (earlyexit.EarlyExitStream: every
block runs on batches of one size, the images that stay waiting for the next block until a batch has
gathered), batch by batch in turn so a busy moment of the machine hits all alike, for batches of
several sizes and one image at a time. A pass of the full network timed block by block, in the same
rotation, predicts early exit's speed-up from those block times ('simulated') and shows each block's
multiply-accumulates per second.
The tables are also written to docs/results/early_exit.md, which the site's Benchmarks page includes.
"""
from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import data, earlyexit, evaluate, msdnet, policies, pretrained


def as_input(images: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """uint8 images -> the networks' input: floats in [0, 1], in the memory format the model runs in."""
    return (images.float() / 255).contiguous(memory_format=fmt)


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
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="the memory format both networks run in (default: channels_last, the faster for both on a "
                        "CPU, whose convolution library then needs no layout conversions)")
    p.add_argument("--safety", default="auto", metavar="Z",
                   help="the threshold searches keep the target even Z standard errors below their validation "
                        "accuracy (see policies.one_threshold); 0: the validation accuracy itself; auto (the default): "
                        "each search's Z chosen by cross-validation inside the validation hold-out "
                        "(policies.cross_validated_safety), the smallest that keeps held-out halves within 0.1 point")
    _report.add_option(p)
    args = p.parse_args()
    if args.safety != "auto":
        try:
            args.safety = float(args.safety)
        except ValueError:
            p.error(f"--safety must be a number or auto, got {args.safety!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format

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

    print(f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, {args.memory_format} "
          f"memory format; thresholds from the {len(val):,} validation images (target: the full network's {target:.2%} there, "
          f"safety z: {'cross-validated on them' if args.safety == 'auto' else f'{args.safety:g}'} standard errors), "
          f"accuracy on the {len(test):,} test images")
    print(f"each block with its classifier, measured at batch {args.cost_batch}, ms per image: "
          + " ".join(f"B{c.exit} {(c.seconds - (seconds_per_exit[i - 1].seconds if i else 0)) * 1e3:.3f}"
                     for i, c in enumerate(seconds_per_exit))
          + f"; full network {full_seconds * 1e3:.2f} ms")
    print("'timed': thresholds searched for the lowest measured time instead of the fewest multiply-accumulates")
    print(f"{'policy':42s} {'z':>3s} {'val acc':>8s} {'test acc':>8s} {'M MACs':>7s} {'fewer':>6s} {'ms/im':>6s} {'faster':>6s}  exits used on test")
    chosen, best_val_seconds = None, float("inf")
    report = _report.Report("early_exit", args.results)
    policy_rows = []
    for name, (thresholds, score, z) in choices.items():
        v, t = policies.budgeted(val, thresholds, costs, score), policies.budgeted(test, thresholds, costs, score)
        t_sec = policies.budgeted(test, thresholds, seconds_per_exit, score).average_cost
        print(f"{name:42s} {z:3g} {v.accuracy:8.2%} {t.accuracy:8.2%} {t.average_cost / 1e6:7.1f} "
              f"{full_macs / t.average_cost:5.2f}x {t_sec * 1e3:6.3f} {full_seconds / t_sec:5.2f}x  "
              f"{t.exit_counts}{switched_off(thresholds)}")
        policy_rows.append([name, f"{z:g}", f"{v.accuracy:.2%}", f"{t.accuracy:.2%}", f"{t.average_cost / 1e6:.1f}",
                            f"{full_macs / t.average_cost:.2f}x", f"{full_seconds / t_sec:.2f}x",
                            " ".join(map(str, t.exit_counts)) + switched_off(thresholds)])
        v_sec = policies.budgeted(val, thresholds, seconds_per_exit, score).average_cost
        if v_sec < best_val_seconds:  # chosen on validation, like the thresholds, by the time it predicts
            chosen, best_val_seconds = name, v_sec
    report.text(f"Exit policies, thresholds chosen on the {len(val):,} validation images (target: the full network's "
                f"{target:.2%} there, kept even z standard errors lower); accuracy on the {len(test):,} test images; "
                f"the full network (every block, the last classifier only) costs {full_macs / 1e6:.1f} M "
                f"multiply-accumulates and {full_seconds * 1e3:.2f} ms per image (blocks timed alone at batch "
                f"{args.cost_batch}). 'timed': searched for the lowest measured time.")
    report.table(["policy", "z", "val acc", "test acc", "M MACs", "fewer MACs", "faster (block times)",
                  "images leaving at B1..B10"], policy_rows)
    thresholds, score, _ = choices[chosen]
    sim = policies.budgeted(test, thresholds, costs, score)
    sim_seconds = policies.budgeted(test, thresholds, seconds_per_exit, score).average_cost
    early = earlyexit.EarlyExit(model, thresholds, score=score)

    split = data.subset(full_split, args.images) if args.images < len(full_split) else full_split
    one = data.subset(full_split, args.latency_images)
    # each block alone: the cumulative count up to its exit, less the one before and its own classifier
    block_macs = [c.macs - (costs[k - 1].macs if k else 0) - c.classifier_macs for k, c in enumerate(costs)]
    print(f"\ntimed with '{chosen}' (the fastest on validation by the measured costs), {len(split):,} test images "
          f"({full_macs / 1e6:.1f} vs {sim.average_cost / 1e6:.1f} M MACs per image: {full_macs / sim.average_cost:.2f}x fewer); "
          "'simulated': early exit's time predicted from the full network's own block and classifier times in the "
          "same run, batch by batch, for the images that reached each block")
    print(f"{'batch':>6s} {'full network':>13s} {'early exit':>11s} {'speed-up':>9s} {'simulated':>9s} "
          f"{'streamed':>9s} {'speed-up':>9s}")
    rows = {}
    interleaved(model, early, split.images[:500], 100, fmt)  # warm-up
    for b in args.batch_sizes:
        r = rows[b] = interleaved(model, early, split.images, b, fmt)
        print(f"{b:6d} {len(split) / r.full:9.0f} im/s {len(split) / r.early:7.0f} im/s {r.full / r.early:8.2f}x "
              f"{r.simulated_speedup:8.2f}x {len(split) / r.streamed:5.0f} im/s {r.full / r.streamed:8.2f}x")
    lat = interleaved(model, early, one.images, 1, fmt, stream=False)
    last = rows[args.batch_sizes[-1]]
    acc_full = (last.full_predicted == split.labels).double().mean().item()
    acc_early = (last.early_predicted == split.labels).double().mean().item()
    same = int((last.streamed_predicted == last.early_predicted).sum())  # all, unless rounding tips an image at a threshold
    print(f"one image at a time ({len(one)} test images): full network {lat.full / len(one) * 1e3:.2f} ms per image, "
          f"early exit {lat.early / len(one) * 1e3:.2f} ms ({lat.full / lat.early:.2f}x; simulated {lat.simulated_speedup:.2f}x)")
    print(f"streamed early exit gave early exit's answer for {same:,} of {len(split):,} images")
    print("each block's speed in the full network's passes, G multiply-accumulates per second, at batch "
          f"{args.batch_sizes[-1]}: " + " ".join(f"B{k + 1} {m / t / 1e9 * len(split):.0f}"
                                                   for k, (m, t) in enumerate(zip(block_macs, last.block_seconds)))
          + f"; one image at a time: " + " ".join(f"B{k + 1} {m / t / 1e9 * len(one):.0f}"
                                                 for k, (m, t) in enumerate(zip(block_macs, lat.block_seconds))))
    report.text(f"Real early exit with '{chosen}' (the fastest on validation by the block times) against the full "
                f"network, both in the {args.memory_format} memory format, batch by batch in turn on {len(split):,} test images; 'simulated': early exit's time "
                "predicted from the full network's own block and classifier times in the same run, for the images "
                f"that reached each block. From the multiply-accumulates: {full_macs / sim.average_cost:.2f}x.")
    report.table(["batch", "full network, images/s", "early exit, images/s", "speed-up", "streamed, images/s",
                  "streamed speed-up", "simulated", "early exit / simulated", "streamed / simulated"],
                 [[b, f"{len(split) / r.full:.0f}", f"{len(split) / r.early:.0f}", f"{r.full / r.early:.2f}x",
                   f"{len(split) / r.streamed:.0f}", f"{r.full / r.streamed:.2f}x", f"{r.simulated_speedup:.2f}x",
                   f"{r.measured_share(r.early):.0%}", f"{r.measured_share(r.streamed):.0%}"] for b, r in rows.items()]
                 + [[1, f"{len(one) / lat.full:.0f}", f"{len(one) / lat.early:.0f}", f"{lat.full / lat.early:.2f}x",
                     "", "", f"{lat.simulated_speedup:.2f}x", f"{lat.measured_share(lat.early):.0%}", ""]])
    report.text(f"Each block's speed in the full network's passes, G multiply-accumulates per second "
                "(blocks 1 to 3 keep the 32x32 scale: few channels over large maps).")
    report.table(["batch"] + [f"B{k}" for k in range(1, model.n_exits + 1)],
                 [[args.batch_sizes[-1]] + [f"{m / t / 1e9 * len(split):.0f}" for m, t in zip(block_macs, last.block_seconds)],
                  [1] + [f"{m / t / 1e9 * len(one):.0f}" for m, t in zip(block_macs, lat.block_seconds)]])
    b_full = min(rows, key=lambda b: rows[b].full)
    modes = {f"early exit, batch {b}": r.early for b, r in rows.items()}
    modes.update({f"streamed early exit, batches of {b}": r.streamed for b, r in rows.items()})
    best = min(modes, key=modes.get)
    print(f"each at its fastest: full network {len(split) / rows[b_full].full:.0f} images/s (batch {b_full}), "
          f"{best}: {len(split) / modes[best]:.0f} images/s, {rows[b_full].full / modes[best]:.2f}x")
    print(f"early exit, measured against simulated from the same run's block times: "
          + ", ".join(f"batch {b} {r.measured_share(r.early):.0%} (streamed {r.measured_share(r.streamed):.0%})" for b, r in rows.items())
          + f", one image at a time {lat.measured_share(lat.early):.0%}; multiply-accumulates: {full_macs / sim.average_cost:.2f}x; "
          f"accuracy {acc_early:.2%} vs {acc_full:.2%} (full network)")
    report.text(f"Each at its fastest: full network {len(split) / rows[b_full].full:.0f} images/s (batch {b_full}), "
                f"{best}: {len(split) / modes[best]:.0f} images/s, {rows[b_full].full / modes[best]:.2f}x; "
                f"accuracy {acc_early:.2%} against the full network's {acc_full:.2%} on these images.")
    report.write()


class Timed(NamedTuple):
    """Seconds each way spent on all images in one interleaved run, and their answers."""
    full: float  # earlyexit.LastExitOnly
    early: float
    streamed: float
    modelled_full: float  # the full network in the block-by-block pass the simulation reads
    simulated: float  # early exit's seconds predicted from that pass's block and classifier times
    block_seconds: list[float]  # each block's seconds in that pass
    full_predicted: torch.Tensor
    early_predicted: torch.Tensor
    streamed_predicted: torch.Tensor | None

    @property
    def simulated_speedup(self) -> float:
        return self.modelled_full / self.simulated

    def measured_share(self, seconds: float) -> float:
        """A measured speed-up (full network's seconds / these) as a share of the simulated one."""
        return self.full / seconds / self.simulated_speedup


def interleaved(model: msdnet.MSDNet, early: earlyexit.EarlyExit, images: torch.Tensor, batch_size: int,
                fmt: torch.memory_format, stream: bool = True) -> Timed:
    """The full network (earlyexit.LastExitOnly), early exit, the stream and a block-by-block pass of the full
    network, batch by batch in turn, so a busy moment of the machine hits all alike. The block-by-block pass
    also times every classifier; the simulation reads it, each way's speed-up is taken against LastExitOnly."""
    n = model.n_exits
    baseline = earlyexit.LastExitOnly(model)
    blocks = [0.0] * n
    full = early_t = streamed = modelled = simulated = 0.0
    out_full, out_early = [], []
    streamer = earlyexit.EarlyExitStream(early, batch_size)
    off = [bool(t) and k < n - 1 for k, t in enumerate(torch.isposinf(early.thresholds).tolist())]  # classifiers it skips
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = as_input(images[i : i + batch_size], fmt)
            start = time.perf_counter()
            logits = baseline(x)
            full += time.perf_counter() - start
            out_full.append(logits.argmax(1))
            start = time.perf_counter()
            predicted, exit_of = early(x)
            early_t += time.perf_counter() - start
            out_early.append(predicted)
            if stream:
                start = time.perf_counter()
                streamer.feed(x)
                streamed += time.perf_counter() - start
            these_blocks, these_heads = [], []
            begin = time.perf_counter()
            with msdnet.eval_mode(model):  # as LastExitOnly and EarlyExit borrow the model, on each call
                maps = model.standardize(x)
                start = time.perf_counter()
                for k in range(1, n + 1):
                    maps = model.advance(k, maps)
                    mid = time.perf_counter()
                    model.classify(k, maps)
                    end = time.perf_counter()
                    these_blocks.append(mid - start)
                    these_heads.append(end - mid)
                    start = end
            this_full = time.perf_counter() - begin - sum(these_heads[:-1])  # without the classifiers it skips
            modelled += this_full
            simulated += this_full - sum(these_blocks) - these_heads[-1]  # per call (standardize, borrowing): paid alike
            for k in range(n):  # the images that reached block k+1 pay for it and, if it runs, its classifier
                share = (exit_of >= k + 1).double().mean().item()
                simulated += share * (these_blocks[k] + (0.0 if off[k] else these_heads[k]))
                blocks[k] += these_blocks[k]
        streamed_predicted = None
        if stream:
            start = time.perf_counter()
            streamed_predicted, _ = streamer.finish()
            streamed += time.perf_counter() - start
    return Timed(full, early_t, streamed, modelled, simulated, blocks, torch.cat(out_full), torch.cat(out_early),
                 streamed_predicted)


if __name__ == "__main__":
    _errors.run(main)
