"""Does a map explain its own exit's decision? The deletion and insertion scores of Petsiuk et al.
(RISE, BMVC 2018), per exit.

Deletion: remove the image's pixels in the order the map ranks them, most important first
(a removed pixel takes the dataset's mean colour, i.e. 0 after the model's normalization), and
follow the exit's probability of the explained class. A faithful map makes it fall fast: a low area
under the curve. Insertion starts from the mean image and puts the pixels back in the same order: a
faithful map makes the probability rise fast, a high area. A random order is the baseline.

ROAD (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods", ICML
2022): deletion's removed pixels form a shape the network can read (the mean colour draws the
map's outline), which favours blurry maps. ROAD fills each removed pixel instead from its neighbours
(noisy linear imputation: every removed pixel is the weighted mean of its eight neighbours, all
removed pixels solved together, plus a little noise), and measures at several percentiles, most
relevant first (MoRF: the probability should fall) and least relevant first (LeRF: it should stay).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import checks, msdnet
from .errors import InputError, InputTypeError

__all__ = ["Curves", "deletion_insertion", "noisy_linear_impute", "Road", "road"]


class Curves(NamedTuple):
    """Deletion and insertion curves: the explained class's probability [N, steps + 1] as pixels are
    removed or inserted in the map's order, at the shares of pixels in fractions."""

    fractions: Tensor  # [steps + 1]: share of pixels removed (deletion) or inserted (insertion)
    deletion: Tensor  # [N, steps + 1]: probability of the explained class
    insertion: Tensor  # [N, steps + 1]

    def auc(self) -> tuple[Tensor, Tensor]:
        """Area under each image's deletion and insertion curve (trapezoids over the fractions)."""
        return torch.trapezoid(self.deletion, self.fractions), torch.trapezoid(self.insertion, self.fractions)


def _checked(model: msdnet.MSDNet, images: Tensor, saliency: Tensor, targets) -> Tensor:
    """Check the arguments both measures share; returns the targets as int64 [N]."""
    if not (isinstance(images, Tensor) and images.is_floating_point() and images.dim() == 4):
        got = f"dtype {images.dtype}, shape {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"images must be float [N, 3, H, W] in [0, 1] (uint8: x.float() / 255), got {got}")
    n, _, h, w = images.shape
    if n == 0:
        raise InputError("images holds no images; pass at least one, [N, 3, H, W] with N >= 1")
    checks.tensor(saliency, "saliency", f"[N, H, W] = {[n, h, w]}")
    if saliency.shape != (n, h, w):
        raise InputError(f"saliency must be [N, H, W] = {[n, h, w]}, got {list(saliency.shape)}")
    t = torch.as_tensor(targets)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"targets must be class indices (integers), got dtype {t.dtype}")
    t = t.long().to(images.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.shape != (n,):
        raise InputError(f"targets must hold one class per image ({n}), or one class for all, got {t.numel()}")
    classes = model.config.num_classes
    if ((t < 0) | (t >= classes)).any():
        raise InputError(f"targets must be classes between 0 and {classes - 1}")
    return t


@torch.no_grad()
def deletion_insertion(model: msdnet.MSDNet, images: Tensor, saliency: Tensor, exit: int, targets: Tensor,
                       steps: int = 8) -> Curves:
    """Deletion and insertion curves of exit `exit` for the pixels in the order `saliency` ranks them.

    Args:
        images: float [N, 3, H, W] in [0, 1].
        saliency: [N, H, W], higher is more important (ties broken by position).
        exit: 1..n_exits.
        targets: the class whose probability is followed, [N] or one for all.
        steps: points of each curve after the first.
    Returns:
        Curves: fractions [steps + 1], deletion and insertion [N, steps + 1].
    """
    exit = msdnet.exit_number(exit, model.n_exits)
    targets = _checked(model, images, saliency, targets)
    steps = checks.whole(steps, "steps")
    n, _, h, w = images.shape
    mean = model.mean.to(images.dtype).expand(n, 3, h, w)
    order = saliency.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1))  # rank[i, p]: when pixel p is touched
    rank = rank.reshape(n, 1, h, w)
    fractions = torch.linspace(0, 1, steps + 1)
    deletion, insertion = [], []
    with msdnet.eval_mode(model):  # training mode would couple the images and move BN's statistics
        for f in fractions.tolist():
            touched = rank < round(f * h * w)
            for curve, x in ((deletion, torch.where(touched, mean, images)), (insertion, torch.where(touched, images, mean))):
                probs = model(x, exits=exit)[exit - 1].softmax(-1)
                curve.append(probs.gather(1, targets[:, None]).squeeze(1))
    return Curves(fractions, torch.stack(deletion, 1), torch.stack(insertion, 1))


# ----------------------------------------------------------------------------- ROAD

# Neighbour weights of the noisy linear imputation: the four direct neighbours count twice as much as
# the four diagonal ones (ROAD's choice).
_NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


