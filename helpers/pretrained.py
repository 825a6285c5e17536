"""The shipped CIFAR-10 checkpoints, loaded offline after a SHA-256 check against their card.

    model = pretrained.load()                  # the paper's model, eval mode, images in [0, 1]
    model = pretrained.load(preset="seed")     # another preset's card, once one is shipped

    python -m helpers.pretrained evaluate      # per-exit test accuracy of the shipped weights

Each preset (msdnet.PRESETS) has at most one card in data/pretrained/: its weights (weights_name),
a JSON card beside them (same name, .json) and the training log the card names (log_name).
helpers.export writes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from . import checkpoint, data, msdnet
from .machine import device_for

__all__ = ["PRETRAINED_DIR", "DEFAULT_PRESET", "WEIGHTS_NAME", "CARD_FORMAT", "weights_name", "log_name",
           "card_path", "shipped_presets", "sha256", "read_card", "load"]

PRETRAINED_DIR = data.PROJECT_ROOT / "data" / "pretrained"
DEFAULT_PRESET = "cifar10-anytime"
CARD_FORMAT = 2  # the "format" every card carries; read_card() refuses any other


def weights_name(preset: str = DEFAULT_PRESET) -> str:
    """The file name of a preset's shipped weights, e.g. msdnet-cifar10-anytime.pt."""
    if preset not in msdnet.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(msdnet.PRESETS)}")
    return f"msdnet-{preset}.pt"


WEIGHTS_NAME = weights_name()


def log_name(preset: str = DEFAULT_PRESET) -> str:
    """The file name of a preset's chained training log, e.g. msdnet-cifar10-anytime-training-log.jsonl."""
    return Path(weights_name(preset)).stem + "-training-log.jsonl"


def card_path(weights: str | os.PathLike) -> Path:
    """The card beside a weights file: the same name with .json."""
    return Path(weights).with_suffix(".json")


def shipped_presets(folder: Path | None = None) -> list[str]:
    """The presets that have weights in `folder` (default: data/pretrained/)."""
    folder = PRETRAINED_DIR if folder is None else folder
    return [p for p in msdnet.PRESETS if (folder / weights_name(p)).is_file()]


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 in hex, as its card records it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shipped(path: Path) -> bool:
    """Is `path` in data/pretrained/ (where git restores what is lost)? A shipped file may be a dangling link."""
    return Path(os.path.abspath(path)).parent.resolve() == PRETRAINED_DIR.resolve()


def _restore(card: Path) -> str:
    if _shipped(card):
        return f"restore it with `git checkout -- {card}`"
    return "export the run again with `python -m helpers.export`"


def read_card(card: str | os.PathLike) -> dict:
    """Read a card of this CARD_FORMAT.

    Returns:
        the card's fields.
    Raises:
        CheckpointError: the card is missing, not a JSON object, or of another format.
    """
    card = Path(card)
    try:
        record = json.loads(card.read_text())
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"no card at {card}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise checkpoint.CheckpointError(f"{card} is not a valid card (not JSON: {e}); {_restore(card)}") from None
    if not isinstance(record, dict):
        raise checkpoint.CheckpointError(f"{card} is not a valid card (not a JSON object); {_restore(card)}")
    if record.get("format") != CARD_FORMAT:
        raise checkpoint.CheckpointError(
            f"{card} is a card of format {record.get('format')!r}, these helpers read format {CARD_FORMAT} only; "
            f"{_restore(card)}")
    return record


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
        if path and not _shipped(weights):
            raise checkpoint.CheckpointError(f"no weights at {weights}: check the path")
        raise checkpoint.CheckpointError(f"no weights at {weights}; restore them with `git checkout -- {weights}`")
    if verify:
        _verify(weights, card)
    ckpt = checkpoint.read(weights)
    model = msdnet.build(msdnet.MSDNetConfig.from_dict(ckpt["config"]))
    as_float = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    checkpoint.load_weights(model, {**ckpt, "model": as_float}, weights)
    if not path and model.config != msdnet.PRESETS[preset]:  # a card's file replaced by another preset's
        raise checkpoint.CheckpointError(f"{weights} holds another model than the preset {preset!r}; "
                                         f"restore it with `git checkout -- {weights}`")
    return model.to(dev).eval()


def _verify(weights: Path, card: Path) -> None:
    if not card.is_file():
        if _shipped(weights):
            raise checkpoint.CheckpointError(
                f"no card {card.name} beside {weights.name}, so its SHA-256 cannot be checked; restore it with "
                f"`git checkout -- {card}`, or load unchecked weights with verify=False")
        raise checkpoint.CheckpointError(
            f"no card {card.name} beside {weights.name}, so its SHA-256 cannot be checked: load weights of your "
            f"own (a run's best.pt, say) with pretrained.load(path, verify=False)")
    expected = read_card(card).get("sha256")
    if not isinstance(expected, str):
        raise checkpoint.CheckpointError(f"{card} records no sha256 for {weights.name}; {_restore(card)}")
    actual = sha256(weights)
    if actual != expected:
        raise checkpoint.CheckpointError(
            f"{weights} is damaged or was replaced: its SHA-256 is {actual[:12]}..., the card {card.name} "
            f"records {expected[:12]}...; restore it with `git checkout -- {weights}` (or git lfs pull)")


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.pretrained evaluate`: per-exit test accuracy of shipped weights or of a file."""
    import argparse

    from .evaluate import exit_accuracies

    p = argparse.ArgumentParser(prog="python -m helpers.pretrained")
    sub = p.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate", help="per-exit accuracy on the test split")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--weights", type=Path, default=None,
                       help="a weights file (a run's best.pt, say); checked against its card when one is beside it")
    which.add_argument("--preset", default=None, choices=sorted(msdnet.PRESETS),
                       help=f"whose shipped card to evaluate (default: {DEFAULT_PRESET})")
    ev.add_argument("--flip", action="store_true",
                    help="also with flip test-time augmentation (image and mirror, logits averaged: twice the cost)")
    ev.add_argument("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    ev.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    args = p.parse_args(argv)
    try:
        uncarded = args.weights is not None and not card_path(args.weights).is_file() and not _shipped(args.weights)
        model = load(args.weights, device=args.device, preset=args.preset, verify=not uncarded)
        if uncarded:
            print(f"{args.weights} has no card beside it: evaluated without a SHA-256 check", file=sys.stderr)
        test = data.load("test", args.source)
        accs = exit_accuracies(model, test)
        accs_flip = exit_accuracies(model, test, flip=True) if args.flip else None
    except (checkpoint.CheckpointError, data.DataNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("test accuracy per exit: " + " ".join(f"B{k + 1}={a * 100:.2f}" for k, a in enumerate(accs)))
    if accs_flip:
        print("with flip TTA (2x MACs): " + " ".join(f"B{k + 1}={a * 100:.2f}" for k, a in enumerate(accs_flip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
