"""A finished training run as a shipped checkpoint: its chosen weights measured on the test split and written,
in half precision, with their card and the run's log.

    msdnet export --run runs/laptop                    # into data/pretrained/
    msdnet export --run runs/laptop --out DIR          # anywhere else

The three files replace the old ones together (helpers.atomic.replace_files): a reader finds either the old
set or the new one, and two exports into one folder take turns.
"""
from __future__ import annotations

import io
import json
import os
import statistics
from pathlib import Path

import torch

from . import atomic, cards, checkpoint, data, machine, msdnet, pretrained
from .checkpoint import CheckpointError
from .evaluate import exit_accuracies
from .recipe import RECIPES, Recipe
from .runfolder import RunFolder

__all__ = ["chosen_weights", "export"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def chosen_weights(folder: RunFolder, state: dict, records: list[dict]) -> dict:
    """The weights a finished run ships: best.pt (chosen on validation), or the last epoch's trained weights
    when they score higher there (at the end of a cosine they can overtake their lagging average).

    Returns:
        {"model": state dict, "weights": "ema", "swa" or "trained", "epoch": int, "val_accuracy_per_exit": list}.
    """
    if not folder.best.is_file():
        raise CheckpointError(f"{folder.path} holds no best.pt (a run writes it after every validated epoch): "
                              "it held out no validation images, or the file was lost")
    best = checkpoint.read(folder.best)
    last = records[-1]
    if best["weights"] != "trained" and "acc" in last and _mean(last["acc"]) > _mean(best["val_accuracy_per_exit"]):
        return {"model": state["model"], "weights": "trained", "epoch": last["epoch"], "val_accuracy_per_exit": last["acc"]}
    return {k: best[k] for k in ("model", "weights", "epoch", "val_accuracy_per_exit")}


def _refuse_unless_better(val_acc: list[float], card_file: Path) -> None:
    """Refuse to replace `card_file` with weights that score lower on validation."""
    if not card_file.is_file():
        return
    shipped = cards.read_card(card_file).get("val_accuracy_per_exit")
    if shipped and _mean(val_acc) < _mean(shipped):
        raise CheckpointError(
            f"the run's weights score {_mean(val_acc):.2%} on validation (mean over the exits), those of {card_file} "
            f"{_mean(shipped):.2%}: not exported; train on, pass --allow-worse, or export into another --out")


def _training_record(state: dict, chosen: dict, records: list[dict]) -> dict:
    """The card's account of how the weights were made: one command from random weights, where and how fast."""
    recipe = state["recipe"]
    return {
        "command": cards.command_for(recipe, {name: r.to_dict() for name, r in RECIPES.items()}),
        "init_from": None, "recipe": recipe, "weights": chosen["weights"], "chosen_epoch": chosen["epoch"],
        "epochs": recipe["epochs"], "hardware": list(dict.fromkeys(r["hardware"] for r in records)),
        "torch": torch.__version__.split("+")[0], "train_images": state["data"]["train_images"],
        "train_fingerprint": state["data"]["train_fingerprint"],
        "train_time_s": round(state["progress"]["elapsed_s"]),
        "wall_time_s": round(sum(r["epoch_time_s"] + r.get("eval_time_s", 0) for r in records)),
        "train_images_per_s": round(statistics.median(r["train_images_per_s"] for r in records), 1),
    }  # fmt: skip


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike = pretrained.PRETRAINED_DIR, *,
           source: str | None = None, allow_worse: bool = False, device: str | torch.device = "auto") -> dict:
    """Measure a finished run's chosen weights on the test split and write their card set into `out_dir`.

    Args:
        run_dir: the run's folder (msdnet train's --out).
        out_dir: the folder of cards; the run's preset names the files, other presets' files stay.
        source: the CIFAR-10 source (helpers.data.resolve_source).
        allow_worse: replace a card whose weights score higher on validation.
        device: where the test split is measured.
    Returns:
        the card written.
    Raises:
        CheckpointError: no finished run there, or weights worse than the card's (the message says what to do).
    """
    device = machine.device_for(device)  # a device this machine lacks is named before anything is read
    folder = RunFolder(run_dir)
    if not folder.state.is_file():
        raise CheckpointError(f"no training run at {folder.path}: pass the --out folder of `msdnet train`")
    state = checkpoint.read(folder.state)
    progress, recipe = state["progress"], Recipe.from_dict(state["recipe"])
    if progress["epoch"] < recipe.epochs:
        raise CheckpointError(f"{folder.path} has run {progress['epoch']} of its {recipe.epochs} epochs: go on with "
                              f"the command that began it, then export")
    records = cards.read_log(folder.log)
    if [r["epoch"] for r in records] != list(range(1, recipe.epochs + 1)):
        raise CheckpointError(f"{folder.log} does not hold one line for each of the run's {recipe.epochs} epochs: "
                              "restore the file")
    chosen = chosen_weights(folder, state, records)
    out = Path(out_dir)
    name, log_file = cards.weights_name(recipe.preset), cards.log_name(recipe.preset)
    if not allow_worse:
        _refuse_unless_better(chosen["val_accuracy_per_exit"], out / cards.card_path(name))
    model = msdnet.build(msdnet.MSDNetConfig.from_dict(state["config"]))
    checkpoint.load_weights(model, {**state, "model": chosen["model"]}, folder.best)
    test = data.load("test", source)

    half = {"config": state["config"], "model": checkpoint.half(model.state_dict()), "format": checkpoint.FORMAT}
    buffer = io.BytesIO()
    torch.save(half, buffer)
    weights = buffer.getvalue()
    staged = out.parent / f".{out.name}.measure{os.getpid()}.pt"  # what users will load, measured before it ships
    atomic.write_bytes(staged, weights)
    try:
        shipped = pretrained.load(staged, device=device, verify=False)
        acc16, acc_flip = exit_accuracies(shipped, test), exit_accuracies(shipped, test, flip=True)
    finally:
        staged.unlink(missing_ok=True)
    acc32 = exit_accuracies(model.to(shipped.mean.device).eval(), test)
    costs = msdnet.exit_costs(model.cpu())
    card = {
        "format": cards.CARD_FORMAT, "weights": name, "preset": recipe.preset, "training_log": log_file,
        "sha256": cards.sha256_bytes(weights), "file_bytes": len(weights), "config": state["config"],
        "training": _training_record(state, chosen, records),
        "test_accuracy_per_exit": [round(a, 4) for a in acc16],
        "test_accuracy_per_exit_float32": [round(a, 4) for a in acc32],
        "test_accuracy_per_exit_flip_tta": [round(a, 4) for a in acc_flip],
        "val_accuracy_per_exit": chosen["val_accuracy_per_exit"], "test_images": len(test),
        "params_per_exit": [c.params for c in costs], "macs_per_exit": [c.macs for c in costs],
        "macs_per_exit_flip_tta": [2 * c.macs for c in costs],
    }  # fmt: skip
    atomic.replace_files(out, {
        name: weights, cards.card_path(name).name: (json.dumps(card, indent=2) + "\n").encode(),
        log_file: "".join(json.dumps(r) + "\n" for r in records).encode(),
    })
    return card
