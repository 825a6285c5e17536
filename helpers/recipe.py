"""What a training run computes, as one typed value: the model, the schedule, the loss, the weight average
and the data it trains on, and the named recipes the project trains with.

    recipe = RECIPES["laptop"]                         # the shipped checkpoint's recipe
    recipe = replace(RECIPES["paper"], epochs=10)      # the paper's, shorter

Settings that change only the speed (device, number format, compile) are not part of a recipe: a run may
resume with other ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from . import msdnet
from .errors import OneLineError

__all__ = ["SCHEDULES", "AVERAGES", "Recipe", "RECIPES", "RecipeError"]

SCHEDULES = ("paper", "cosine", "constant")
AVERAGES = ("none", "ema", "swa")


class RecipeError(OneLineError, ValueError):
    """A recipe that cannot train: the message names the setting, what it got and what it needs."""


@dataclass(frozen=True)
class Recipe:
    """Every setting that defines what a training run computes; the defaults are the paper's.

    Args:
        preset: the network (msdnet.PRESETS).
        epochs: the schedule's length.
        batch_size: images per optimizer step (over all processes).
        accumulate: split each process's share of a batch into this many micro-batches (less memory;
            batch norm then sees the micro-batches).
        lr: the peak learning rate; momentum: Nesterov momentum; weight_decay: on weights, not on
            batch norm and biases.
        schedule: "paper" (lr/10 at 50% and 75%), "cosine" (warm-up, then a cosine to 0) or "constant".
        warmup_epochs: linear warm-up of "cosine" and "constant".
        label_smoothing: of every exit's cross-entropy.
        distill: gamma, the weight of the last exit's softened predictions in every earlier exit's loss
            (0: off); distill_temperature: their softmax temperature.
        average: a weight average validated beside the trained weights ("ema", "swa" or "none");
            ema_decay: the moving average's decay.
        cutout: side of a square painted in the mean colour after crop and flip (0: off).
        seed: the weights, the data order and the augmentation.
        val_size: training images held out for validation (the same whatever the seed).
        train_subset: train on this many images spread over the classes (0: all).
    """

    preset: str = "cifar10-anytime"
    epochs: int = 300
    batch_size: int = 64
    accumulate: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "paper"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    distill: float = 0.0
    distill_temperature: float = 3.0
    average: str = "none"
    ema_decay: float = 0.999
    cutout: int = 0
    seed: int = 0
    val_size: int = 5000
    train_subset: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):  # a wrong type is refused here, not fifty minutes into the first epoch
            value = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str}[f.type]
            if isinstance(value, bool) or not isinstance(value, want):
                raise RecipeError(f"{f.name} must be {f.type}, got {value!r}")
        checks = [
            (self.preset in msdnet.PRESETS, f"preset must be one of {', '.join(sorted(msdnet.PRESETS))}"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.accumulate >= 1 and self.batch_size % self.accumulate == 0,
             "accumulate must be at least 1 and divide batch_size"),
            (math.isfinite(self.lr) and self.lr >= 0, "lr must be a finite number >= 0"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.warmup_epochs < self.epochs, "warmup_epochs must be >= 0 and fewer than epochs"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.distill <= 1, "distill (gamma) must be in [0, 1]"),
            (self.distill_temperature > 0, "distill_temperature must be > 0"),
            (self.average in AVERAGES, f"average must be one of {', '.join(AVERAGES)}"),
            (0 < self.ema_decay < 1, "ema_decay must be in (0, 1), e.g. 0.999"),
            (0 <= self.cutout < 32, "cutout must be 0 (off) to 31 pixels: a square of 32 blanks the whole image"),
            (self.seed >= 0, "seed must be >= 0"),
            (0 <= self.val_size < 50_000, "val_size must be 0 to 49,999 of the 50,000 training images"),
            (self.train_subset >= 0, "train_subset must be >= 0 (0: all)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"{message}, got {getattr(self, message.split()[0])!r}")

    def to_dict(self) -> dict:
        """The settings as plain types, for checkpoints, logs and cards."""
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict) -> "Recipe":
        """The recipe `to_dict` wrote; unknown settings are refused by name."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise RecipeError(f"unknown recipe settings {', '.join(unknown)}: these helpers know "
                              f"{', '.join(f.name for f in fields(cls))}")
        return cls(**settings)

    def differences(self, other: "Recipe") -> list[str]:
        """The settings in which `other` differs, as "name: ours -> theirs"."""
        return [f"{f.name}: {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


RECIPES = {
    # Huang et al. 2018, the CIFAR setting: SGD with Nesterov momentum, batch 64, 300 epochs, lr 0.1
    # divided by 10 at 50% and 75%; the sum of the exits' cross-entropies. Days on a CPU, hours on a GPU.
    "paper": Recipe(),
    # The shipped checkpoint: one cosine of 60 epochs from random weights, on a 2-core laptop CPU (or a GPU).
    # Batch 128 trains more images per CPU-second than 64; label smoothing and distillation from the last
    # exit lift every exit; the moving average of the weights is what ships.
    "laptop": Recipe(epochs=60, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
                        label_smoothing=0.2, distill=0.8, distill_temperature=3.0, average="ema", ema_decay=0.999),
}
