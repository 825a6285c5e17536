"""Training MSD-Net on CIFAR-10: the multi-exit loss, one optimizer step, and the loop that notebook
[02](../notebooks/02_training_msdnet_on_cifar10.ipynb) teaches, resumable at any step.

    from helpers import train
    from helpers.recipe import RECIPES
    train.train(RECIPES["laptop"], "runs/laptop")          # `msdnet train --recipe laptop` from Python

Run the same call again after a stop and it goes on where it stopped.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import augment, checkpoint, data, evaluate, machine
from .averaging import WeightAverage
from .cache import fingerprint
from .distillation import soft_losses
from .errors import OneLineError
from .interrupts import StopRequest
from .recipe import Recipe
from .runfolder import RunFolder
from .schedule import learning_rate
from .state import TrainingState

__all__ = ["Diverged", "multi_exit_loss", "train_step", "compiled", "TrainingData", "load_training_data", "train"]


class Diverged(OneLineError, RuntimeError):
    """The loss is no longer finite: the run stops before the step that would spoil the weights."""


def multi_exit_loss(logits: list[Tensor], labels: Tensor, label_smoothing: float = 0.0,
                    distill: float = 0.0, temperature: float = 3.0) -> Tensor:
    """The paper's loss: the sum over the exits of each exit's cross-entropy.

    With ``distill`` = gamma > 0 every exit k before the last learns also from the last exit's softened
    predictions (`helpers.distillation.soft_losses`): ``(1 - gamma) * CE(z_k, y) + gamma * soft_k``.

    Args:
        logits: one [B, classes] tensor per exit.
        labels: [B] class indices.
    Returns:
        a scalar.
    """
    ce = [F.cross_entropy(z.float(), labels, label_smoothing=label_smoothing) for z in logits]
    if not distill:
        return sum(ce)
    soft = soft_losses(logits, temperature)
    return sum((1 - distill) * c + distill * s for c, s in zip(ce, soft)) + ce[-1]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, *,
               label_smoothing: float = 0.0, distill: float = 0.0, temperature: float = 3.0,
               amp: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               micro_batches: int = 1, average: WeightAverage | None = None) -> float:
    """One optimizer step: forward, `multi_exit_loss`, backward, the optimizer (and the weight average).

    Args:
        model: the network in train mode, or its DDP or compiled wrapper.
        images: float [B, 3, 32, 32] in [0, 1]; labels: [B].
        amp: the autocast dtype (None: float32). scaler: a GradScaler, for float16.
        micro_batches: split the batch into this many equal parts and sum their gradients.
        average: updated after the step.
    Returns:
        the batch's loss.
    Raises:
        Diverged: the loss is not finite; the step was not taken (with an enabled scaler it skips it).
    """
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    total = torch.zeros((), device=images.device)
    parts = list(zip(images.chunk(micro_batches), labels.chunk(micro_batches)))
    for j, (x, y) in enumerate(parts):
        last = j == len(parts) - 1  # DDP averages the gradients over the processes after the last part only
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = multi_exit_loss(model(x), y, label_smoothing, distill, temperature) / len(parts)
            (scaler.scale(loss) if scaling else loss).backward()
        total += loss.detach()
    value = total.item()
    if not math.isfinite(value) and not scaling:
        raise Diverged(f"the loss became {value}")
    if scaling:
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
    compiles once. The parameters stay the model's: the optimizer, a weight average and an uncompiled
    validation see the same tensors.
    """
    return torch.compile(model, mode=mode, dynamic=False)


@dataclass
class TrainingData:
    """The images a recipe trains on and validates with.

    Attributes:
        train: the training images (uint8, on the training device).
        val: the validation hold-out, or None when the recipe holds none out.
        id: {"train_images": count, "train_fingerprint": content hash}: what a resume checks.
    """

    train: data.Split
    val: data.Split | None
    id: dict


def load_training_data(recipe: Recipe, source: str | None, device: torch.device) -> TrainingData:
    """The recipe's training images (and validation hold-out), moved to `device` when it is a GPU."""
    train_set = data.load("train" if recipe.val_size else "trainval", source, val_size=recipe.val_size)
    val = data.load("val", source, val_size=recipe.val_size) if recipe.val_size else None
    if recipe.train_subset:
        train_set = data.subset(train_set, recipe.train_subset, "train_subset")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if recipe.batch_size % (world * recipe.accumulate):
        raise ValueError(f"batch_size {recipe.batch_size} must divide by processes x accumulate "
                         f"({world} x {recipe.accumulate})")
    if len(train_set) < recipe.batch_size:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch ({recipe.batch_size}): "
                         "lower batch_size")
    data_id = {"train_images": len(train_set), "train_fingerprint": fingerprint((train_set.images, train_set.labels))}
    if device.type == "cuda":  # CIFAR-10 is 150 MB of uint8: it stays on the GPU, augmented there
        torch.backends.cudnn.benchmark = True  # the training shapes never change
        train_set = data.Split(train_set.images.to(device), train_set.labels.to(device))
        val = data.Split(val.images.to(device), val.labels.to(device)) if val is not None else None
    return TrainingData(train_set, val, data_id)


