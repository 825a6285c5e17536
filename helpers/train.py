"""Train MSD-Net on CIFAR-10: `python -m helpers.train --help`.

Loss = sum of the cross-entropies of all exits. SGD with Nesterov momentum, and either the
paper's schedule (lr / 10 at 50% and 75% of training) or a short one for CPUs (linear warm-up,
then cosine to zero), or a constant rate under an equal-weight average of the weights
(`--schedule constant --swa`). After every epoch the accuracy of every exit on the evaluation split is
appended to <out>/log.jsonl, and <out>/last.pt is written atomically; Ctrl-C (or SIGTERM)
saves the exact position, and `--resume` continues from it: model, optimizer, schedule,
data order and random state, so an interrupted run ends with the same weights as one that
was not. Several GPUs or nodes: `torchrun --nproc_per_node N -m helpers.train ...`.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_avg_fn

from . import atomic, checkpoint, data, msdnet
from .evaluate import exit_accuracies  # validation after every epoch; also train.exit_accuracies for older code
from .runs import (  # noqa: F401  (OutFolderBusy, TimeUp, exclusive: part of this module's interface too)
    Diverged, Dist, OutFolderBusy, StopRequest, TimeUp, append_record, autocast_dtype, device_for, exclusive,
    hardware_name, last_logged_epoch,
)
from .cache import fingerprint

# Settings that define what a run computes; `--resume` refuses to change them.
RUN_DEFINING = (
    "preset", "epochs", "batch_size", "accumulate", "lr", "momentum", "weight_decay", "schedule",
    "warmup_epochs", "label_smoothing", "distill", "distill_temperature", "ema", "swa", "seed", "val_size", "train_subset", "init_from", "channels_last",
    "amp", "cutout", "fit_to",
)  # fmt: skip
# Where the data came from may be written many ways (a path with or without a trailing slash, or
# $CIFAR10_SOURCE): a run records what it trained on instead (count and content hash), and a resume
# refuses other images.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings (sys.argv without argv). From Python, the same flags as a list:
    train(parse_args(["--preset", "tiny", "--epochs", "1", "--out", "runs/try"]))."""
    p = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10-anytime", choices=sorted(msdnet.PRESETS))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, over all processes")
    p.add_argument("--accumulate", type=int, default=1, help="split each batch into this many micro-batches")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=("paper", "cosine", "constant"), default="paper",
                   help="paper: lr/10 at 50%% and 75%% of the epochs; cosine: linear warm-up then cosine to 0; "
                        "constant: linear warm-up then --lr throughout (for --swa)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up (cosine and constant schedules)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--distill", type=float, default=0.0, metavar="GAMMA",
                   help="weight of the last exit's softened predictions in the loss of every earlier exit (0: off)")
    p.add_argument("--distill-temperature", type=float, default=3.0, metavar="T", help="softmax temperature of --distill")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999; 0: off); "
                        "it is evaluated beside the trained weights and is what best.pt and the export keep")
    p.add_argument("--swa", action="store_true",
                   help="keep an equal-weight average of the weights after every step instead (stochastic weight "
                        "averaging, Izmailov et al. 2018), usually with --schedule constant; used like --ema's")
    p.add_argument("--cutout", type=int, default=0, metavar="PIXELS",
                   help="after crop and flip, paint a PIXELSxPIXELS square of the mean colour at a random place (0: off; the paper's CIFAR-10 value is 16)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and the augmentation")
    p.add_argument("--val-size", type=int, default=5000,
                   help="training images held out for validation, the same ones whatever --seed (the hold-out's seed is fixed at 0); 0 trains on all 50,000")
    p.add_argument("--eval-split", choices=("val", "test"), default="val", help="measured after every epoch")
    p.add_argument("--eval-subset", type=int, default=0, help="evaluate on N images spread over the classes (0: all)")
    p.add_argument("--train-subset", type=int, default=0, help="train on N images spread over the classes (0: all)")
    p.add_argument("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    p.add_argument("--out", default="runs/msdnet", help="folder for last.pt and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue <out>/last.pt exactly where it stopped")
    p.add_argument("--init-from", default=None, help="start from these weights (fresh optimizer and schedule)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="auto: bf16 (or fp16) autocast on CUDA, float32 on the CPU")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster on most CPUs)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (fewer, fused kernels: the step alone 1.4x the images/s of eager "
                        "on 2 CPU cores at batch 128, a whole epoch 1.15x, after about 2.5 min of compiling); "
                        "validation runs uncompiled. It changes "
                        "speed, not the run, so a run may be resumed with or without it")
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="stop cleanly (as Ctrl-C does: saved, resumable) after this much training in this process")
    p.add_argument("--fit-to", type=float, default=0.0, metavar="SECONDS",
                   help="time the first epoch, then give the cosine schedule as many epochs (at most --epochs) as "
                        "fit in SECONDS of training and validation; needs --schedule cosine and --warmup-epochs >= 1")
    args = p.parse_args(argv)
    _validate(args, p)
    return args


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Settings that would fail late (or train on quietly) are refused up front, in argparse's words."""
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
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)  # one line and exit status 2, like any argparse error


