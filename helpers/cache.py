"""Results computed from a model and images, stored on disk under a name made of their hashes, so the
same weights meeting the same images are computed once (predictions, Grad-CAM maps)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from . import atomic, data

__all__ = ["fingerprint", "cached", "lookup", "store"]


def fingerprint(tensors: Iterable[Tensor]) -> str:
    """A short hash of tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _path(kind: str, model: nn.Module, images: Tensor, labels: Tensor, cache_dir) -> Path:
    folder = Path(cache_dir) if cache_dir else data.DATA_DIR / "cache"
    return folder / f"{kind}-{fingerprint(model.state_dict().values())}-{fingerprint((images, labels))}.pt"


def lookup(kind: str, model: nn.Module, images: Tensor, labels: Tensor, cache_dir=None) -> dict | None:
    """The stored result, or None when there is none (or it is damaged: it is then removed)."""
    path = _path(kind, model, images, labels, cache_dir)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # truncated or damaged (a killed write of an older version, a full disk): recompute
            path.unlink(missing_ok=True)
    return None


def store(kind: str, model: nn.Module, images: Tensor, labels: Tensor, result: dict, cache_dir=None) -> None:
    atomic.save(result, _path(kind, model, images, labels, cache_dir))


def cached(kind: str, model: nn.Module, images: Tensor, labels: Tensor, compute: Callable[[], dict],
           cache_dir: str | os.PathLike | None, enabled: bool = True) -> dict:
    """compute() -> dict of tensors, read from cache_dir/<kind>-<weights>-<images>.pt when present,
    else computed and written atomically."""
    if not enabled:
        return compute()
    result = lookup(kind, model, images, labels, cache_dir)
    if result is None:
        result = compute()
        store(kind, model, images, labels, result, cache_dir)
    return result