def _batch(state: TrainingState, images: data.Split, processes: machine.Processes,
           memory_format: torch.memory_format) -> tuple[Tensor, Tensor]:
    """This process's share of the next batch, as images in [0, 1] and labels.

    Every process augments the whole batch with the run's generator, then takes its share, so the data
    and the random state are the same whatever the number of processes.
    """
    recipe, p = state.recipe, state.progress
    idx = p.order[p.step * recipe.batch_size : (p.step + 1) * recipe.batch_size].to(images.images.device)
    x = augment.random_crop_flip(images.images[idx], generator=state.generator)
    if recipe.cutout:  # the mean colour in 0..255, which the model standardizes to zero
        x = augment.cutout(x, recipe.cutout, (state.model.mean.view(-1) * 255).round(), generator=state.generator)
    share = recipe.batch_size // processes.world
    mine = slice(processes.rank * share, (processes.rank + 1) * share)
    x = x[mine].float().div_(255).contiguous(memory_format=memory_format)
    return x, images.labels[idx][mine]


def _validate(state: TrainingState, val: data.Split, device: torch.device) -> dict:
    """Every exit's validation accuracy, of the trained weights and of their average."""
    start = time.perf_counter()
    out = {"val_images": len(val), "acc": [round(a, 5) for a in evaluate.exit_accuracies(state.model, val, device=device)]}
    if state.average is not None:
        out.update(average=state.recipe.average,
                   acc_average=[round(a, 5) for a in evaluate.exit_accuracies(state.average.module, val, device=device)])
    out["eval_time_s"] = round(time.perf_counter() - start, 1)
    return out


def _keep_best(state: TrainingState, record: dict, folder: RunFolder) -> None:
    """Write best.pt when the weights the run ships (the average, if any) beat the best so far on validation."""
    kept = record.get("acc_average", record["acc"])
    if sum(kept) / len(kept) > state.progress.best_score:
        state.progress.best_score = sum(kept) / len(kept)
        weights = state.average.module if state.average is not None else state.model
        checkpoint.write({"config": state.model.config.to_dict(), "model": weights.state_dict(), "recipe": state.recipe.to_dict(),
               "weights": state.recipe.average if state.average is not None else "trained",
               "epoch": record["epoch"], "val_accuracy_per_exit": kept}, folder.best)


def train(recipe: Recipe, out: str | os.PathLike, *, device: str = "auto", source: str | None = None,
          amp: str = "auto", channels_last: bool = False, compile: bool = False, time_limit: float = 0.0,
          on_step: Callable[[int], None] | None = None, progress_bar: bool = True) -> dict:
    """Train `recipe` into the folder `out`, or go on with the run saved there.

    Every epoch ends with validation, ``out/last.pt`` (the state to resume), ``out/best.pt`` (the
    weights that score best on validation) and a line in ``out/log.jsonl``, in that order. Ctrl-C,
    SIGTERM or `time_limit` seconds stop the run after the current step, saved.

    Args:
        device: "auto" (CUDA when there is one), "cpu", "cuda", "cuda:N" or "mps".
        source: CIFAR-10's source (helpers.data.resolve_source).
        amp, channels_last, compile: the number format (machine.autocast_dtype), memory layout and
            torch.compile; they change the speed, not the recipe, so a run may resume with others.
        on_step: called with the run's step count after every step; a KeyboardInterrupt it raises stops
            the run as Ctrl-C does.
    Returns:
        the last epoch's log line.
    Raises:
        KeyboardInterrupt (TimeUp for the time limit): stopped, with the state saved.
        state.ResumeError: `out` holds a run of another recipe or other images.
        runfolder.FolderBusy: another run writes to `out`.
    """
    dev = machine.device_for(device)
    amp_dtype = machine.autocast_dtype(amp, dev)
    folder = RunFolder(out)
    processes = machine.Processes(dev)
    with folder.lock():
        images = load_training_data(recipe, source, dev)
        if folder.state.is_file():
            state = TrainingState.resume(folder.state, recipe, dev, images.id)
        else:
            state = TrainingState.start(recipe, dev, images.id)
        return _loop(state, images, folder, processes, dev, amp_dtype, channels_last, compile, time_limit, on_step,
                     progress_bar)


