"""Checkpoints: tensors and plain types only, stamped with their format, written atomically, read with
weights_only=True.

    msdnet checkpoint compact --weights runs/X/last.pt --out small.pt   # half precision, no optimizer
    msdnet checkpoint upgrade --weights old.pt --out new.pt             # weights of an older format, re-saved
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from . import atomic
from .errors import OneLineError
from .msdnet import MSDNet, MSDNetConfig

__all__ = ["FORMAT", "CheckpointError", "save", "write", "read", "check_config", "load_weights", "half", "compact",
           "upgrade"]

FORMAT = 2  # the "format" every checkpoint carries; read() refuses any other

_PLAIN = (torch.Tensor, str, int, float, bool, type(None))


class CheckpointError(OneLineError, RuntimeError):
    """A checkpoint that is missing, unreadable, of another format or made for another network."""


def write(payload: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint atomically, stamped with FORMAT.

    Args:
        payload: tensors, str, int, float, bool, None, and lists, tuples and dicts of them.
        path: where to write it.
    """
    _check_plain(payload, "checkpoint")
    atomic.save({**payload, "format": FORMAT}, path)


def save(model: MSDNet, path: str | os.PathLike) -> None:
    """Write the weights of `model` with its config; pretrained.load(path, verify=False) reads them back."""
    write({"config": model.config.to_dict(), "model": model.state_dict()}, path)


def _check_plain(obj, where: str) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}: a checkpoint holds tensors and plain types only")


def read(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint of this FORMAT with weights_only=True.

    Returns:
        a dict holding at least 'model' (a state dict) and 'config' (plain types).
    Raises:
        CheckpointError: the file is missing, unreadable, of another format, or no MSD-Net checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.suffix == ".json":
        raise CheckpointError(f"{path} is a card, not weights: pass the .pt file beside it")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(  # torch's own message is pages of advice about unsafe loading: not for here
            f"{path} is not a readable checkpoint (damaged, cut short, or not made by these helpers: "
            f"{type(e).__name__}); restore the file, or train again") from None
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(
            f"{path} holds a bare state dict, without the config that says which network it fits: save weights "
            "with checkpoint.save(model, path), or load these with model.load_state_dict(torch.load(path))")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} holds no MSD-Net checkpoint (expected a dict with 'model' and 'config', "
                              "as checkpoint.save writes)")
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a checkpoint of format {ckpt.get('format')!r}, these helpers read format {FORMAT} only. "
            f"Weights: convert them with `msdnet checkpoint upgrade --weights {path} --out NEW.pt`; a run's last.pt: "
            "finish it with the helpers that started it, or train again")
    return ckpt


def upgrade(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Re-save the weights and config of a checkpoint of an older format in this FORMAT.

    Everything else the old file held (a run's settings, its optimizer) is left behind.
    """
    try:
        old = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{src} is not a readable checkpoint ({e})") from e
    if not isinstance(old, dict) or "model" not in old or "config" not in old:
        raise CheckpointError(f"{src} holds no MSD-Net weights (a dict with 'model' and 'config') to upgrade")
    try:
        MSDNetConfig.from_dict(old["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{src} has an invalid MSD-Net config: {e}") from e
    write({"config": old["config"], "model": old["model"]}, dst)


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
    """Put a read() checkpoint's weights into `model` after checking they fit it.

    Args:
        path: names the file in the errors only.
    """
    check_config(ckpt["config"], model.config, path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model ({e})") from e


def half(state: dict) -> dict:
    """A state dict with its floating-point tensors in half precision."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def compact(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A training checkpoint small enough to carry: weights and average in half precision, no optimizer.

    A run goes on from it at the same step, with the momentum starting again from zero.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"the compact copy would replace {src} itself: write it to another file")
    ckpt = read(src)
    small = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scaler")}
    small["model"] = half(ckpt["model"])
    if ckpt.get("average") is not None:
        small["average"] = half(ckpt["average"])
    write(small, dst)
