"""Train MSD-Net on CIFAR-10: `python -m helpers.train --help`.

Loss = sum of the cross-entropies of all exits. SGD with Nesterov momentum, and either the
paper's schedule (lr / 10 at 50% and 75% of training) or a short one for CPUs (linear warm-up,
then cosine to zero). After every epoch the accuracy of every exit on the evaluation split is
appended to <out>/log.jsonl, and <out>/last.pt is written atomically; Ctrl-C (or SIGTERM)
saves the exact position, and `--resume` continues from it: model, optimizer, schedule,
data order and random state, so an interrupted run ends with the same weights as one that
was not. Several GPUs or nodes: `torchrun --nproc_per_node N -m helpers.train ...`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import atomic, checkpoint, data, msdnet
from .cache import fingerprint

# Settings that define what a run computes; `--resume` refuses to change them.
RUN_DEFINING = (
    "preset", "epochs", "batch_size", "accumulate", "lr", "momentum", "weight_decay", "schedule",
    "warmup_epochs", "label_smoothing", "distill", "distill_temperature", "ema", "seed", "val_size", "train_subset", "init_from", "channels_last",
    "amp",
)  # fmt: skip
# Where the data came from may be written many ways (a path with or without a trailing slash, or
# $CIFAR10_SOURCE): a run records what it trained on instead (count and content hash), and a resume
# refuses other images.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helpers.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar10-anytime", choices=sorted(msdnet.PRESETS))
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, over all processes")
    p.add_argument("--accumulate", type=int, default=1, help="split each batch into this many micro-batches")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=("paper", "cosine"), default="paper",
                   help="paper: lr/10 at 50%% and 75%% of the epochs; cosine: linear warm-up then cosine to 0")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up (cosine schedule)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--distill", type=float, default=0.0, metavar="GAMMA",
                   help="weight of the last exit's softened predictions in the loss of every earlier exit (0: off)")
    p.add_argument("--distill-temperature", type=float, default=3.0, metavar="T", help="softmax temperature of --distill")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="also keep an exponential moving average of the weights (e.g. 0.999; 0: off); "
                        "it is evaluated beside the trained weights and is what best.pt and the export keep")
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
    p.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="stop cleanly (as Ctrl-C does: saved, resumable) after this much training in this process")
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
        (args.val_size >= 0 and args.train_subset >= 0 and args.eval_subset >= 0, "sizes must be >= 0"),
        (args.time_limit >= 0, "--time-limit must be >= 0"),
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


@torch.no_grad()
def exit_accuracies(model: nn.Module, split: data.Split, batch_size: int = 500, device=None,
                    flip: bool = False) -> list[float]:
    """Share of `split` each exit classifies correctly; flip=True averages each exit's logits for the
    image and its mirror (test-time augmentation, at twice the cost)."""
    model.eval()
    device = device or next(model.parameters()).device
    correct = None
    for i in range(0, len(split), batch_size):
        x = split.images[i : i + batch_size].to(device).float().div_(255)
        y = split.labels[i : i + batch_size].to(device)
        logits = model(x)
        if flip:
            logits = [(a + b) / 2 for a, b in zip(logits, model(x.flip(-1)))]
        hits = torch.stack([(z.argmax(1) == y).sum() for z in logits])
        correct = hits if correct is None else correct + hits
    return (correct.double() / len(split)).tolist()


# ----------------------------------------------------------------------------- set-up


class _Dist:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if args.amp == "off" or (args.amp == "auto" and device.type != "cuda"):
        return None
    if args.amp == "fp16" or (args.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def hardware_name(device: torch.device) -> str:
    """What the run trained on, for the card: the GPU's name, or the CPU's architecture and cores."""
    if device.type == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


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


class OutFolderBusy(RuntimeError):
    """Another run holds the output folder."""


@contextmanager
def _exclusive(out: Path):
    """Hold <out>/.lock while training, so a second run into the same folder is refused instead of
    interleaving its checkpoints and log with ours. The operating system releases the lock when the
    process ends, however it ends, so a killed run never leaves the folder locked."""
    if fcntl is None or int(os.environ.get("RANK", 0)) != 0:  # Windows: no lock; DDP: rank 0 holds it
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutFolderBusy(f"another training run is writing to {out}; wait for it to end, or choose another --out") from None
        try:
            yield
        finally:
            if [p.name for p in out.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
                (out / ".lock").unlink()
                out.rmdir()


def train(args: argparse.Namespace, on_step: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) training; returns the last epoch's log record.

    on_step(step) is called after every optimizer step; an exception it raises ends the run
    the way Ctrl-C does (KeyboardInterrupt saves the position first).
    """
    with _exclusive(Path(args.out)):
        return _train(args, on_step)