def _loop(state: TrainingState, images: TrainingData, folder: RunFolder, processes: machine.Processes,
          dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, compile: bool, time_limit: float,
          on_step: Callable[[int], None] | None, progress_bar: bool) -> dict:
    from tqdm.auto import tqdm

    recipe, p, main = state.recipe, state.progress, processes.main
    say = print if main else (lambda *a, **k: None)
    if p.best_score >= 0 and not folder.best.is_file():  # carried without best.pt: the next epoch writes one
        p.best_score = -1.0
    if p.last_record and main and (folder.records() or [{"epoch": 0}])[-1]["epoch"] < p.last_record["epoch"]:
        folder.append(p.last_record)  # stopped between saving the state and writing its log line
    if p.epoch >= recipe.epochs:
        say(f"{folder.path} holds a finished run ({p.epoch} of {recipe.epochs} epochs): export it with "
            f"`msdnet export --run {folder.path}`", flush=True)
        return p.last_record
    if p.epoch or p.step:
        say(f"resuming {folder.state} at epoch {p.epoch + 1}, step {p.step}", flush=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    state.model.to(memory_format=layout)
    if amp_dtype == torch.float16:
        state.use_fp16_scaler()
    net = nn.parallel.DistributedDataParallel(state.model) if processes.world > 1 else state.model
    net = compiled(net) if compile else net
    steps = len(images.train) // recipe.batch_size  # the last partial batch is dropped
    hardware = f"{machine.hardware_name(dev)}, {torch.get_num_threads()} threads" if dev.type == "cpu" else machine.hardware_name(dev)
    clock = time.perf_counter()

    def account() -> None:  # the training seconds since the last call, into the epoch's and the run's
        nonlocal clock
        now = time.perf_counter()
        p.elapsed_s += now - clock
        p.epoch_time_s += now - clock
        clock = now

    with StopRequest(time_limit) as stop:
        try:
            while p.epoch < recipe.epochs:
                if p.order is None:
                    p.order = torch.randperm(len(images.train), generator=state.generator)
                state.model.train()
                bar = tqdm(total=steps, initial=p.step, desc=f"epoch {p.epoch + 1}/{recipe.epochs}", leave=False,
                           disable=not (main and progress_bar), mininterval=2, dynamic_ncols=True)
                clock = time.perf_counter()
                while p.step < steps:
                    x, y = _batch(state, images.train, processes, layout)
                    lr = learning_rate(p.epoch * steps + p.step, steps, recipe)
                    for group in state.optimizer.param_groups:
                        group["lr"] = lr
                    loss = train_step(net, state.optimizer, x, y, label_smoothing=recipe.label_smoothing,
                                      distill=recipe.distill, temperature=recipe.distill_temperature, amp=amp_dtype,
                                      scaler=state.scaler, micro_batches=recipe.accumulate, average=state.average)
                    p.step += 1
                    p.epoch_loss_sum += loss
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4f}", refresh=False)
                    bar.update()
                    if on_step is not None:
                        on_step(p.epoch * steps + p.step)
                    stop.check()
                bar.close()
                account()
                record = {"epoch": p.epoch + 1, "lr": learning_rate((p.epoch + 1) * steps - 1, steps, recipe),
                          "train_loss": round(p.epoch_loss_sum / steps, 5),
                          "train_images_per_s": round(steps * recipe.batch_size / max(p.epoch_time_s, 1e-9), 1),
                          "epoch_time_s": round(p.epoch_time_s, 1), "hardware": hardware}
                if main and images.val is not None:
                    state.model.eval()
                    with stop.abandonable():  # a second Ctrl-C here: validated again on resume
                        record.update(_validate(state, images.val, dev))
                    _keep_best(state, record, folder)
                    say(f"epoch {p.epoch + 1}/{recipe.epochs}: validation {evaluate.accuracy_line(record['acc'])}"
                        + (f"; {recipe.average} {evaluate.accuracy_line(record['acc_average'])}" if state.average else ""), flush=True)
                record["elapsed_s"] = round(p.elapsed_s, 1)
                p.epoch, p.step, p.order, p.epoch_time_s, p.epoch_loss_sum = p.epoch + 1, 0, None, 0.0, 0.0
                p.last_record = record
                if main:  # the state, then the log line that announces it (a resume restores a lost line)
                    state.save(folder.state)
                    folder.append(record)
                processes.barrier()
                stop.check()
        except Diverged as e:
            raise Diverged(f"{e} at epoch {p.epoch + 1}, step {p.step + 1}: the run stopped before that step ("
                           f"{folder.state} holds the last epoch's end); start a new run with a lower lr or a longer "
                           "warm-up") from None
        except KeyboardInterrupt:
            if p.order is not None and p.step < steps:
                account()
            if main:
                state.save(folder.state)
                print(f"\nstopped: {folder.state} saved at epoch {p.epoch + 1}, step {p.step}; run the same command "
                      "to go on", file=sys.stderr, flush=True)
            raise
    return p.last_record
