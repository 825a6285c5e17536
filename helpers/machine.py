"""The machine a model runs on, shared by training and loading: which devices it has, the one device a
command asks for, the number format of autocast, its name for a card, and the processes of a torchrun.

    device = machine.device_for("auto")        # CUDA when there is one, else the CPU
    machine.autocast_dtype("auto", device)     # bfloat16 on a GPU that has it, None (float32) on a CPU
"""
from __future__ import annotations

import os
import platform

import torch
import torch.distributed as dist

__all__ = ["AMP_CHOICES", "available_devices", "check_device", "device_for", "autocast_dtype", "hardware_name",
           "Processes"]

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def available_devices() -> list[str]:
    """The devices this machine has, as torch names them: "cpu", then "cuda:0", ..., then "mps"."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device named by `device`, if this machine has it.

    Raises:
        ValueError: an unknown name or a device this machine lacks; the message lists the ones it has.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use one of {', '.join(available_devices())}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok = count > 0 and (dev.index is None or dev.index < count)
        why = f"it has {count} CUDA GPU{'s' if count != 1 else ''}"
    elif dev.type == "mps":
        ok, why = torch.backends.mps.is_available(), "it has no Apple GPU (MPS)"
    else:
        backend = getattr(torch, dev.type, None)
        ok = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
        why = f"torch finds no {dev.type} device"
    if not ok:
        raise ValueError(f"device {str(device)!r} is not on this machine ({why}): use one of "
                         f"{', '.join(available_devices())}")
    return dev


def device_for(spec: str | torch.device | None = "auto") -> torch.device:
    """The device a command's ``--device`` names, checked to exist here.

    Args:
        spec: "auto" (or None): CUDA when there is one (this process's LOCAL_RANK under torchrun), else
            the CPU; or a name such as "cpu", "cuda", "cuda:1", "mps".
    Raises:
        ValueError: no such device here (the message lists the ones there are).
    """
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = check_device(spec)
    if dev.type == "cuda" and dev.index is None:  # the GPU of this process under torchrun
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that `amp` asks for on `device`; None means float32 throughout.

    Args:
        amp: "auto" (bfloat16 on a GPU that has it, else float16 there; float32 on other devices),
            "off", "bf16" or "fp16".
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def hardware_name(device: torch.device) -> str:
    """What a run trained on, for its log and card: the GPUs' name, or the CPU's architecture and cores."""
    if device.type == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


class Processes:
    """This process's place among torchrun's (world size, rank), or a lone process; starts the process
    group when there are several (NCCL on CUDA, Gloo elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
