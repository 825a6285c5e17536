"""Pictures for the notebooks and the explorer: heatmap overlays and image x exit grids labelled the
blog's way ("Dog (7/10)", every exit marked right or wrong)."""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from torch import Tensor

from . import data

__all__ = ["to_hwc", "overlay", "show_overlay", "exit_grid", "RIGHT", "WRONG", "NEUTRAL"]

# The colours of a right and a wrong answer (and of an answer with no label), for matplotlib, PIL and HTML alike:
# matplotlib's tab:green and tab:red.
RIGHT, WRONG, NEUTRAL = "#2ca02c", "#d62728", "#787878"


def to_hwc(image: Tensor) -> np.ndarray:
    """[3, H, W] uint8 or float in [0, 1] -> [H, W, 3] float numpy array for imshow."""
    img = image.detach().cpu()
    img = img.float() / 255 if not img.is_floating_point() else img.float()
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The image with a heatmap in [0, 1] blended over it: (1 - alpha) * image + alpha * colormap(cam)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    img = to_hwc(image)
    heat = colormaps[cmap](cam.detach().cpu().float().clamp(0, 1).numpy())[..., :3]
    if heat.shape[:2] != img.shape[:2]:
        raise ValueError(f"the map is {tuple(heat.shape[:2])} but the image is {tuple(img.shape[:2])}: "
                         "upsample it first (gradcam.normalize(maps, size))")
    return (1 - alpha) * img + alpha * heat


def show_overlay(ax, image: Tensor, cam: Tensor | None = None, alpha: float = 0.5, cmap: str = "jet",
                 title: str | None = None, color: str = "black") -> None:
    ax.imshow(to_hwc(image) if cam is None else overlay(image, cam, alpha, cmap), interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, color=color)


def exit_grid(images: Tensor, maps: Tensor, labels: Tensor, predicted: Tensor, exits: Sequence[int],
              n_right: Tensor | None = None, classes: Sequence[str] = data.CLASSES, alpha: float = 0.5,
              size: float = 1.7):
    """One row per image: the image titled "Dog (7/10)", then the map of each exit in `exits`
    (1-based), titled with that exit's prediction, green when right and red when wrong.

    maps: [N, all exits, H, W] in [0, 1]; predicted: [N, all exits]; n_right: [N] exits right (optional).
    """
    n = len(images)
    fig, axes = plt.subplots(n, len(exits) + 1, figsize=(size * (len(exits) + 1), size * n * 1.1), squeeze=False)
    for i in range(n):
        label = classes[int(labels[i])]
        title = label.capitalize() + (f" ({int(n_right[i])}/{maps.shape[1]})" if n_right is not None else "")
        show_overlay(axes[i, 0], images[i], title=title)
        for j, k in enumerate(exits, start=1):
            p = int(predicted[i, k - 1])
            right = p == int(labels[i])
            show_overlay(axes[i, j], images[i], maps[i, k - 1], alpha, title=f"B{k} {'✓' if right else '✗'} {classes[p]}",
                         color=RIGHT if right else WRONG)
            for spine in axes[i, j].spines.values():
                spine.set_edgecolor(RIGHT if right else WRONG); spine.set_linewidth(2)
    fig.tight_layout()
    return fig
