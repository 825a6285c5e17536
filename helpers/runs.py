"""The machinery that keeps a long training run safe, apart from what it computes: one process or
several (torchrun), the device and its number format, a lock on the output folder, stop requests
(Ctrl-C, SIGTERM, a time limit), a loss that stops being finite, and the log file's lines."""
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
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
import torch.distributed as dist

__all__ = ["Dist", "device_for", "autocast_dtype", "hardware_name", "OutFolderBusy", "exclusive", "Diverged",
           "TimeUp", "StopRequest", "append_record", "last_logged_epoch"]


class Dist:
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


def device_for(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
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


def append_record(log_path: Path, record: dict) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def last_logged_epoch(log_path: Path) -> int:
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
