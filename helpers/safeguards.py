"""The machinery that keeps a long training run safe, apart from what it computes: one process or
several (torchrun), the device and its number format, a lock on the output folder, stop requests
(Ctrl-C, SIGTERM, a time limit), a loss that stops being finite, the log file's lines, and the resume
state: where a run stands, and the check that a resume continues the same run."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import CheckpointError
from .pretrained import check_device

__all__ = ["SetupError", "Dist", "device_for", "autocast_dtype", "hardware_name", "OutFolderBusy", "exclusive",
           "Diverged", "TimeUp", "StopRequest", "append_record", "last_logged_epoch", "TRAIN_STATE", "RUN_DEFINING",
           "run_settings", "resolved", "Progress", "check_resume", "check_data"]


class SetupError(ValueError):
    """A setting that cannot work on this machine (a device it lacks, a folder it cannot write)."""


class Dist:
    """This process's place among torchrun's (world size, rank), or a single process; starts the process group."""

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


def device_for(spec: str | None) -> torch.device:
    """The device `--device` names, checked to exist on this machine.

    Args:
        spec: a device name ("cpu", "cuda", "cuda:1", "mps"); None picks CUDA (this process's
            LOCAL_RANK under torchrun) when there is one, else the CPU.
    Raises:
        SetupError: no such device here (pretrained.check_device's message, after the option).
    """
    if not spec:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        return check_device(spec)  # the one place that decides whether a device is here
    except ValueError as e:
        raise SetupError(f"--device {spec}: {e}") from None


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `--amp` asks for on `device`; None: float32 throughout."""
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


class OutFolderBusy(RuntimeError):
    """Another run holds the output folder."""


@contextmanager
def exclusive(out: Path):
    """Hold <out>/.lock while training, so a second run into the same folder is refused instead of
    interleaving its checkpoints and log with ours. The operating system releases the lock when the
    process ends, however it ends, so a killed run never leaves the folder locked.

    Raises:
        SetupError: the folder cannot be made or written.
        OutFolderBusy: another run holds it.
    """
    out = Path(out)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 holds the lock
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")
    except OSError as e:
        raise SetupError(f"--out {out}: cannot write there ({e.strerror or e}); choose a folder you can write to") from None
    with lock:
        if fcntl is not None:  # Windows: no lock
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutFolderBusy(f"another training run is writing to {out}; wait for it to end, or choose another --out") from None
        try:
            yield
        finally:
            if [p.name for p in out.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
                (out / ".lock").unlink()
                out.rmdir()


def append_record(log_path: Path, record: dict) -> None:
    """Append one JSON line to the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def last_logged_epoch(log_path: Path) -> int:
    """The epoch of the log's last line; 0 for no log."""
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    return json.loads(lines[-1])["epoch"] if lines else 0


class Diverged(RuntimeError):
    """The loss is no longer finite: the run stops before the step that would spoil the weights."""


class TimeUp(KeyboardInterrupt):
    """--time-limit reached: the run stopped as Ctrl-C stops it (saved, resumable)."""


class StopRequest:
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


# ----------------------------------------------------------------------------- the resume state

TRAIN_STATE = 1  # the version of what last.pt holds for --resume; a resume refuses any other

# Settings that define what a run computes; --resume refuses to change them.
RUN_DEFINING = (
    "preset", "epochs", "batch_size", "accumulate", "lr", "momentum", "weight_decay", "schedule",
    "warmup_epochs", "label_smoothing", "distill", "distill_temperature", "ema", "swa", "seed", "val_size",
    "train_subset", "init_from", "channels_last", "amp", "cutout", "fit_to",
)  # fmt: skip


def run_settings(args: argparse.Namespace) -> dict:
    """The settings of RUN_DEFINING, as the command gave them."""
    return {k: getattr(args, k) for k in RUN_DEFINING}


def resolved(path: str | os.PathLike | None) -> str | None:
    """A path written any way (relative, with .., through a link) as one absolute spelling."""
    return str(Path(path).resolve()) if path else None


@dataclass
class Progress:
    """Where a run stands: all that --resume needs besides the weights, the optimizer and the random
    state. The checkpoint's keys are these fields' names."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # steps done in the current epoch
    perm: Tensor | None = None  # the current epoch's order of the training images
    elapsed_s: float = 0.0  # seconds of training (validation excluded), earlier processes included
    epoch_images: int = 0  # images trained on in the current epoch
    epoch_loss_sum: float = 0.0  # the current epoch's batch losses, summed
    epoch_time_s: float = 0.0  # the current epoch's training seconds before an interruption
    best_score: float = -1.0  # mean validation accuracy over the exits of the weights in best.pt
    fitted_epochs: int = 0  # the schedule's length --fit-to chose after the first epoch (0: not yet, or off)
    epoch_record: dict = field(default_factory=dict)  # the last finished epoch's log record

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, ckpt: dict) -> "Progress":
        return cls(**{f.name: ckpt[f.name] for f in fields(cls)})


def check_resume(ckpt: dict, args: argparse.Namespace, path: Path) -> None:
    """Refuse to resume `ckpt`, read from `path`, unless it is this version's resume state of the run
    `args` describe.

    Raises:
        CheckpointError: an older resume state, or other settings (--init-from compared as a resolved path).
    """
    if ckpt.get("train_state") != TRAIN_STATE:
        raise CheckpointError(
            f"cannot resume {path}: it holds the resume state of another version of helpers.train "
            f"({ckpt.get('train_state')!r}, this one reads {TRAIN_STATE}). Finish that run with the helpers that "
            f"began it, or start a new run from its weights: --init-from {path} with another --out")
    saved, asked = ckpt["run"], run_settings(args)
    same = {k: saved.get(k) == v for k, v in asked.items()}
    same["init_from"] = ckpt.get("init_path") == resolved(args.init_from)
    diff = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {asked[k]!r}" for k in RUN_DEFINING if not same[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume {path}: the command differs from the run that made it ({'; '.join(diff)}). "
            "Resume with the same settings, or start a new run with another --out.")


def check_data(ckpt: dict, path: Path, trained_on: dict) -> None:
    """Refuse to resume `ckpt` on other training images than it was trained on.

    Args:
        trained_on: the training images now: {"train_images": count, "train_fingerprint": content hash}.
    Raises:
        CheckpointError: other images (the same ones read from another spelling of the source are fine).
    """
    if ckpt["data"] != trained_on:
        was, now = ckpt["data"], trained_on
        raise CheckpointError(
            f"cannot resume {path}: it was trained on other images ({was['train_images']} training images, "
            f"content {was['train_fingerprint']}; now {now['train_images']}, content {now['train_fingerprint']}). "
            "Point --source (or $CIFAR10_SOURCE) at the data the run began with, or start a new run with another --out.")