# ----------------------------------------------------------------------------- schedule and loss


def learning_rate(step: int, steps_per_epoch: int, args: argparse.Namespace) -> float:
    """The learning rate before optimizer step `step` (0-based): a pure function, so resuming needs no state."""
    total = args.epochs * steps_per_epoch
    if args.schedule == "paper":
        return args.lr * 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    warmup = round(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def multi_exit_loss(logits: list[Tensor], labels: Tensor, label_smoothing: float = 0.0,
                    distill: float = 0.0, temperature: float = 3.0) -> Tensor:
    """The paper's loss, the sum over exits of each exit's cross-entropy; with `distill` = gamma > 0,
    every exit k before the last learns also from the last exit's softened predictions (IMTA's
    one-for-all distillation, Li et al. 2019):

        (1 - gamma) * CE(z_k, y) + gamma * T^2 * KL(softmax(z_K / T) || softmax(z_k / T))

    The teacher z_K is detached, so the last exit learns from the labels only; T^2 keeps the
    gradients of the soft term on the scale of the hard one whatever T is."""
    ce = [F.cross_entropy(z.float(), labels, label_smoothing=label_smoothing) for z in logits]
    if not distill:
        return sum(ce)
    teacher = F.log_softmax(logits[-1].detach().float() / temperature, dim=1)
    kd = [
        F.kl_div(F.log_softmax(z.float() / temperature, dim=1), teacher, reduction="batchmean", log_target=True)
        * temperature**2
        for z in logits[:-1]
    ]
    return sum((1 - distill) * c + distill * k for c, k in zip(ce, kd)) + ce[-1]


# ----------------------------------------------------------------------------- set-up


def _run_settings(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in RUN_DEFINING}


def _check_resume(saved: dict, args: argparse.Namespace, path: Path) -> None:
    asked = _run_settings(args)
    saved = {**_run_settings(parse_args([])), **saved}  # a setting added since the run began had its default
    diff = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in asked.items() if saved.get(k) != v]
    if diff:
        raise checkpoint.CheckpointError(
            f"cannot resume {path}: the command differs from the run that made it ({'; '.join(diff)}). "
            "Resume with the same settings, or start a new run with another --out."
        )


# ----------------------------------------------------------------------------- the loop


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) training; returns the last epoch's log record.

    on_step(step) is called after every optimizer step; an exception it raises ends the run
    the way Ctrl-C does (KeyboardInterrupt saves the position first).
    """
    with exclusive(Path(args.out)):
        return _train(args, on_step)


@dataclass
class Progress:
    """Where a run stands: all that --resume needs besides the weights, the optimizer and the random
    state. The checkpoint's keys are these fields' names, defined here once."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # steps done in the current epoch
    perm: Tensor | None = None  # the current epoch's order of the training images
    elapsed_s: float = 0.0  # seconds of training (validation excluded), all processes before this one included
    epoch_images: int = 0  # images trained on in the current epoch
    epoch_loss_sum: float = 0.0  # the current epoch's batch losses, summed
    epoch_time_s: float = 0.0  # the current epoch's training seconds before an interruption
    best_score: float = -1.0  # mean validation accuracy over the exits of the weights in best.pt
    fitted_epochs: int = 0  # the schedule's length chosen by --fit-to after the first epoch (0: not yet, or off)
    epoch_record: dict = field(default_factory=dict)  # the last finished epoch's log record
    untimed_images: int = 0  # not saved: images of an epoch whose time an old checkpoint did not keep

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "untimed_images"}

    @classmethod
    def from_dict(cls, ckpt: dict) -> "Progress":
        p = cls(**{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt})
        if "epoch_time_s" not in ckpt:  # written before epochs were timed across a resume: time the rest only
            p.untimed_images = p.epoch_images
        return p


