"""Checkpoints that hold tensors and plain types only, written atomically, read with weights_only=True."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import atomic
from .msdnet import MSDNet, MSDNetConfig

__all__ = ["CheckpointError", "save", "read", "check_config", "load_weights", "half", "compact"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or made for another network; the message says which."""


def save(model: MSDNet, path: str | os.PathLike) -> None:
    """The weights of `model` with its config, written atomically, in the format read() and
    pretrained.load(path, verify=False) take: tensors and plain types only."""
    atomic.save({"format": "msdnet-weights/1", "config": model.config.to_dict(), "model": model.state_dict()}, path)


def read(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint at `path` as a dict holding at least 'model' (a state dict) and 'config' (plain
    types), loaded with weights_only=True; one CheckpointError that says what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt, truncated, or not made by torch.save: {e}). "
            "Delete it and train again, or restore the file (git checkout / re-download)."
        ) from e
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(
            f"{path} holds a bare state dict, without the config that says which network it fits: save weights "
            "with checkpoint.save(model, path), or load these with model.load_state_dict(torch.load(path))")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} holds no MSD-Net checkpoint (expected a dict with 'model' and 'config', "
                              "as checkpoint.save writes)")
    return ckpt


def check_config(ckpt_config: dict, model_config: MSDNetConfig, path: str | os.PathLike = "checkpoint") -> None:
    """Refuse weights made for a differently shaped network, naming the fields that differ."""
    try:
        saved = MSDNetConfig.from_dict(ckpt_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid MSD-Net config: {e}") from e
    if saved != model_config:
        diff = {
            k: (v, getattr(model_config, k)) for k, v in vars(saved).items() if getattr(model_config, k) != v
        }
        detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} was made for a different MSD-Net ({detail}); build the model with "
            "msdnet.build(MSDNetConfig.from_dict(ckpt['config'])) or pick the matching checkpoint"
        )


def load_weights(model: MSDNet, ckpt: dict, path: str | os.PathLike = "checkpoint") -> None:
    """Put a read() checkpoint's weights into `model`, after checking it was made for this network
    (`path` only names the file in the errors)."""
    check_config(ckpt["config"], model.config, path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model ({e})") from e


def half(state: dict) -> dict:
    """A state dict with its floating-point tensors in half precision (what ships and travels)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def compact(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A training checkpoint made small enough to carry between machines (git, a GPU's output folder):
    the weights and their moving average in half precision, the optimizer's state dropped. `--resume`
    continues from it with the momentum starting again from zero, so not bit for bit, but at the
    same step of the same schedule, data order and random state."""
    ckpt = read(src)
    small = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scaler")}
    small["model"] = half(ckpt["model"])
    if "ema" in ckpt:
        small["ema"] = half(ckpt["ema"])
    atomic.save(small, dst)  # a temporary name, then a rename: never half a checkpoint


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m helpers.checkpoint", description="compact SRC DST: " + compact.__doc__.split(":")[0])
    p.add_argument("command", choices=["compact"])
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args()
    try:
        compact(args.src, args.dst)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    print(f"{args.dst}: {Path(args.dst).stat().st_size / 1e6:.1f} MB")
