"""Results computed from a model and images (predictions, Grad-CAM maps), stored on disk.

A result is named after hashes of the weights and the images, so the same weights meeting the same
images compute it once. The cache is an optimization: a folder that cannot be written, or a damaged
file, costs a recomputation and a one-line warning, never the result.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from . import atomic, data

__all__ = ["fingerprint", "cached", "lookup", "store"]

_AGAIN = "the result is returned but not kept, so it will be computed again next time"


def fingerprint(tensors: Iterable[Tensor]) -> str:
    """A short hash of tensors' dtypes, shapes and bytes.

    Args:
        tensors: any tensors, on any device.

    Returns:
        16 hexadecimal characters; equal for equal tensors, in the same order.
    """
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _path(kind: str, model: nn.Module, images: Tensor, labels: Tensor, cache_dir) -> Path:
    folder = Path(cache_dir) if cache_dir else data.DATA_DIR / "cache"
    return folder / f"{kind}-{fingerprint(model.state_dict().values())}-{fingerprint((images, labels))}.pt"


def lookup(kind: str, model: nn.Module, images: Tensor, labels: Tensor, cache_dir=None) -> dict | None:
    """The stored result for these weights and images, or None; never computes.

    A damaged file is removed (and counts as none); one that cannot be removed is named in a warning.

    Args:
        kind: the kind of result, the first part of the file's name ("predictions", ...).
        model: the weights the result was computed with.
        images, labels: the inputs it was computed from (uint8 [N, 3, 32, 32], int64 [N]).
        cache_dir: the folder; data.DATA_DIR / "cache" when None.
    """
    path = _path(kind, model, images, labels, cache_dir)
    result, problem = atomic.load_or_discard(path)
    if problem and path.exists():
        warnings.warn(f"the cache file {path} {problem}; it is ignored", RuntimeWarning, stacklevel=3)
    return result


def store(kind: str, model: nn.Module, images: Tensor, labels: Tensor, result: dict, cache_dir=None) -> bool:
    """Write a result for :func:`lookup` to find, atomically.

    Args:
        result: a dict of tensors (and plain types).
        the others: as in :func:`lookup`.

    Returns:
        True when written; False, with a warning naming the folder, when it could not be.
    """
    return atomic.save_or_warn(result, _path(kind, model, images, labels, cache_dir),
                               then=_AGAIN, stacklevel=3)


def cached(kind: str, model: nn.Module, images: Tensor, labels: Tensor, compute: Callable[[], dict],
           cache_dir: str | os.PathLike | None, enabled: bool = True) -> dict:
    """``compute()``'s result, read from ``cache_dir/<kind>-<weights>-<images>.pt`` when present.

    Otherwise it is computed and written atomically. A folder that cannot be written (read-only, full)
    or a damaged file there still returns the computed result, with one warning naming the folder.

    Args:
        compute: () -> dict of tensors, called only when nothing usable is stored.
        enabled: False computes and neither reads nor writes the cache.
        the others: as in :func:`lookup`.
    """
    if not enabled:
        return compute()
    path = _path(kind, model, images, labels, cache_dir)
    result, problem = atomic.load_or_discard(path)
    if result is None:
        result = compute()
        atomic.save_or_warn(result, path, problem, then=_AGAIN, stacklevel=3)
    return result