class _Run:
    """One training run's state and its three moves: a step, the end of an epoch, a save."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = device_for(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.ddp = Dist(self.device)
        self.out = Path(args.out)
        self.ckpt_path, self.log_path = self.out / "last.pt", self.out / "log.jsonl"
        if args.batch_size % (self.ddp.world * args.accumulate):
            raise ValueError(f"--batch-size {args.batch_size} must divide by processes x --accumulate "
                             f"({self.ddp.world} x {args.accumulate})")
        self._load_data()
        torch.manual_seed(args.seed)
        self.model = msdnet.build(args.preset).to(self.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        decay = [p for p in self.model.parameters() if p.dim() > 1]
        no_decay = [p for p in self.model.parameters() if p.dim() <= 1]  # BN and biases
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, momentum=args.momentum, nesterov=True,
        )
        self.amp_dtype = autocast_dtype(args, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.gen = torch.Generator().manual_seed(args.seed)  # data order and augmentation, the same on every rank
        self.progress = Progress()
        self.init_record = None  # the card and log of the weights --init-from started from, as they were then
        ckpt = self._start()
        # The average includes the batch-norm statistics (use_buffers), so it is a model ready to evaluate
        # (for --swa an average of running statistics: recomputing them changed the accuracy of the README's
        # weight averages by hundredths).
        # --swa weighs every step equally, --ema recent steps more. --swa's per-tensor avg_fn, not the default
        # foreach one: on CUDA that one divides the integer num_batches_tracked with addcdiv, an error (torch 2.11).
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema
                    else AveragedModel(self.model, avg_fn=get_swa_avg_fn(), use_buffers=True) if args.swa else None)
        if ckpt is not None and self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.net = nn.parallel.DistributedDataParallel(self.model) if self.ddp.world > 1 else self.model
        if args.compile:  # the same parameters and buffers: the optimizer, the average and validation see no difference
            self.net = torch.compile(self.net)
        self.micro = args.batch_size // (self.ddp.world * args.accumulate)
        self.timed_from: tuple[float, int] | None = None  # --fit-to: (time, steps done) where the first epoch's timing starts
        self.whole_first_epoch = self.progress.epoch == 0 and self.progress.batch_in_epoch == 0  # this process runs all of it
        self.train_end = 0.0  # when the last epoch's training ended (its validation follows)

    def _load_data(self) -> None:
        args = self.args
        train_set = data.load("train" if args.val_size else "trainval", args.source, val_size=args.val_size)
        eval_set = data.load(args.eval_split, args.source, val_size=args.val_size)
        if args.train_subset:
            train_set = data.subset(train_set, args.train_subset, "--train-subset")
        if args.eval_subset:
            eval_set = data.subset(eval_set, args.eval_subset, "--eval-subset")
        self.trained_on = {"train_images": len(train_set),
                           "train_fingerprint": fingerprint((train_set.images, train_set.labels))}
        if self.device.type == "cuda":  # CIFAR-10 is 150 MB of uint8: keep it on the GPU, batches never cross the bus
            torch.backends.cudnn.benchmark = True  # training's shapes never change: let cuDNN pick its fastest kernels
            train_set = data.Split(train_set.images.to(self.device), train_set.labels.to(self.device))
            eval_set = data.Split(eval_set.images.to(self.device), eval_set.labels.to(self.device))
        self.train_set, self.eval_set = train_set, eval_set
        self.steps_per_epoch = len(train_set) // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch ({args.batch_size})")

    def _start(self) -> dict | None:
        """Resume, start from given weights, or start afresh; returns the checkpoint resumed, if any."""
        args, path = self.args, self.ckpt_path
        if not args.resume:
            if path.exists():
                raise FileExistsError(f"{path} exists: continue it with --resume, or choose another --out")
            if args.init_from:
                start = checkpoint.read(args.init_from)
                preset = next((name for name, cfg in msdnet.PRESETS.items() if cfg.to_dict() == start["config"]), None)
                if preset not in (None, args.preset):  # the usual slip on the command line: say the flag to fix
                    raise checkpoint.CheckpointError(
                        f"--init-from {args.init_from} holds weights of the preset {preset!r}, not {args.preset!r}: "
                        f"pass --preset {preset}")
                checkpoint.load_weights(self.model, start, args.init_from)
                self.init_record = init_record_of(Path(args.init_from))
            return None
        if not path.exists():
            raise checkpoint.CheckpointError(f"--resume: there is no {path} to resume; drop --resume to start a new run")
        ckpt = checkpoint.read(path)
        if args.fit_to and ckpt.get("fitted_epochs"):
            args.epochs = ckpt["fitted_epochs"]  # the length --fit-to chose when the run began
        _check_resume(ckpt["run"], args, path)
        if ckpt.get("data", self.trained_on) != self.trained_on:
            saved, now = ckpt["data"], self.trained_on
            raise checkpoint.CheckpointError(
                f"cannot resume {path}: it was trained on other images ({saved['train_images']} training images, "
                f"content {saved['train_fingerprint']}; now {now['train_images']}, content {now['train_fingerprint']}). "
                f"Point --source (or ${data.ENV_SOURCE}) at the data the run began with, or start a new run with another --out."
            )
        checkpoint.load_weights(self.model, ckpt, path)
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        elif self.ddp.main:  # a compact checkpoint (checkpoint.compact): everything but the momentum
            print("this checkpoint carries no optimizer state: the momentum starts again from zero", flush=True)
        self.gen.set_state(ckpt["generator"])
        self.init_record = ckpt.get("init_record")
        self.progress = p = Progress.from_dict(ckpt)
        if not (self.out / "best.pt").is_file():  # carried without it: the next validated epoch writes one
            p.best_score = -1.0
        if p.epoch_record and self.ddp.main and last_logged_epoch(self.log_path) < p.epoch_record["epoch"]:
            append_record(self.log_path, p.epoch_record)  # stopped between the checkpoint and its log line
        if self.ddp.main:
            print(f"resuming {path} at epoch {p.epoch + 1}, batch {p.batch_in_epoch}/{self.steps_per_epoch}", flush=True)
        return ckpt

    def _about(self) -> dict:
        """What every saved file says of the run: settings, hardware, data."""
        return {"run": _run_settings(self.args), "hardware": hardware_name(self.device), "torch": str(torch.__version__),
                "data": self.trained_on,
                "data_source": data.resolve_source(self.args.source),  # the source for the record; the fingerprint decides
                **({"init_record": self.init_record} if self.init_record else {})}

    def save(self) -> None:
        if self.ddp.main:
            atomic.save({
                "format": "msdnet-train/1", "config": self.model.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "generator": self.gen.get_state(), **self.progress.to_dict(), **self._about(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            }, self.ckpt_path)  # fmt: skip

    def step(self) -> tuple[float, float]:
        """One optimizer step on the next batch; returns (batch loss, learning rate)."""
        args, p, dev = self.args, self.progress, self.device
        lr = learning_rate(p.epoch * self.steps_per_epoch + p.batch_in_epoch, self.steps_per_epoch, args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        idx = p.perm[p.batch_in_epoch * args.batch_size : (p.batch_in_epoch + 1) * args.batch_size]
        # Every rank augments the whole global batch with the shared generator, then takes its share:
        # the data (and the random state) are the same whatever the number of processes.
        x = data.random_crop_flip(self.train_set.images[idx].to(dev), generator=self.gen)
        if args.cutout:  # the mean colour in 0..255, so the square is zero once the model normalizes
            x = data.cutout(x, args.cutout, (self.model.mean.view(-1) * 255).round(), generator=self.gen)
        y = self.train_set.labels[idx].to(dev)
        self.optimizer.zero_grad(set_to_none=True)
        batch_loss, m = 0.0, self.micro
        for j, part in enumerate(range(self.ddp.rank * args.accumulate, (self.ddp.rank + 1) * args.accumulate)):
            xs = x[part * m : (part + 1) * m].float().div_(255)
            if args.channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            sync = nullcontext() if self.ddp.world == 1 or j == args.accumulate - 1 else self.net.no_sync()
            with sync, torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                loss = multi_exit_loss(self.net(xs), y[part * m : (part + 1) * m], args.label_smoothing,
                                       args.distill, args.distill_temperature)
                self.scaler.scale(loss / args.accumulate).backward()
            batch_loss += loss.item() / args.accumulate
        if not math.isfinite(batch_loss) and self.amp_dtype != torch.float16:  # fp16's scaler skips such steps
            raise Diverged(
                f"the loss became {batch_loss} at epoch {p.epoch + 1}, step {p.batch_in_epoch + 1} (lr {lr:.4g}): "
                f"the run diverged and was stopped before the bad step; {self.ckpt_path} still holds the last "
                "good state. Start again with a lower --lr or a longer --warmup-epochs."
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        p.batch_in_epoch += 1
        p.epoch_images += len(idx)
        p.epoch_loss_sum += batch_loss
        return batch_loss, lr

    def end_epoch(self, train_seconds: float) -> None:
        """Close the epoch: validate (the moving average too), keep the best weights, save, then log."""
        args, p = self.args, self.progress
        self.train_end = time.perf_counter()
        epoch_time = p.epoch_time_s + train_seconds  # the whole epoch, also when a resume split it
        record = {"epoch": p.epoch + 1, "step": (p.epoch + 1) * self.steps_per_epoch,
                  "lr": learning_rate((p.epoch + 1) * self.steps_per_epoch - 1, self.steps_per_epoch, args),
                  "train_loss": p.epoch_loss_sum / self.steps_per_epoch, "eval_split": args.eval_split,
                  "train_images_per_s": round((p.epoch_images - p.untimed_images) / max(epoch_time, 1e-9), 1),
                  "epoch_time_s": round(epoch_time, 1),
                  # a compiled process's first epoch includes the compiling (minutes on a CPU) in its time
                  "compiled": bool(args.compile)}  # fmt: skip
        p.epoch, p.batch_in_epoch, p.perm, p.epoch_images, p.epoch_loss_sum = p.epoch + 1, 0, None, 0, 0.0
        p.epoch_time_s, p.untimed_images = 0.0, 0
        if self.ddp.main:
            record.update(self._validate())
            record["elapsed_s"] = round(p.elapsed_s, 1)
            p.epoch_record = record
        if args.fit_to and not p.fitted_epochs:
            self.fit_schedule(epoch_time)  # before the save, so the checkpoint holds the schedule's length
        self.save()  # the checkpoint first, then the log line that announces it (a resume restores a lost line)
        if self.ddp.main:
            append_record(self.log_path, record)
        self.ddp.barrier()

    def fit_schedule(self, epoch_time: float) -> None:
        """--fit-to, at the end of the first epoch: the epochs that fit in the budget, from this epoch's
        steps after its first quarter (cuDNN's tuning and the caches' warm-up come before) and a second,
        timed validation pass (on a GPU the first one paid for tuning its own shapes: 14 s instead of 0.6).
        An epoch that a resume split is not timed in part: its whole `epoch_time` counts, warm-up included."""
        args, p = self.args, self.progress
        again = time.perf_counter()
        exit_accuracies(self.model, self.eval_set, device=self.device)
        eval_s = (time.perf_counter() - again) * (2 if self.ema is not None else 1)  # the average is validated too
        if self.timed_from is not None:
            start, steps_before = self.timed_from
            step_s = (self.train_end - start) / max(1, self.steps_per_epoch - steps_before)
        else:
            step_s = epoch_time / self.steps_per_epoch
        epoch_s = step_s * self.steps_per_epoch + eval_s
        left = args.fit_to - (p.elapsed_s + time.perf_counter() - self.train_end)  # what the first epoch really spent
        fits = p.epoch + math.floor(max(0.0, left) / max(epoch_s, 1e-9))
        # At least one epoch after the warm-up, so that the rate decays, even if it overruns the budget
        # (--time-limit is the hard stop); never more than --epochs.
        fitted = min(args.epochs, max(p.epoch, fits, math.ceil(args.warmup_epochs) + 1))
        if self.ddp.world > 1:  # every rank must run the same schedule: rank 0's timing decides
            box = torch.tensor([fitted], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(box, 0)
            fitted = int(box.item())
        p.fitted_epochs = args.epochs = fitted
        if self.ddp.main:
            print(f"--fit-to {args.fit_to:g} s: an epoch takes about {epoch_s:.1f} s with validation; "
                  f"the cosine schedule gets {fitted} epochs"
                  + (f" (the budget fits {fits}: too few to decay after the warm-up)" if fitted > fits else ""), flush=True)

    def _validate(self) -> dict:
        args, p = self.args, self.progress
        start = time.perf_counter()
        accs = exit_accuracies(self.model, self.eval_set, device=self.device)
        accs_ema = exit_accuracies(self.ema.module, self.eval_set, device=self.device) if self.ema is not None else None
        out = {"eval_images": len(self.eval_set), "acc": [round(a, 5) for a in accs],
               **({"acc_ema": [round(a, 5) for a in accs_ema]} if accs_ema is not None else {}),
               "eval_time_s": round(time.perf_counter() - start, 1)}
        print(f"epoch {p.epoch}: {args.eval_split} accuracy per exit " + " ".join(f"B{k + 1}={a:.3f}" for k, a in enumerate(accs)), flush=True)
        if accs_ema is not None:
            print(f"epoch {p.epoch}: moving average, per exit " + " ".join(f"B{k + 1}={a:.3f}" for k, a in enumerate(accs_ema)), flush=True)
        kept = accs_ema if accs_ema is not None else accs
        if args.eval_split == "val" and sum(kept) / len(kept) > p.best_score:
            # Chosen on validation only: the weights the export ships, kept before the next epoch moves on.
            # "ema" names the average of either kind (--ema or --swa); the run's settings say which.
            p.best_score = sum(kept) / len(kept)
            atomic.save({"format": "msdnet-weights/1", "config": self.model.config.to_dict(),
                         "model": (self.ema.module if self.ema is not None else self.model).state_dict(),
                         "weights": "ema" if self.ema is not None else "trained", "epoch": p.epoch,
                         "elapsed_s": p.elapsed_s, "val_accuracy_per_exit": out["acc_ema" if accs_ema is not None else "acc"],
                         **self._about()}, self.out / "best.pt")  # fmt: skip
        return out


def _train(args: argparse.Namespace, on_step: Callable[[int], None] | None) -> dict:
    from tqdm.auto import tqdm

    run = _Run(args)
    p = run.progress
    stop = StopRequest(args.time_limit)
    consistent, t0 = True, time.perf_counter()  # consistent: no step is half done, so the state may be saved
    try:
        if args.fit_to and not p.fitted_epochs and p.epoch >= 1:  # stopped after epoch 1's steps but before its fit
            run.train_end = time.perf_counter()
            run.fit_schedule(p.epoch_record.get("epoch_time_s", 0.0) if p.epoch_record else 0.0)
        while p.epoch < args.epochs:
            if p.perm is None:
                p.perm = torch.randperm(len(run.train_set), generator=run.gen)
            run.net.train()
            bar = tqdm(total=run.steps_per_epoch, initial=p.batch_in_epoch, desc=f"epoch {p.epoch + 1}/{args.epochs}",
                       disable=not run.ddp.main, mininterval=2, dynamic_ncols=True)
            t0, seen_before = time.perf_counter(), p.epoch_images
            while p.batch_in_epoch < run.steps_per_epoch:
                if (args.fit_to and p.epoch == 0 and run.whole_first_epoch and run.timed_from is None
                        and p.batch_in_epoch >= run.steps_per_epoch // 4):
                    run.timed_from = (time.perf_counter(), p.batch_in_epoch)
                consistent = False
                loss, lr = run.step()
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


def init_record_of(weights: Path) -> dict | None:
    """The card and training log beside the weights a run starts from, kept in the run: an export
    chains the new card to them even if the shipped files were replaced in between (say, by an export
    of this same run's best epoch so far)."""
    card = weights.with_suffix(".json")
    if not card.is_file():
        return None
    try:
        record = json.loads(card.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise checkpoint.CheckpointError(f"{card}, the card beside the --init-from weights, is not a JSON object: "
                                         "restore it (git checkout), or move it away to start without its record")
    log = weights.parent / record.get("training_log", "training-log.jsonl")  # cards before it was named: that name
    return {"card": record, "log": [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []}


def main(argv: list[str] | None = None) -> int:
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
