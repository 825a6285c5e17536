"""A training run's state: everything it needs to go on exactly where it stopped, saved as one checkpoint.

    state = TrainingState.start(recipe, device, data_id)          # random weights, seeded
    state.save(path)                                               # atomically; tensors and plain types
    state = TrainingState.resume(path, recipe, device, data_id)    # refuses another recipe or other images
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint, msdnet
from .averaging import WeightAverage
from .recipe import Recipe, RecipeError

__all__ = ["STATE_FORMAT", "ResumeError", "Progress", "TrainingState", "make_optimizer"]

STATE_FORMAT = 1  # the version of what a saved state holds; resume refuses any other


class ResumeError(checkpoint.CheckpointError):
    """A saved state that this run cannot continue: another version, recipe or training set."""


@dataclass
class Progress:
    """Where a run stands besides its tensors of weights and optimizer: the saved state's "progress"."""

    epoch: int = 0  # epochs finished (validated, saved and logged)
    step: int = 0  # optimizer steps taken in the current epoch
    order: Tensor | None = None  # the current epoch's order of the training images
    elapsed_s: float = 0.0  # seconds of training (validation excluded), every process of the run together
    epoch_time_s: float = 0.0  # the current epoch's training seconds in processes before this one
    epoch_loss_sum: float = 0.0  # the current epoch's batch losses, summed
    best_score: float = -1.0  # mean validation accuracy over the exits of the weights in best.pt
    last_record: dict = field(default_factory=dict)  # the last finished epoch's log line

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> "Progress":
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on the weights, not on batch norm and biases."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=recipe.lr, momentum=recipe.momentum, nesterov=True)


class TrainingState:
    """The weights, optimizer, gradient scaler, weight average, random state and progress of one run.

    Args:
        recipe: what the run computes.
        model: the network being trained.
        data_id: the training images, {"train_images": count, "train_fingerprint": content hash}.
    """

    def __init__(self, recipe: Recipe, model: msdnet.MSDNet, data_id: dict, generator: torch.Generator) -> None:
        self.recipe, self.model, self.data_id, self.generator = recipe, model, data_id, generator
        self.optimizer = make_optimizer(model, recipe)
        self.scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=False)
        self.average = WeightAverage(model, recipe.average, recipe.ema_decay) if recipe.average != "none" else None
        self.progress = Progress()

    @classmethod
    def start(cls, recipe: Recipe, device: torch.device, data_id: dict) -> "TrainingState":
        """A new run: the preset's network with weights drawn from ``recipe.seed``."""
        torch.manual_seed(recipe.seed)
        model = msdnet.build(recipe.preset).to(device)
        return cls(recipe, model, data_id, torch.Generator().manual_seed(recipe.seed))

    def use_fp16_scaler(self) -> None:
        """Scale the loss for float16 autocast (bfloat16 and float32 need no scaling)."""
        if not self.scaler.is_enabled():
            self.scaler = torch.amp.GradScaler(next(self.model.parameters()).device.type)

    def to_checkpoint(self) -> dict:
        """The state as tensors and plain types (checkpoint.write's payload)."""
        return {
            "state_format": STATE_FORMAT, "recipe": self.recipe.to_dict(), "data": self.data_id,
            "config": self.model.config.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "progress": self.progress.to_dict(),
        }  # fmt: skip

    def save(self, path: str | os.PathLike) -> None:
        """Write the state atomically: a stop while writing leaves the previous one."""
        checkpoint.write(self.to_checkpoint(), path)

    @classmethod
    def resume(cls, path: str | os.PathLike, recipe: Recipe, device: torch.device, data_id: dict) -> "TrainingState":
        """The run saved at `path`, to go on with `recipe` on the training images `data_id`.

        Raises:
            ResumeError: another version of the state, another recipe or other training images.
            checkpoint.CheckpointError: the file is missing or damaged.
        """
        path = Path(path)
        saved = checkpoint.read(path)
        if saved.get("state_format") != STATE_FORMAT:
            raise ResumeError(f"{path} is not a training state these helpers can resume (state format "
                              f"{saved.get('state_format')!r}, not {STATE_FORMAT}): choose another --out for a new run")
        try:
            was = Recipe.from_dict(saved["recipe"])
        except RecipeError as e:
            raise ResumeError(f"{path} holds a recipe these helpers cannot read ({e}): choose another --out") from None
        if was != recipe:
            raise ResumeError(f"{path} is a run of another recipe ({'; '.join(was.differences(recipe))}): run the "
                              f"command that began it, or choose another --out for a new run")
        if saved["data"] != data_id:
            raise ResumeError(f"{path} was trained on other images ({saved['data']['train_images']} images, content "
                              f"{saved['data']['train_fingerprint']}; now {data_id['train_images']}, content "
                              f"{data_id['train_fingerprint']}): give --source the copy of CIFAR-10 the run began with")
        state = cls.start(recipe, device, data_id)
        checkpoint.load_weights(state.model, saved, path)
        if "optimizer" in saved:
            state.optimizer.load_state_dict(saved["optimizer"])
        else:  # a compact copy (checkpoint.compact): weights only
            print(f"{path} carries no optimizer state: the momentum starts again from zero", flush=True)
        if saved.get("scaler"):
            state.use_fp16_scaler()
            state.scaler.load_state_dict(saved["scaler"])
        if state.average is not None:
            state.average.load_state_dict({k: v.float() if v.is_floating_point() else v
                                           for k, v in saved["average"].items()})
        state.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state.progress = Progress.from_dict(saved["progress"])
        return state
