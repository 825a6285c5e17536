"""The shipped CIFAR-10 checkpoints, loaded offline after a SHA-256 check against their card.

    model = pretrained.load()                  # the paper's model, eval mode, images in [0, 1]
    model = pretrained.load(preset="seed")     # another preset's card, once one is shipped

    msdnet evaluate                            # per-exit test accuracy of the shipped weights

Each preset (msdnet.PRESETS) has at most one card in data/pretrained/ (helpers.cards names, reads and
checks them; helpers.export writes them). Loading imports nothing of training.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint, msdnet
from .cards import DEFAULT_PRESET, PRETRAINED_DIR, card_path, check_weights, is_shipped, shipped_presets, weights_name
from .machine import device_for

__all__ = ["PRETRAINED_DIR", "DEFAULT_PRESET", "load"]


def load(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", verify: bool = True,
         preset: str | None = None) -> msdnet.MSDNet:
    """A shipped MSD-Net, or the weights at `path`, in float32 and eval mode.

    Args:
        path: weights of your own (checkpoint.save, a run's best.pt); default: the shipped card of `preset`.
        device: where the model goes: "cpu", "cuda", "cuda:1", "mps", or "auto" (CUDA when there is one).
        verify: check the SHA-256 the card beside the weights records; False loads weights without a card.
        preset: whose shipped card to load (default: cifar10-anytime, the paper's model).
    Returns:
        the model, taking images in [0, 1].
    """
    if path and preset:
        raise ValueError("pass either path (weights of your own) or preset (a shipped card), not both")
    dev = device_for(device)
    if path and Path(path).suffix == ".json":
        raise checkpoint.CheckpointError(f"{path} is a card, not weights: pass the .pt file beside it")
    preset = preset or DEFAULT_PRESET
    weights = Path(path) if path else PRETRAINED_DIR / weights_name(preset)
    card = card_path(weights)
    if not weights.is_file():
        if not path and preset != DEFAULT_PRESET and not card.is_file():
            raise checkpoint.CheckpointError(
                f"no weights are shipped for the preset {preset!r} "
                f"(shipped: {', '.join(shipped_presets()) or 'none'}); "
                f"train them and export the run (README, 'How it was made'), or load a run's weights by path")
        if weights.is_dir():
            raise checkpoint.CheckpointError(f"{weights} is a folder: pass the weights file in it (a .pt file)")
        if path and not is_shipped(weights):
            raise checkpoint.CheckpointError(f"no weights at {weights}: check the path")
        raise checkpoint.CheckpointError(f"no weights at {weights}; restore them with `git checkout -- {weights}`")
    if verify:
        check_weights(weights, card)
    ckpt = checkpoint.read(weights)
    model = msdnet.build(msdnet.MSDNetConfig.from_dict(ckpt["config"]))
    as_float = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    checkpoint.load_weights(model, {**ckpt, "model": as_float}, weights)
    if not path and model.config != msdnet.PRESETS[preset]:  # a card's file replaced by another preset's
        raise checkpoint.CheckpointError(f"{weights} holds another model than the preset {preset!r}; "
                                         f"restore it with `git checkout -- {weights}`")
    return model.to(dev).eval()
