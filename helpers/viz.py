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

from . import checks, data
from .errors import InputError

__all__ = ["to_hwc", "overlay", "show_overlay", "exit_grid", "RIGHT", "WRONG", "NEUTRAL", "png", "enlarged",
           "prediction_bars", "exit_strip", "ExplorerView", "explorer_view", "NetworkLayout", "network_layout",
           "show_network"]

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
    checks.tensor(image, "image", "[3, H, W], uint8 in 0..255 or float in [0, 1]")
    if image.dim() != 3 or image.shape[0] != 3:
        raise InputError(f"image must be one image [3, H, W] (for a batch, pass x[i]), got {list(image.shape)}")
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
    alpha = checks.number(alpha, "alpha", 0, 1, "an opacity between 0 and 1")
    checks.tensor(cam, "cam", "[H, W] in [0, 1]")
    if cam.dim() != 2:
        raise InputError(f"cam must be one map [H, W] (gradcam.normalize(maps, size)[i]), got {list(cam.shape)}")
    img = to_hwc(image)
    heat = colormaps[cmap](cam.detach().cpu().float().clamp(0, 1).numpy())[..., :3]
    if heat.shape[:2] != img.shape[:2]:
        raise InputError(f"the map is {tuple(heat.shape[:2])} but the image is {tuple(img.shape[:2])}: "
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
    if not (len(maps) == len(labels) == len(predicted) == n) or (n_right is not None and len(n_right) != n):
        raise InputError(f"images, maps, labels, predicted (and n_right) must hold one entry per image, got "
                         f"{[len(images), len(maps), len(labels), len(predicted)] + ([len(n_right)] if n_right is not None else [])}")
    exits = [checks.whole(k, "each of exits", 1, maps.shape[1]) for k in exits]
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
    scale = checks.whole(scale, "scale")
    img = to_hwc(image) if cam is None else overlay(image, cam, alpha)
    img = (img * 255).astype(np.uint8)
    return img.repeat(scale, 0).repeat(scale, 1)


def prediction_bars(confidence: Sequence[float], names: Sequence[str], right: Sequence[bool | None], chosen: int) -> Image.Image:
    """One bar per exit: its confidence, coloured right or wrong, labelled with the class and percentage.

    Args:
        confidence: per exit, in [0, 1]. names: the predicted classes. right: per exit, True, False or None.
        chosen: the exit outlined, 1-based.
    """
    if not len(confidence) == len(names) == len(right):
        raise InputError(f"confidence, names and right must hold one entry per exit, got {len(confidence)}, "
                         f"{len(names)} and {len(right)}")
    chosen = checks.whole(chosen, "chosen", 1, len(names))
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
    if len(right) != len(maps):
        raise InputError(f"right must hold one entry per map, {len(maps)}, got {len(right)}")
    chosen = checks.whole(chosen, "chosen", 1, len(maps))
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
    checks.tensor(logits, "logits", "[exits, classes]")
    if logits.dim() != 2 or len(maps) != len(logits) or logits.shape[1] != len(classes):
        raise InputError(f"maps must be [exits, H, W] and logits [exits, {len(classes)}] (one per class name), got "
                         f"{list(maps.shape)} and {list(logits.shape)}")
    k, n_exits = checks.whole(chosen, "chosen", 1, len(logits)), len(logits)
    explained = checks.whole(explained, "explained", 0, len(classes) - 1)
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


class NetworkLayout(NamedTuple):
    """What a network's figure draws, read off the model's own modules.

    Attributes:
        sizes: the side of each scale's maps, finest first (32, 16, 8 on CIFAR).
        columns: per module of the trunk, in order: (block 1..n, kind "first", "layer" or "transition",
            the scales it outputs as indices into `sizes`).
        exits: per classifier: (exit number 1..n, the scale it reads, the channels of that map).
    """

    sizes: list[int]
    columns: list[tuple[int, str, tuple[int, ...]]]
    exits: list[tuple[int, int, int]]


def network_layout(model) -> NetworkLayout:
    """The scales every module of `model` (an MSDNet, or a preset name) keeps and where each classifier reads.

    Returns:
        NetworkLayout; a scale missing from a column was pruned before it.
    """
    from . import layers, msdnet

    if isinstance(model, (str, msdnet.MSDNetConfig)):
        model = msdnet.build(model)
    if not isinstance(model, msdnet.MSDNet):
        raise InputError(f"network_layout needs an msdnet.MSDNet or a preset name, got {type(model).__name__}")
    cfg = model.config
    n = cfg.n_scales
    sizes = [cfg.image_size // 2**s for s in range(n)]
    columns = []
    for b, block in enumerate(model.blocks, start=1):
        for module in block:
            if isinstance(module, layers.FirstLayer):
                columns.append((b, "first", tuple(range(n - len(module.convs), n))))
            elif isinstance(module, layers.MSDLayer):
                columns.append((b, "layer", tuple(range(n - module.scales_out, n))))
            elif isinstance(module, layers.Transition):
                columns.append((b, "transition", tuple(range(n - len(module.convs), n))))
            else:
                raise InputError(f"block {b} holds a {type(module).__name__}, which this figure cannot draw")
    exits = [(k, n - 1, classifier.features[0][0].in_channels) for k, classifier in enumerate(model.classifiers, start=1)]
    return NetworkLayout(sizes, columns, exits)


def show_network(model, ax=None, title: str | None = None):
    """Draw MSD-Net as the paper's Figure 2 does: scales as rows, modules as columns, a classifier per block.

    Each dot is a module's output map at one scale (dense connections: every layer also receives all
    earlier maps of its scale); arrows show the regular path along a scale and the strided path from the
    next finer one; hollow grey dots mark scales already pruned; square boxes are the classifiers, under
    the map they read.

    Args:
        model: an MSDNet, or a preset name (e.g. "cifar10-anytime", "seed").
        ax: a matplotlib Axes to draw on (default: a new figure's).
        title: the figure's title (default: one read off the layout).
    Returns:
        the Axes.
    """
    layout = network_layout(model)
    n, cols = len(layout.sizes), layout.columns
    if ax is None:
        _, ax = plt.subplots(figsize=(max(8.0, 0.42 * len(cols) + 1.5), 0.75 * n + 1.9))
    colour = {"first": "#1f77b4", "layer": "#1f77b4", "transition": "#ff7f0e"}
    last_of_block = {b: i for i, (b, _, _) in enumerate(cols)}
    for i, (b, kind, kept) in enumerate(cols):
        if b % 2 == 0 and (i == 0 or cols[i - 1][0] != b):
            ax.axvspan(i - 0.5, last_of_block[b] + 0.5, color="#f0f0f0", zorder=0)
        if i == 0 or cols[i - 1][0] != b:
            ax.text((i + last_of_block[b]) / 2, -0.75, f"block {b}", ha="center", va="bottom", fontsize=8)
        for s in range(n):
            if s in kept:
                ax.plot(i, s, "o", color=colour[kind], markersize=6, zorder=3)
            else:
                ax.plot(i, s, "o", mfc="none", mec="#c8c8c8", markersize=5, zorder=3)
        if i == 0:
            for s in kept[1:]:  # the first layer: each coarser scale a strided conv of the finer one
                ax.annotate("", (i, s), (i, s - 1), arrowprops=dict(arrowstyle="->", color="#555555", lw=0.8))
            continue
        before = cols[i - 1][2]
        for s in kept:
            if s in before:
                ax.annotate("", (i, s), (i - 1, s), arrowprops=dict(arrowstyle="->", color="#555555", lw=0.8))
            if kind == "layer" and s - 1 in before:
                ax.annotate("", (i, s), (i - 1, s - 1), arrowprops=dict(arrowstyle="->", color="#9a9a9a", lw=0.8))
    for k, scale, channels in layout.exits:
        i = last_of_block[k]
        ax.annotate("", (i, n + 0.35), (i, scale), arrowprops=dict(arrowstyle="->", color=WRONG, lw=1.0))
        ax.text(i, n + 0.6, f"B{k}", ha="center", va="center", fontsize=8, color="white",
                bbox=dict(boxstyle="square,pad=0.3", fc=WRONG, ec="none"))
    ax.set_yticks(range(n), [f"{size}x{size}" for size in layout.sizes], fontsize=8)
    ax.set_xticks([])
    ax.set_xlim(-0.8, len(cols) - 0.2)
    ax.set_ylim(n + 1.1, -1.0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    coarse = layout.sizes[layout.exits[0][1]]
    layers_n = sum(kind == "layer" for _, kind, _ in cols)
    ax.set_title(title or f"{len(layout.exits)} blocks, {layers_n} MSD layers (blue), "
                 f"{sum(kind == 'transition' for _, kind, _ in cols)} transitions (orange); "
                 f"every classifier reads the {coarse}x{coarse} map", fontsize=9)
    return ax
