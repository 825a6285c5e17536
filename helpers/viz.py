"""Pictures for the notebooks and the explorer: heatmap overlays, and image x exit grids labelled
"Dog (7/10)" with every exit marked right or wrong."""
from __future__ import annotations

import io
from typing import NamedTuple, Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw
from matplotlib import colormaps
from torch import Tensor

from . import data

__all__ = ["to_hwc", "overlay", "show_overlay", "exit_grid", "RIGHT", "WRONG", "NEUTRAL", "png", "enlarged",
           "prediction_bars", "exit_strip", "ExplorerView", "explorer_view"]

RIGHT = "#2ca02c"
"""The colour of a right answer (matplotlib's ``tab:green``)."""
WRONG = "#d62728"
"""The colour of a wrong answer (matplotlib's ``tab:red``)."""
NEUTRAL = "#787878"
"""The colour of an answer without a label (a grey)."""


def to_hwc(image: Tensor) -> np.ndarray:
    """An image as imshow takes it.

    Args:
        image: [3, H, W], uint8 in 0..255 or float in [0, 1].
    Returns:
        float [H, W, 3] in [0, 1].
    """
    img = image.detach().cpu()
    img = img.float() / 255 if not img.is_floating_point() else img.float()
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The image with a heatmap blended over it: (1 - alpha) * image + alpha * colormap(cam).

    Args:
        image: [3, H, W], uint8 or float in [0, 1]. cam: [H, W] in [0, 1]. alpha: in [0, 1].
    Returns:
        float [H, W, 3] in [0, 1].
    """
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
    """Draw the image, with the heatmap over it if given, on a matplotlib axis without ticks."""
    ax.imshow(to_hwc(image) if cam is None else overlay(image, cam, alpha, cmap), interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9, color=color)


def exit_grid(images: Tensor, maps: Tensor, labels: Tensor, predicted: Tensor, exits: Sequence[int],
              n_right: Tensor | None = None, classes: Sequence[str] = data.CLASSES, alpha: float = 0.5,
              size: float = 1.7):
    """One row per image: the image titled "Dog (7/10)", then each exit's map titled with its prediction.

    Args:
        images: [N, 3, H, W]. maps: [N, exits, H, W] in [0, 1]. labels: [N]. predicted: [N, exits].
        exits: the exits to show, 1-based. n_right: [N] exits right, for the titles (optional).
    Returns:
        the matplotlib figure; titles and frames green when right, red when wrong.
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


# ----------------------------------------------------------------------------- the explorer's pictures (PIL: fast)


def _colour(right: bool | None) -> str:
    return NEUTRAL if right is None else RIGHT if right else WRONG


def png(array: np.ndarray | Image.Image) -> bytes:
    """An image as PNG bytes, compressed lightly (small pictures, drawn often).

    Args:
        array: uint8 [H, W, 3], or a PIL image.
    """
    buf = io.BytesIO()
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def enlarged(image: Tensor, cam: Tensor | None, alpha: float, scale: int) -> np.ndarray:
    """The image, with the map over it if given, enlarged by repeating pixels (not smoothed).

    Args:
        image: [3, H, W] in [0, 1]. cam: [H, W] in [0, 1], or None. scale: the enlargement.
    Returns:
        uint8 [H * scale, W * scale, 3].
    """
    img = to_hwc(image) if cam is None else overlay(image, cam, alpha)
    img = (img * 255).astype(np.uint8)
    return img.repeat(scale, 0).repeat(scale, 1)


