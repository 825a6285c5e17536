"""Averages of a model's weights kept during training: an exponential moving average (EMA) or the
equal-weight average of stochastic weight averaging (SWA, Izmailov et al. 2018).

    average = WeightAverage(model, "ema", decay=0.999)
    ...  # after every optimizer step:
    average.update(model)
    average.module                       # the averaged network, ready to evaluate
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["KINDS", "WeightAverage"]

KINDS = ("ema", "swa")


class WeightAverage(nn.Module):
    """An average of a model's parameters and floating-point buffers (batch-norm statistics included).

    The update runs on the model's device without reading any value back to the host, so it does not
    stall a GPU and traces as one graph under torch.compile. Its state dict holds the averaged
    network under ``module.`` and the number of updates as ``n_averaged``.

    Args:
        model: the network being trained; the average starts as its copy.
        kind: "ema" (each update moves the average towards the weights by ``1 - decay``) or
            "swa" (every update weighs the same).
        decay: the EMA's decay in [0, 1); unused for "swa".
    """

    def __init__(self, model: nn.Module, kind: str, decay: float = 0.0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "ema" and not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.kind, self.decay = kind, decay
        self.module = copy.deepcopy(model).requires_grad_(False)
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=device))

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(ours) != len(theirs):
            raise ValueError("the model has other parameters or buffers than the one this average was made from")
        floats = [(a, b) for a, b in zip(ours, theirs) if a.is_floating_point()]
        counts = [(a, b) for a, b in zip(ours, theirs) if not a.is_floating_point()]
        return [a for a, _ in floats], [b for _, b in floats], [a for a, _ in counts], [b for _, b in counts]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` (or of its DDP or compiled wrapper) into the average.

        The first update copies them; integer buffers (batch-norm's step count) are copied every time.
        """
        avg, cur, avg_counts, cur_counts = self._pairs(model)
        n = self.n_averaged.to(torch.float32)
        if self.kind == "swa":
            weight = 1.0 / (n + 1.0)  # the running mean: 1 on the first update, then 1/2, 1/3, ...
        else:
            weight = torch.where(n == 0, 1.0, 1.0 - self.decay)
        torch._foreach_lerp_(avg, cur, weight)  # lerp at weight 1 gives exactly the end point
        for a, b in zip(avg_counts, cur_counts):
            a.copy_(b)
        self.n_averaged += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
