"""Train MSD-Net on CIFAR-10: `python -m helpers.train --help`.

The loop of notebook 02 (a batch, its crops and flips, the sum of the exits' cross-entropies, an SGD
step) with what a long run needs around it. After every epoch the accuracy of every exit on the
evaluation split is appended to <out>/log.jsonl and <out>/last.pt is written atomically; Ctrl-C,
SIGTERM or --time-limit save the exact position, and --resume continues from it to the same weights
as a run never stopped. Several GPUs: `torchrun --nproc_per_node N -m helpers.train ...`.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint, data, distill as distillation, msdnet
from .averaging import WeightAverage
from .run import Run
from .safeguards import Diverged, OutFolderBusy, StopRequest, TimeUp, device_for, exclusive
from .schedule import SCHEDULES, learning_rate

__all__ = ["parse_args", "multi_exit_loss", "train_step", "compiled", "learning_rate", "train", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The settings of `python -m helpers.train`, from `argv` (default: sys.argv).

    From Python: ``train(parse_args(["--preset", "tiny", "--epochs", "1", "--out", "runs/try"]))``.
    """
    p = argparse.ArgumentParser(prog="python -m helpers.train", description=(
        "Train MSD-Net on CIFAR-10: every exit's accuracy is logged after every epoch to <out>/log.jsonl, the "
        "run saved to <out>/last.pt (resumable with --resume) and the best weights on validation to <out>/best.pt."))
    a = p.add_argument_group("the model and the optimizer").add_argument
    a("--preset", default="cifar10-anytime", choices=sorted(msdnet.PRESETS))
    a("--epochs", type=int, default=300, help="the schedule's length (with --fit-to: the most it may get)")
    a("--batch-size", type=int, default=64, help="global batch, over all processes")
    a("--accumulate", type=int, default=1, help="split each batch into this many micro-batches")
    a("--lr", type=float, default=0.1, help="the peak learning rate")
    a("--momentum", type=float, default=0.9, help="Nesterov momentum")
    a("--weight-decay", type=float, default=1e-4, help="on the weights, not on batch norm and biases")
    a("--seed", type=int, default=0, help="seeds the weights, the data order and the augmentation")
    a("--init-from", default=None, metavar="WEIGHTS", help="start from these weights (fresh optimizer and schedule)")
    a = p.add_argument_group("the learning rate").add_argument
    a("--schedule", choices=SCHEDULES, default="paper",
      help="paper: lr/10 at 50%% and 75%% of the epochs; cosine: linear warm-up, then a cosine to 0; "
           "constant: linear warm-up, then --lr throughout (for --swa)")
    a("--warmup-epochs", type=float, default=0.0, help="linear warm-up of the cosine and constant schedules")
    a("--fit-to", type=float, default=0.0, metavar="SECONDS",
      help="time the first epoch, then give the cosine schedule the epochs (at most --epochs) that fit in SECONDS "
           "of training and validation; needs --schedule cosine and --warmup-epochs >= 1")
    a = p.add_argument_group("the loss").add_argument
    a("--label-smoothing", type=float, default=0.0)
    a("--distill", type=float, default=0.0, metavar="GAMMA",
      help="weight of the last exit's softened predictions in the loss of every earlier exit (0: off)")
    a("--distill-temperature", type=float, default=3.0, metavar="T", help="softmax temperature of --distill")
    a = p.add_argument_group("a weight average, evaluated beside the trained weights and kept in best.pt").add_argument
    a("--ema", type=float, default=0.0, metavar="DECAY", help="exponential moving average of the weights (e.g. 0.999; 0: off)")
    a("--swa", action="store_true", help="equal-weight average of the weights after every step (stochastic weight "
                                          "averaging), usually with --schedule constant")
    a = p.add_argument_group("the data").add_argument
    a("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    a("--val-size", type=int, default=5000,
      help="training images held out for validation, the same ones whatever --seed; 0 trains on all 50,000")
    a("--train-subset", type=int, default=0, help="train on N images spread over the classes (0: all)")
    a("--eval-split", choices=("val", "test"), default="val", help="measured after every epoch")
    a("--eval-subset", type=int, default=0, help="evaluate on N images spread over the classes (0: all)")
    a("--cutout", type=int, default=0, metavar="PIXELS",
      help="after crop and flip, paint a PIXELSxPIXELS square of the mean colour at a random place (0: off)")
    a = p.add_argument_group("the run").add_argument
    a("--out", default="runs/msdnet", help="folder for last.pt, best.pt and log.jsonl")
    a("--resume", action="store_true", help="continue <out>/last.pt exactly where it stopped")
    a("--time-limit", type=float, default=0.0, metavar="SECONDS",
      help="stop as Ctrl-C does (saved, resumable) after this much training in this process")
    a = p.add_argument_group("the machine").add_argument
    a("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when there is one, else cpu)")
    a("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
      help="autocast; auto: bf16 (or fp16) on CUDA, float32 elsewhere")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--compile", action="store_true",
      help="torch.compile the training step (validation runs uncompiled); a run may resume with or without it")
    args = p.parse_args(argv)
    _validate(args, p)
    return args


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse settings that would fail late or train on quietly, in argparse's one line (exit status 2)."""
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1 and args.accumulate >= 1, "--batch-size and --accumulate must be at least 1"),
        (math.isfinite(args.lr) and args.lr >= 0, "--lr must be a finite number >= 0"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (args.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (0 <= args.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (0 <= args.distill <= 1, "--distill (gamma) must be in [0, 1]"),
        (args.distill_temperature > 0, "--distill-temperature must be > 0"),
        (0 <= args.ema < 1, "--ema (the decay) must be in [0, 1): 0 turns it off, 0.999 is typical"),
        (not (args.swa and args.ema), "--swa and --ema are two kinds of average: choose one"),
        (args.val_size >= 0 and args.train_subset >= 0 and args.eval_subset >= 0, "sizes must be >= 0"),
        (args.time_limit >= 0, "--time-limit must be >= 0"),
        (args.cutout >= 0, "--cutout must be >= 0 (0 turns it off)"),
        (args.fit_to >= 0, "--fit-to must be >= 0 (0 turns it off)"),
        (not args.fit_to or (args.schedule == "cosine" and args.warmup_epochs >= 1),
         "--fit-to needs --schedule cosine and --warmup-epochs >= 1 (the warm-up covers the epoch that is timed)"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            parser.error(message)


# ----------------------------------------------------------------------------- the step


def multi_exit_loss(logits: list[Tensor], labels: Tensor, label_smoothing: float = 0.0,
                    distill: float = 0.0, temperature: float = 3.0) -> Tensor:
    """The paper's loss: the sum over the exits of each exit's cross-entropy.

    With ``distill`` = gamma > 0 every exit k before the last learns also from the last exit's softened
    predictions (`helpers.distill.soft_losses`): ``(1 - gamma) * CE(z_k, y) + gamma * soft_k``.

    Args:
        logits: one [B, classes] tensor per exit.
        labels: [B] class indices.
    Returns:
        a scalar.
    """
    ce = [F.cross_entropy(z.float(), labels, label_smoothing=label_smoothing) for z in logits]
    if not distill:
        return sum(ce)
    soft = distillation.soft_losses(logits, temperature)
    return sum((1 - distill) * c + distill * s for c, s in zip(ce, soft)) + ce[-1]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, *,
               label_smoothing: float = 0.0, distill: float = 0.0, temperature: float = 3.0,
               amp: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               micro_batches: int = 1, average: WeightAverage | None = None) -> float:
    """One optimizer step: forward, `multi_exit_loss`, backward, the optimizer (and the weight average).

    Args:
        model: the network in train mode, or its DDP or compiled wrapper.
        images: float [B, 3, 32, 32] in [0, 1]; labels: [B].
        amp: the autocast dtype (None: float32). scaler: a GradScaler, for fp16.
        micro_batches: split the batch into this many equal parts and sum their gradients.
        average: updated after the step.
    Returns:
        the batch's loss.
    Raises:
        Diverged: the loss is not finite; the step was not taken (with an enabled scaler it skips it).
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=images.device)
    parts = list(zip(images.chunk(micro_batches), labels.chunk(micro_batches)))
    for j, (x, y) in enumerate(parts):
        last = j == len(parts) - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = multi_exit_loss(model(x), y, label_smoothing, distill, temperature) / len(parts)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    value = total.item()
    scaling = scaler is not None and scaler.is_enabled()
    if not math.isfinite(value) and not scaling:
        raise Diverged(f"the loss became {value}")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if average is not None:
        average.update(model)
    return value


def compiled(model: nn.Module, mode: str | None = None) -> nn.Module:
    """`model` through torch.compile for training, with static shapes.

    Every training batch has the same shape (an epoch drops its last partial batch), so the step
    compiles once. The parameters and buffers stay the model's: the optimizer, a weight average and
    an uncompiled validation see the same tensors.
    """
    return torch.compile(model, mode=mode, dynamic=False)


# ----------------------------------------------------------------------------- the loop


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> dict:
    """Run or resume a training run.

    Args:
        args: the settings of `parse_args`.
        on_step: called with the global step count after every optimizer step; an exception it raises
            ends the run as Ctrl-C does (KeyboardInterrupt saves the position first).
    Returns:
        the last epoch's log record.
    Raises:
        SetupError: no such --device here, or --out cannot be written (before any data is read).
        OutFolderBusy: another run writes to --out.
    """
    device = device_for(args.device)
    with exclusive(Path(args.out)):
        run = Run(args, device)
        if args.compile:
            run.net = compiled(run.net)
        return _loop(run, on_step)


def _loop(run: Run, on_step: Callable[[int], None] | None) -> dict:
    from tqdm.auto import tqdm

    args, p = run.args, run.progress
    stop = StopRequest(args.time_limit)
    consistent, t0 = True, time.perf_counter()  # consistent: no step is half done, so the state may be saved
    try:
        while p.epoch < run.epochs:
            if p.perm is None:
                p.perm = torch.randperm(len(run.train_set), generator=run.gen)
            run.net.train()
            bar = tqdm(total=run.steps_per_epoch, initial=p.batch_in_epoch, desc=f"epoch {p.epoch + 1}/{run.epochs}",
                       disable=not run.ddp.main, mininterval=2, dynamic_ncols=True)
            t0, seen_before = time.perf_counter(), p.epoch_images
            while p.batch_in_epoch < run.steps_per_epoch:
                if run.fit is not None and p.epoch == 0:
                    run.fit.before_step(p.batch_in_epoch, time.perf_counter())
                consistent = False
                images, labels = run.batch()  # crops and flips: this process's share of the batch
                lr = run.set_learning_rate()
                loss = train_step(run.net, run.optimizer, images, labels, **run.step_settings)
                run.stepped(loss)
                consistent = True
                rate = (p.epoch_images - seen_before) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.update()
                if on_step is not None:
                    on_step(p.epoch * run.steps_per_epoch + p.batch_in_epoch)
                stop.check()
            bar.close()
            seconds = time.perf_counter() - t0
            p.elapsed_s += seconds
            run.end_epoch(seconds)
            stop.check()
    except Diverged as e:
        raise run.diverged(e) from None
    except KeyboardInterrupt:
        if consistent:
            if p.batch_in_epoch:
                seconds = time.perf_counter() - t0
                p.elapsed_s += seconds
                p.epoch_time_s += seconds
            run.save()
            if run.ddp.main:
                print(f"\ninterrupted: saved {run.ckpt_path} at epoch {p.epoch + 1}, batch {p.batch_in_epoch}; "
                      "continue with the same command and --resume", file=sys.stderr, flush=True)
        raise
    finally:
        stop.restore()
    return p.epoch_record


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.train`: 0 when done, 2 with one line on stderr for what the user can fix."""
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads", flush=True)
    try:
        train(args)
    except TimeUp:
        print(f"--time-limit {args.time_limit:g} s reached; continue with the same command and --resume", flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    except (checkpoint.CheckpointError, data.DataNotFoundError, FileExistsError, ValueError, Diverged, OutFolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
