"""Does a map explain its own exit's decision? The deletion and insertion scores of Petsiuk et al.
(RISE, BMVC 2018), per exit.

Deletion: remove the image's pixels in the order the map ranks them, most important first
(a removed pixel takes the dataset's mean colour, i.e. 0 after the model's normalization), and
follow the exit's probability of the explained class. A faithful map makes it fall fast: a low area
under the curve. Insertion starts from the mean image and puts the pixels back in the same order: a
faithful map makes the probability rise fast, a high area. A random order is the baseline.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import msdnet

__all__ = ["Curves", "deletion_insertion"]


class Curves(NamedTuple):
    fractions: Tensor  # [steps + 1]: share of pixels removed (deletion) or inserted (insertion)
    deletion: Tensor  # [N, steps + 1]: probability of the explained class
    insertion: Tensor  # [N, steps + 1]

    def auc(self) -> tuple[Tensor, Tensor]:
        """Area under each image's deletion and insertion curve (trapezoids over the fractions)."""
        return torch.trapezoid(self.deletion, self.fractions), torch.trapezoid(self.insertion, self.fractions)


@torch.no_grad()
def deletion_insertion(model: msdnet.MSDNet, images: Tensor, saliency: Tensor, exit: int, targets: Tensor,
                       steps: int = 8) -> Curves:
    """images: [N, 3, H, W] in [0, 1]; saliency: [N, H, W], higher = more important (ties broken by position);
    exit: 1-based; targets: [N] classes whose probability is followed."""
    n, _, h, w = images.shape
    if saliency.shape != (n, h, w):
        raise ValueError(f"saliency must be [N, H, W] = {[n, h, w]}, got {list(saliency.shape)}")
    mean = model.mean.to(images.dtype).expand(n, 3, h, w)
    order = saliency.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1))  # rank[i, p]: when pixel p is touched
    rank = rank.reshape(n, 1, h, w)
    fractions = torch.linspace(0, 1, steps + 1)
    deletion, insertion = [], []
    for f in fractions.tolist():
        touched = rank < round(f * h * w)
        for curve, x in ((deletion, torch.where(touched, mean, images)), (insertion, torch.where(touched, images, mean))):
            probs = model(x, exits=exit)[exit - 1].softmax(-1)
            curve.append(probs.gather(1, targets[:, None]).squeeze(1))
    return Curves(fractions, torch.stack(deletion, 1), torch.stack(insertion, 1))
