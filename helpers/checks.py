"""Argument checks that several modules share, each failing with one line: what it got and what it wants.

    checks.whole(batch_size, "batch_size")          # an int >= 1 (bools and floats refused)
    checks.split(split)                             # images uint8 in 0..255 or float in [0, 1], labels [N]
    x = checks.unit_images(split.images[i:j])       # float in [0, 1], whichever of the two it held
"""
from __future__ import annotations

import math
import numbers
import operator

import torch
from torch import Tensor

from .errors import InputError, InputTypeError

__all__ = ["whole", "number", "tensor", "split", "unit_images"]


def whole(value, name: str, low: int = 1, high: int | None = None) -> int:
    """`value` as an int in low..high, or one clear error.

    Args:
        value: any integer (Python's, NumPy's, a one-element integer tensor's); bools and floats are refused.
        name: what the error calls it.
        low, high: the range, both ends included (high None: no upper end).
    Returns:
        the int.
    """
    want = f"a whole number between {low} and {high}" if high is not None else f"a whole number >= {low}"
    try:
        n = None if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool) \
            else operator.index(value)
    except TypeError:
        n = None
    if n is None:
        raise InputTypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    if n < low or (high is not None and n > high):
        raise InputError(f"{name} must be {want}, got {n}")
    return n


def number(value, name: str, low: float, high: float, want: str) -> float:
    """`value` as a finite float in [low, high], or one clear error.

    Args:
        want: how the error describes the range and its unit, e.g. "a share between 0 and 1 (0.95 for 95%)".
    """
    scalar_tensor = isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or scalar_tensor):  # NumPy's floats are Real
        raise InputTypeError(f"{name} must be {want}, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        raise InputError(f"{name} must be {want}, got {v:g}")
    return v


def tensor(value, name: str, want: str) -> Tensor:
    """`value` itself when it is a torch.Tensor; else one clear error naming what it is.

    Args:
        want: the kind and shape asked for, e.g. "float [N]".
    """
    if not isinstance(value, Tensor):
        hint = "; convert it with torch.as_tensor(...)" if isinstance(value, (list, tuple)) or hasattr(value, "__array__") else ""
        raise InputTypeError(f"{name} must be a torch.Tensor, {want}, got {type(value).__name__}{hint}")
    return value


def split(value, what: str = "the split") -> None:
    """Check a data.Split (or anything with .images and .labels): one clear error unless its images are
    uint8 [N, 3, H, W] in 0..255 or float in [0, 1], its labels integer [N], and N >= 1.

    A float split of values up to 255 is refused: dividing it by 255, or not, would both be a guess.
    """
    images, labels = getattr(value, "images", None), getattr(value, "labels", None)
    if not (isinstance(images, Tensor) and isinstance(labels, Tensor)):
        raise InputTypeError(f"{what} must be a data.Split(images, labels) of tensors, got {type(value).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise InputError(f"{what}'s images must be [N, 3, H, W], got {list(images.shape)}")
    if labels.shape != (len(images),) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"{what} needs one integer label per image, [{len(images)}], got {labels.dtype} "
                         f"{list(labels.shape)}")
    if len(images) == 0:
        raise InputError(f"{what} holds no images; pass at least one")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise InputError(f"{what}'s images must be uint8 in 0..255 or float in [0, 1], got dtype {images.dtype}")
    lo, hi = (float(v) for v in images.aminmax())
    if not (lo >= 0 and hi <= 1):  # NaN fails too
        raise InputError(f"{what}'s images are float between {lo:g} and {hi:g}; a split holds uint8 images in 0..255 "
                         "or float ones in [0, 1]: pass images.round().to(torch.uint8) or images / 255")


def unit_images(images: Tensor) -> Tensor:
    """Images as the model takes them: uint8 in 0..255 divided by 255, float ones (in [0, 1]) as float32.

    Args:
        images: [B, 3, H, W] of a split checked by :func:`split`.
    Returns:
        float32 [B, 3, H, W] in [0, 1], always a new tensor: what a caller does to it leaves the split alone.
    """
    return images.float() / 255 if images.dtype == torch.uint8 else images.to(torch.float32, copy=True)
