"""Batch augmentation on tensors, used by training only: the paper's random crop and flip, and Cutout.

Every function takes a whole batch on its own device and draws its random numbers from a CPU
generator, so a seed gives the same batch on a CPU and on a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip", "cutout"]


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The paper's augmentation on a whole batch, on its own device: a random crop of the
    zero-padded image, then a horizontal flip with probability 1/2.

    Args:
        images: [B, C, H, W] of any dtype.
        padding: pixels of zeros added on each side before cropping back to H x W.
        generator: a CPU generator for the random numbers, so a seed gives the same crops on every device.

    Returns:
        [B, C, H, W], the dtype and device of ``images``.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0), cols)  # a flipped crop reads its columns backwards
    rows = (dy[:, None] + torch.arange(h)).to(images.device)
    cols = (dx[:, None] + cols).to(images.device)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indexing on (batch, row, col) moves channels last: [B, H, W, C].
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def cutout(images: Tensor, size: int, fill: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Cutout (DeVries and Taylor, 2017) on a whole batch: one ``size`` x ``size`` square per image,
    centred on a uniformly random pixel (so near the border only part of it falls inside), painted ``fill``.

    Args:
        images: [B, C, H, W] of any dtype.
        size: the square's side in pixels; 0 or less returns ``images`` unchanged.
        fill: [C], one value per channel in the images' units. The dataset's mean colour makes the
            square zero after standardization, as in the paper, which cuts after standardizing.
        generator: a CPU generator for the random numbers, as in :func:`random_crop_flip`.

    Returns:
        [B, C, H, W], the dtype and device of ``images``.
    """
    b, c, h, w = images.shape
    if size <= 0:
        return images
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if fill.numel() != c:
        raise ValueError(f"cutout: fill has {fill.numel()} values, the images have {c} channels")
    top = torch.randint(0, h, (b,), generator=generator) - size // 2
    left = torch.randint(0, w, (b,), generator=generator) - size // 2
    rows = (torch.arange(h) - top[:, None]).to(images.device)  # [B, H]: row offset inside each square
    cols = (torch.arange(w) - left[:, None]).to(images.device)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return torch.where(inside[:, None], fill.view(1, c, 1, 1), images)
