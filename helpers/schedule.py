"""The learning-rate schedules of `python -m helpers.train`, and `--fit-to`: a schedule's length fitted to
a time budget from the timing of the first epoch."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

__all__ = ["SCHEDULES", "learning_rate", "BudgetFit"]

SCHEDULES = ("paper", "cosine", "constant")


def learning_rate(step: int, steps_per_epoch: int, args: argparse.Namespace, epochs: int | None = None) -> float:
    """The learning rate before optimizer step `step` (0-based); a pure function of the step.

    paper: ``args.lr``, divided by 10 at 50% and 75% of the steps; cosine: linear warm-up over
    ``args.warmup_epochs``, then a cosine to 0; constant: the warm-up, then ``args.lr`` throughout.

    Args:
        args: the settings of `train.parse_args` (``schedule``, ``lr``, ``warmup_epochs``, ``epochs``).
        epochs: the schedule's length in epochs when it is not ``args.epochs`` (as `--fit-to` chooses).
    """
    total = (epochs or args.epochs) * steps_per_epoch
    if args.schedule == "paper":
        return args.lr * 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    warmup = round(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class BudgetFit:
    """The epochs a schedule gets so that training and validation fit `budget_s` seconds (`--fit-to`).

    The first epoch is timed from the start of its second quarter (the first pays for cuDNN's tuning
    and cold caches) to its end; a first epoch that a resume split is timed whole. The loop calls
    `before_step` before every step of the first epoch and `epochs` once, after it.

    Args:
        budget_s: seconds for the whole run, validation included.
        cap: the most epochs to give (``--epochs``).
        warmup_epochs: the schedule's warm-up; at least one epoch after it is given, so the rate decays.
        steps_per_epoch: optimizer steps in an epoch.
        whole_first_epoch: whether this process runs all of the first epoch.
    """

    budget_s: float
    cap: int
    warmup_epochs: float
    steps_per_epoch: int
    whole_first_epoch: bool
    start: tuple[float, int] | None = None  # (time, steps done) where the timing began

    def before_step(self, batch_in_epoch: int, now: float) -> None:
        """Start the timing at the first quarter of the first epoch."""
        if self.whole_first_epoch and self.start is None and batch_in_epoch >= self.steps_per_epoch // 4:
            self.start = (now, batch_in_epoch)

    def epochs(self, train_end: float, epoch_time: float, eval_s: float, spent_s: float, done: int) -> tuple[int, int, float]:
        """The schedule's length once the first epoch is done.

        Args:
            train_end: when the first epoch's steps ended (on the clock `before_step` was given).
            epoch_time: the first epoch's training seconds, used when its steps were not timed here.
            eval_s: seconds of validation an epoch costs.
            spent_s: seconds of the budget spent so far.
            done: epochs finished.
        Returns:
            (epochs given, epochs the budget fits, estimated seconds of an epoch with validation).
        """
        if self.start is not None:
            start, steps_before = self.start
            step_s = (train_end - start) / max(1, self.steps_per_epoch - steps_before)
        else:
            step_s = epoch_time / self.steps_per_epoch
        epoch_s = step_s * self.steps_per_epoch + eval_s
        fits = done + math.floor(max(0.0, self.budget_s - spent_s) / max(epoch_s, 1e-9))
        given = min(self.cap, max(done, fits, math.ceil(self.warmup_epochs) + 1))
        return given, fits, epoch_s
