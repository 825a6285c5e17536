"""Cards: the JSON record beside a shipped checkpoint (its SHA-256, the command and recipe that made it,
hardware, time and accuracy) and the training log it names; named, read, verified and written here only.

    card = cards.read_card(cards.card_path(cards.PRETRAINED_DIR / cards.weights_name()))
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import msdnet
from .checkpoint import CheckpointError

__all__ = ["PRETRAINED_DIR", "DEFAULT_PRESET", "WEIGHTS_NAME", "CARD_FORMAT", "weights_name", "log_name", "card_path",
           "shipped_presets", "sha256", "sha256_bytes", "read_card", "check_weights", "is_shipped", "read_log",
           "command_for"]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "data" / "pretrained"
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


def sha256_bytes(content: bytes) -> str:
    """The SHA-256 of `content` in hex, as a card records it for its weights file."""
    return hashlib.sha256(content).hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 in hex, as its card records it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_shipped(path: Path) -> bool:
    """Is `path` in data/pretrained/ (where git restores what is lost)? A shipped file may be a dangling link."""
    return Path(os.path.abspath(path)).parent.resolve() == PRETRAINED_DIR.resolve()


def _restore(card: Path) -> str:
    if is_shipped(card):
        return f"restore it with `git checkout -- {card}`"
    return "export the run again with `msdnet export --run <its folder>`"


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
        raise CheckpointError(f"no card at {card}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise CheckpointError(f"{card} is not a valid card (not JSON: {e}); {_restore(card)}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{card} is not a valid card (not a JSON object); {_restore(card)}")
    if record.get("format") != CARD_FORMAT:
        raise CheckpointError(
            f"{card} is a card of format {record.get('format')!r}, these helpers read format {CARD_FORMAT} only; "
            f"{_restore(card)}")
    return record


def check_weights(weights: Path, card: Path) -> None:
    """Refuse weights whose SHA-256 is not the one the card beside them records (one line: how to restore)."""
    if not card.is_file():
        if is_shipped(weights):
            raise CheckpointError(
                f"no card {card.name} beside {weights.name}, so its SHA-256 cannot be checked; restore it with "
                f"`git checkout -- {card}`, or load unchecked weights with verify=False")
        raise CheckpointError(
            f"no card {card.name} beside {weights.name}, so its SHA-256 cannot be checked: load weights of your "
            f"own (a run's best.pt, say) with pretrained.load(path, verify=False)")
    expected = read_card(card).get("sha256")
    if not isinstance(expected, str):
        raise CheckpointError(f"{card} records no sha256 for {weights.name}; {_restore(card)}")
    actual = sha256(weights)
    if actual != expected:
        raise CheckpointError(
            f"{weights} is damaged or was replaced: its SHA-256 is {actual[:12]}..., the card {card.name} "
            f"records {expected[:12]}...; restore it with `git checkout -- {weights}` (or git lfs pull)")




def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (a run's log.jsonl, a card's training log).

    Raises:
        CheckpointError: the file is missing, or a line is no JSON record (the message names it).
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"no log at {path}: a run writes its log.jsonl at the end of every epoch") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a JSON-lines log (not text): restore the file") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise CheckpointError(f"{path}, line {n}, is not an epoch's record (cut short?): restore the file, "
                                  "or delete the broken line")
        records.append(record)
    return records


def command_for(recipe: dict, recipes: dict) -> str:
    """The shortest ``msdnet train`` command that trains `recipe`: a named recipe, and the settings that differ.

    Args:
        recipe: a recipe's settings (Recipe.to_dict()).
        recipes: the named recipes, name -> settings.
    """
    def flags(base: dict) -> list[str]:
        return [f"--{k.replace('_', '-')} {v}" for k, v in recipe.items() if base.get(k) != v]

    name = min(recipes, key=lambda n: (len(flags(recipes[n])), n != "laptop"))
    return " ".join(["msdnet train --recipe", name, *flags(recipes[name])])