def noisy_linear_impute(image: Tensor, removed: Tensor, noise: float = 0.01,
                        generator: torch.Generator | None = None) -> Tensor:
    """image [C, H, W] in [0, 1], removed [H, W] bool -> the image with every removed pixel replaced by
    the weighted mean of its neighbours (removed neighbours included, so all are solved together as one
    linear system: known pixels are its boundary), plus Gaussian noise of std `noise`. Needs at least
    one pixel kept."""
    checks.tensor(image, "image", "float [C, H, W] in [0, 1]")
    checks.tensor(removed, "removed", "bool [H, W]")
    if image.dim() != 3 or not image.is_floating_point() or removed.dtype != torch.bool:
        raise InputError(f"image must be float [C, H, W] and removed bool [H, W], got {image.dtype} {list(image.shape)} "
                         f"and {removed.dtype} {list(removed.shape)}")
    noise = checks.number(noise, "noise", 0, 1, "a standard deviation between 0 and 1 (0.01: 1% of the range)")
    c, h, w = image.shape
    if removed.shape != (h, w):
        raise InputError(f"removed must be [H, W] = {[h, w]}, got {list(removed.shape)}")
    flat_removed = removed.reshape(-1)
    idx = flat_removed.nonzero()[:, 0]
    n = len(idx)
    if n == 0:
        return image.clone()
    if n == h * w:
        raise InputError("every pixel is removed: nothing is left to impute from")
    flat = image.reshape(c, -1).double()
    pos = torch.full((h * w,), -1, dtype=torch.long)
    pos[idx] = torch.arange(n)
    a = torch.zeros(n, n, dtype=torch.float64)
    b = torch.zeros(n, c, dtype=torch.float64)
    ys, xs = idx // w, idx % w
    rows = torch.arange(n)
    for dy, dx, weight in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        r, nb = rows[inside], (ny * w + nx)[inside]
        a[r, r] += weight  # this pixel, weighed against each neighbour that exists
        unknown = flat_removed[nb]
        a[r[unknown], pos[nb[unknown]]] -= weight  # a removed neighbour: solved for too
        b[r[~unknown]] += weight * flat[:, nb[~unknown]].T  # a kept neighbour: known
    solved = torch.linalg.solve(a, b)  # [n, C]
    if noise:
        solved += noise * torch.randn(solved.shape, generator=generator, dtype=torch.float64)
    out = flat.clone()
    out[:, idx] = solved.T
    return out.reshape(c, h, w).clamp(0, 1).to(image.dtype)


class Road(NamedTuple):
    """ROAD per image: the explained class's probability [N, P] after the most (morf) or least (lerf)
    relevant share of the pixels, in percent (percentiles), is imputed."""

    percentiles: Tensor  # [P]: share of the pixels removed, in percent
    morf: Tensor  # [N, P]: probability of the explained class, most relevant pixels removed first
    lerf: Tensor  # [N, P]: least relevant first

    def score(self) -> Tensor:
        """Per image, the mean over percentiles of LeRF minus MoRF: high when removing what the map
        ranks first hurts and removing what it ranks last does not."""
        return (self.lerf - self.morf).mean(1)


def _check_percentiles(percentiles) -> list[float]:
    """The percentiles as floats in (0, 100), or one clear error: fractions (0.5 for half) are refused."""
    try:
        values = [float(p) for p in torch.as_tensor(percentiles, dtype=torch.float64).reshape(-1).tolist()]
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(f"percentiles must be numbers in percent, e.g. (10, 30, 50, 70, 90), got {percentiles!r}") from None
    if not values or not all(0 < p < 100 for p in values):  # NaN fails too; 100 would remove every pixel
        raise InputError(f"percentiles must be percents strictly between 0 and 100, e.g. (10, 30, 50, 70, 90), got {values}")
    if all(p <= 1 for p in values) and any(p < 1 for p in values):
        raise InputError(f"percentiles are percents, not fractions: {values} would remove at most 1% of the pixels; "
                         f"pass {[round(100 * p, 6) for p in values]}")
    return values


@torch.no_grad()
def road(model: msdnet.MSDNet, images: Tensor, saliency: Tensor, exit: int, targets: Tensor,
         percentiles=(10, 30, 50, 70, 90), noise: float = 0.01, seed: int = 0) -> Road:
    """ROAD per image: the exit's probability of `targets` after the p% of pixels ranked highest
    (MoRF) or lowest (LeRF) by `saliency` are imputed, for each percentile p.

    Args:
        images: float [N, 3, H, W] in [0, 1]; saliency: [N, H, W]; exit: 1..n_exits.
        targets: the class followed, [N] or one for all.
        seed: seeds the imputation's noise.
    Returns:
        Road: percentiles [P], morf and lerf [N, P].
    """
    exit = msdnet.exit_number(exit, model.n_exits)
    targets = _checked(model, images, saliency, targets)
    percentiles = _check_percentiles(percentiles)
    noise = checks.number(noise, "noise", 0, 1, "a standard deviation between 0 and 1 (0.01: 1% of the range)")
    seed = checks.whole(seed, "seed", low=0)
    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    order = saliency.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w).expand(n, -1))  # 0: the most relevant pixel
    curves = {"morf": [], "lerf": []}
    with msdnet.eval_mode(model), torch.no_grad():  # training mode would couple the images and move BN's statistics
        for p in percentiles:
            k = round(p / 100 * h * w)
            for name, removed in (("morf", rank < k), ("lerf", rank >= h * w - k)):
                x = torch.stack([noisy_linear_impute(images[i], removed[i].reshape(h, w), noise, g) for i in range(n)])
                probs = model(x, exits=exit)[exit - 1].softmax(-1)
                curves[name].append(probs.gather(1, targets[:, None]).squeeze(1))
    return Road(torch.tensor(percentiles, dtype=torch.float32), torch.stack(curves["morf"], 1), torch.stack(curves["lerf"], 1))