def prediction_bars(confidence: Sequence[float], names: Sequence[str], right: Sequence[bool | None], chosen: int) -> Image.Image:
    """One bar per exit: its confidence, coloured right or wrong, labelled with the class and percentage.

    Args:
        confidence: per exit, in [0, 1]. names: the predicted classes. right: per exit, True, False or None.
        chosen: the exit outlined, 1-based.
    """
    row, top, label_w, bar_w = 17, 16, 28, 150
    img = Image.new("RGB", (label_w + bar_w + 120, top + row * len(names) + 4), "white")
    d = ImageDraw.Draw(img)
    d.text((2, 2), "each exit's prediction and confidence", fill="black")
    for j, (conf, name) in enumerate(zip(confidence, names)):
        y = top + j * row
        d.text((2, y + 3), f"B{j + 1}", fill="black")
        d.rectangle([label_w, y + 2, label_w + bar_w * float(conf), y + row - 2], fill=_colour(right[j]),
                    outline="black" if j == chosen - 1 else None, width=2 if j == chosen - 1 else 0)
        d.text((label_w + bar_w + 4, y + 3), f"{name} {float(conf):.0%}", fill="black")
    return img


def exit_strip(image: Tensor, maps: Tensor, right: Sequence[bool | None], chosen: int, alpha: float = 0.5) -> Image.Image:
    """Every exit's map over the image, side by side, framed right or wrong; exit `chosen` (1-based) thicker.

    Args:
        image: [3, H, W] in [0, 1]. maps: [exits, H, W] in [0, 1]. right: per exit, True, False or None.
    """
    tile, gap = 2 * image.shape[-1], 6
    strip = Image.new("RGB", (len(maps) * (tile + gap), tile + 16), "white")
    d = ImageDraw.Draw(strip)
    for j in range(len(maps)):
        x0 = j * (tile + gap)
        strip.paste(Image.fromarray(enlarged(image, maps[j], alpha, 2)), (x0, 14))
        d.rectangle([x0, 14, x0 + tile - 1, 14 + tile - 1], outline=_colour(right[j]), width=3 if j == chosen - 1 else 1)
        d.text((x0 + 2, 1), f"B{j + 1}", fill=_colour(right[j]))
    return strip


class ExplorerView(NamedTuple):
    """What the explorer shows for one image: two lines of HTML and four PNG pictures."""

    title: str  # "Dog (7/10) — B5 says dog (93%) ✓"
    explains: str  # the class the heatmap explains, and why that one
    pngs: tuple[bytes, bytes, bytes, bytes]  # the image, its overlay, the prediction bars, the strip of all maps


def explorer_view(image: Tensor, maps: Tensor, logits: Tensor, chosen: int, alpha: float, label: int | None,
                  n_right: int | None, explained: int, target: str, classes: Sequence[str] = data.CLASSES) -> ExplorerView:
    """The explorer's title, explanation and pictures of one image at one exit.

    Args:
        image: float [3, H, W] in [0, 1].
        maps: [exits, H, W] in [0, 1].
        logits: [exits, classes].
        chosen: the exit shown, 1-based.
        alpha: the heatmap's opacity, in [0, 1].
        label: the true class; None for a picture of one's own.
        n_right: how many exits get the image right; None for a picture of one's own.
        explained: the class the maps explain.
        target: why that class: "predicted", "true" or a class name.
    """
    k, n_exits = chosen, len(logits)
    conf, predicted = logits.softmax(-1).max(-1)
    right = [None if label is None else int(p) == label for p in predicted]
    name = "your image" if label is None else f"{classes[label].capitalize()} ({n_right}/{n_exits})"
    verdict = "" if right[k - 1] is None else (" ✓" if right[k - 1] else " ✗")
    title = (f"<b>{name}</b> — B{k} says <span style='color:{_colour(right[k - 1])}'>"
             f"{classes[int(predicted[k - 1])]} ({conf[k - 1]:.0%}){verdict}</span>")
    why = {"predicted": f"B{k}'s own prediction", "true": "the true class"}.get(target, "the class chosen")
    if target == "true" and label is None:
        why = f"B{k}'s own prediction: your image has no true class"
    explains = (f"The heatmap shows where B{k} looked for <b>{classes[explained]}</b> ({why}); "
                "each map is scaled to its own maximum.")
    names = [classes[int(p)] for p in predicted]
    pngs = (png(enlarged(image, None, 0, 6)), png(enlarged(image, maps[k - 1], alpha, 6)),
            png(prediction_bars(conf.tolist(), names, right, k)), png(exit_strip(image, maps, right, k, alpha)))
    return ExplorerView(title, explains, pngs)