def _train(args: argparse.Namespace, on_step: Callable[[int], None] | None) -> dict:
    device = _device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = _Dist(device)
    out = Path(args.out)
    ckpt_path, log_path = out / "last.pt", out / "log.jsonl"
    if args.batch_size % (ddp.world * args.accumulate):
        raise ValueError(f"--batch-size {args.batch_size} must divide by processes x --accumulate ({ddp.world} x {args.accumulate})")

    train_set = data.load("train" if args.val_size else "trainval", args.source, val_size=args.val_size)
    eval_set = data.load(args.eval_split, args.source, val_size=args.val_size)
    if args.train_subset:
        train_set = data.subset(train_set, args.train_subset)
    if args.eval_subset:
        eval_set = data.subset(eval_set, args.eval_subset)
    if device.type == "cuda":  # CIFAR-10 is 150 MB of uint8: keep it on the GPU, so batches never cross the bus
        train_set = data.Split(train_set.images.to(device), train_set.labels.to(device))
        eval_set = data.Split(eval_set.images.to(device), eval_set.labels.to(device))
    trained_on = {"train_images": len(train_set), "train_fingerprint": fingerprint((train_set.images, train_set.labels))}
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch ({args.batch_size})")

    torch.manual_seed(args.seed)
    model = msdnet.build(args.preset).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params_decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    params_no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]  # BN and biases
    optimizer = torch.optim.SGD(
        [{"params": params_decay, "weight_decay": args.weight_decay}, {"params": params_no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=args.momentum, nesterov=True,
    )
    amp_dtype = _autocast_dtype(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    gen = torch.Generator().manual_seed(args.seed)  # data order and augmentation, identical on every rank
    epoch, batch_in_epoch, perm, elapsed = 0, 0, None, 0.0
    seen, loss_sum = 0, 0.0  # this epoch's images and summed batch losses, kept across an interruption
    epoch_time_before, seen_untimed = 0.0, 0  # this epoch's training seconds before an interruption
    record: dict = {}  # the last finished epoch's log record

    if args.resume and ckpt_path.exists():
        ckpt = checkpoint.read(ckpt_path)
        _check_resume(ckpt["run"], args, ckpt_path)
        if ckpt.get("data", trained_on) != trained_on:
            raise checkpoint.CheckpointError(
                f"cannot resume {ckpt_path}: it was trained on other images ({ckpt['data']['train_images']} training "
                f"images, content {ckpt['data']['train_fingerprint']}; now {trained_on['train_images']}, content "
                f"{trained_on['train_fingerprint']}). Point --source (or ${data.ENV_SOURCE}) at the data the run "
                "began with, or start a new run with another --out."
            )
        checkpoint.load_weights(model, ckpt, ckpt_path)
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        elif ddp.main:  # a compact checkpoint (checkpoint.compact): everything but the momentum
            print("this checkpoint carries no optimizer state: the momentum starts again from zero", flush=True)
        gen.set_state(ckpt["generator"])
        epoch, batch_in_epoch, perm, elapsed = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["perm"], ckpt["elapsed_s"]
        seen, loss_sum = ckpt["epoch_images"], ckpt["epoch_loss_sum"]
        record = ckpt.get("epoch_record", {})
        if record and ddp.main and _last_logged_epoch(log_path) < record["epoch"]:
            _append_record(log_path, record)  # stopped between the checkpoint and its log line
        if "epoch_time_s" in ckpt:
            epoch_time_before = ckpt["epoch_time_s"]
        else:  # older checkpoints did not keep it: time this epoch from the resume on
            seen_untimed = seen
        if ddp.main:
            print(f"resuming {ckpt_path} at epoch {epoch + 1}, batch {batch_in_epoch}/{steps_per_epoch}", flush=True)
    elif args.resume:
        raise checkpoint.CheckpointError(f"--resume: there is no {ckpt_path} to resume; drop --resume to start a new run")
    elif args.init_from:
        checkpoint.load_weights(model, checkpoint.read(args.init_from), args.init_from)
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: continue it with --resume, or choose another --out")

    # The moving average includes the batch-norm statistics (use_buffers), so it is a model ready to evaluate.
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    best_score = -1.0  # mean validation accuracy over the exits of the weights best.pt holds
    if args.resume and ckpt_path.exists():
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        if (out / "best.pt").is_file():  # else the next validated epoch writes a new one
            best_score = ckpt.get("best_score", -1.0)
    net = nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    micro = args.batch_size // (ddp.world * args.accumulate)

    def save() -> None:
        if ddp.main:
            atomic.save(
                {
                    "format": "msdnet-train/1",
                    "config": model.config.to_dict(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "generator": gen.get_state(),
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "perm": perm,
                    "elapsed_s": elapsed,
                    "epoch_images": seen,
                    "epoch_loss_sum": loss_sum,
                    "epoch_time_s": epoch_time_before,
                    "best_score": best_score,
                    "epoch_record": record,
                    "hardware": hardware_name(device),
                    "run": _run_settings(args),
                    "data": trained_on,
                    "data_source": data.resolve_source(args.source),  # for the record; the fingerprint decides
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                },
                ckpt_path,
            )

    from tqdm.auto import tqdm

    stop = _StopRequest(args.time_limit)
    consistent, t0 = True, time.perf_counter()  # consistent: no step is half done, so the state may be saved
    try:
        while epoch < args.epochs:
            if perm is None:
                perm = torch.randperm(len(train_set), generator=gen)
            net.train()
            bar = tqdm(total=steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not ddp.main, mininterval=2, dynamic_ncols=True)
            t0, seen_before = time.perf_counter(), seen
            while batch_in_epoch < steps_per_epoch:
                step = epoch * steps_per_epoch + batch_in_epoch
                consistent = False
                lr = learning_rate(step, steps_per_epoch, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = perm[batch_in_epoch * args.batch_size : (batch_in_epoch + 1) * args.batch_size]
                # Every rank augments the whole global batch with the shared generator, then takes its share:
                # the data (and the random state) are the same whatever the number of processes.
                x = data.random_crop_flip(train_set.images[idx].to(device), generator=gen)
                y = train_set.labels[idx].to(device)
                mine = range(ddp.rank * args.accumulate, (ddp.rank + 1) * args.accumulate)
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                for j, part in enumerate(mine):
                    xs = x[part * micro : (part + 1) * micro].float().div_(255)
                    if args.channels_last:
                        xs = xs.contiguous(memory_format=torch.channels_last)
                    sync = nullcontext() if ddp.world == 1 or j == args.accumulate - 1 else net.no_sync()
                    with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        loss = multi_exit_loss(net(xs), y[part * micro : (part + 1) * micro], args.label_smoothing,
                                               args.distill, args.distill_temperature)
                        scaler.scale(loss / args.accumulate).backward()
                    batch_loss += loss.item() / args.accumulate
                if not math.isfinite(batch_loss) and amp_dtype != torch.float16:  # fp16's scaler skips such steps
                    raise Diverged(
                        f"the loss became {batch_loss} at epoch {epoch + 1}, step {batch_in_epoch + 1} (lr {lr:.4g}): "
                        f"the run diverged and was stopped before the bad step; {ckpt_path} still holds the last "
                        "good state. Start again with a lower --lr or a longer --warmup-epochs."
                    )
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update_parameters(model)
                batch_in_epoch += 1
                consistent = True
                seen += len(idx)
                loss_sum += batch_loss
                rate = (seen - seen_before) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{batch_loss:.3f}", lr=f"{lr:.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.update()
                if on_step is not None:
                    on_step(step + 1)
                stop.check()
            bar.close()
            part = time.perf_counter() - t0
            elapsed += part
            epoch_time = epoch_time_before + part  # the whole epoch, also when a resume split it
            epoch_loss, epoch_rate = loss_sum / steps_per_epoch, (seen - seen_untimed) / max(epoch_time, 1e-9)
            epoch, batch_in_epoch, perm, seen, loss_sum = epoch + 1, 0, None, 0, 0.0
            epoch_time_before, seen_untimed = 0.0, 0
            last_lr = learning_rate(epoch * steps_per_epoch - 1, steps_per_epoch, args)
            if ddp.main:
                t_eval = time.perf_counter()
                accs = exit_accuracies(model, eval_set, device=device)
                accs_ema = exit_accuracies(ema.module, eval_set, device=device) if ema is not None else None
                record = {
                    "epoch": epoch, "step": epoch * steps_per_epoch, "lr": last_lr,
                    "train_loss": epoch_loss, "eval_split": args.eval_split,
                    "eval_images": len(eval_set), "acc": [round(a, 5) for a in accs],
                    **({"acc_ema": [round(a, 5) for a in accs_ema]} if ema is not None else {}),
                    "epoch_time_s": round(epoch_time, 1), "eval_time_s": round(time.perf_counter() - t_eval, 1),
                    "train_images_per_s": round(epoch_rate, 1), "elapsed_s": round(elapsed, 1),
                }  # fmt: skip
                print(f"epoch {epoch}: {args.eval_split} accuracy per exit "
                      + " ".join(f"B{k + 1}={a:.3f}" for k, a in enumerate(accs)), flush=True)
                if ema is not None:
                    print(f"epoch {epoch}: moving average, per exit "
                          + " ".join(f"B{k + 1}={a:.3f}" for k, a in enumerate(accs_ema)), flush=True)
                kept = accs_ema if ema is not None else accs
                if args.eval_split == "val" and sum(kept) / len(kept) > best_score:
                    # Chosen on validation only: the weights the export ships, kept before the next epoch moves on.
                    best_score = sum(kept) / len(kept)
                    atomic.save(
                        {"format": "msdnet-weights/1", "config": model.config.to_dict(),
                         "model": (ema.module if ema is not None else model).state_dict(),
                         "weights": "ema" if ema is not None else "trained", "epoch": epoch,
                         "elapsed_s": elapsed, "hardware": hardware_name(device), "val_accuracy_per_exit": record[
                             "acc_ema" if ema is not None else "acc"], "run": _run_settings(args),
                         "data": trained_on, "data_source": data.resolve_source(args.source)},
                        out / "best.pt",
                    )  # fmt: skip
            save()  # the checkpoint first, then the log line that announces it (a resume restores a lost line)
            if ddp.main:
                _append_record(log_path, record)
            ddp.barrier()
            stop.check()
    except KeyboardInterrupt:
        if consistent:
            if batch_in_epoch:
                part = time.perf_counter() - t0
                elapsed += part
                epoch_time_before += part
            save()
            if ddp.main:
                print(f"\ninterrupted: saved {ckpt_path} at epoch {epoch + 1}, batch {batch_in_epoch}; "
                      "continue with the same command and --resume", file=sys.stderr, flush=True)
        raise
    finally:
        stop.restore()
    return record


def _append_record(log_path: Path, record: dict) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _last_logged_epoch(log_path: Path) -> int:
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    return json.loads(lines[-1])["epoch"] if lines else 0


class Diverged(RuntimeError):
    """The loss is no longer finite: the run stops before the step that would spoil the weights."""


class TimeUp(KeyboardInterrupt):
    """--time-limit reached: the run stopped as Ctrl-C stops it (saved, resumable)."""


class _StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step (a second Ctrl-C stops at once);
    so does the end of `time_limit` seconds (0: none) counted from now."""

    def __init__(self, time_limit: float = 0.0) -> None:
        self.requested = False
        self.deadline = time.perf_counter() + time_limit if time_limit else math.inf
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt
        if time.perf_counter() > self.deadline:
            raise TimeUp

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
