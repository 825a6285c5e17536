"""The learning-rate schedules of a training recipe, as a pure function of the step."""
from __future__ import annotations

import math

from .recipe import Recipe

__all__ = ["learning_rate"]


def learning_rate(step: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """The learning rate of optimizer step `step` (0-based).

    paper: ``recipe.lr``, divided by 10 at 50% and 75% of the steps; cosine: a linear warm-up over
    ``recipe.warmup_epochs``, then a cosine to 0 at the last step; constant: the warm-up, then ``recipe.lr``.

    Args:
        step: optimizer steps taken before this one.
        steps_per_epoch: optimizer steps in an epoch.
        recipe: its ``schedule``, ``lr``, ``warmup_epochs`` and ``epochs``.
    """
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == "paper":
        return recipe.lr * 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    if recipe.schedule == "constant":
        return recipe.lr
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
