"""Results computed from a model and images (predictions, Grad-CAM maps), stored on disk.

A result is named after hashes of the weights, the images and the code that computed it (FORMAT and
the source of the modules the caller names), so the same weights meeting the same images compute it
once, and a change to the forward path or a CAM method computes it anew. The cache is an
optimization: a folder that cannot be written, a damaged file, or one holding something else than
the caller expects (other keys, another shape) costs a recomputation and a one-line warning, never
the result.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from . import atomic, data

__all__ = ["FORMAT", "fingerprint", "code_version", "cached", "lookup", "store"]

FORMAT = 2
"""The layout of the cache's files and names; raise it when what a file holds changes."""

_ELSE = "holds something else"
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


@functools.lru_cache(maxsize=None)
def _source_hash(module: ModuleType) -> str:
    try:
        text = inspect.getsource(module)
    except (OSError, TypeError):  # no source shipped (a frozen or compiled install): its name and version
        text = f"{module.__name__} {getattr(module, '__version__', '')}"
    return hashlib.sha256(text.encode()).hexdigest()


def code_version(modules: Iterable[ModuleType] = ()) -> str:
    """A short hash of FORMAT and the source of `modules`: it changes whenever their code does.

    Args:
        modules: the modules whose code computes a result (e.g. helpers.msdnet and helpers.gradcam).
    Returns:
        8 hexadecimal characters.
    """
    h = hashlib.sha256(f"format {FORMAT}".encode())
    for m in modules:
        h.update(_source_hash(m).encode())
    return h.hexdigest()[:8]


def _path(kind: str, model: nn.Module, images: Tensor, labels: Tensor, cache_dir, code) -> Path:
    folder = Path(cache_dir) if cache_dir else data.DATA_DIR / "cache"
    return folder / (f"{kind}-{fingerprint(model.state_dict().values())}-{fingerprint((images, labels))}"
                     f"-{code_version(code)}.pt")


def _read(path: Path, expect: Callable[[object], str | None] | None) -> tuple[dict | None, str | None]:
    """atomic.load_or_discard, with a file that holds something other than `expect` wants discarded too."""
    result, problem = atomic.load_or_discard(path)
    if result is not None:
        wrong = "holds no dict" if not isinstance(result, dict) else expect(result) if expect else None
        if wrong:
            result, problem = None, f"{_ELSE} ({wrong})"
            try:
                path.unlink(missing_ok=True)  # so the result computed now takes its place
            except OSError as e:
                problem += f" and could not be removed ({e.strerror or e})"
    return result, problem


def lookup(kind: str, model: nn.Module, images: Tensor, labels: Tensor, cache_dir=None,
           expect: Callable[[dict], str | None] | None = None, code: Iterable[ModuleType] = ()) -> dict | None:
    """The stored result for these weights, images and code, or None; never computes.

    A damaged file, or one `expect` refuses, is removed (and counts as none), with a one-line warning.

    Args:
        kind: the kind of result, the first part of the file's name ("predictions", ...).
        model: the weights the result was computed with.
        images, labels: the inputs it was computed from (images [N, 3, 32, 32], int64 labels [N]).
        cache_dir: the folder; data.DATA_DIR / "cache" when None.
        expect: (stored dict) -> None when it is what the caller wants, else what is wrong, in a few words.
        code: the modules whose code computed the result (see :func:`code_version`).
    """
    path = _path(kind, model, images, labels, cache_dir, tuple(code))
    result, problem = _read(path, expect)
    if problem and (path.exists() or problem.startswith(_ELSE)):  # a damaged file removed: nothing to say
        warnings.warn(f"the cache file {path} {problem}; it is ignored", RuntimeWarning, stacklevel=3)
    return result


def store(kind: str, model: nn.Module, images: Tensor, labels: Tensor, result: dict, cache_dir=None,
          code: Iterable[ModuleType] = ()) -> bool:
    """Write a result for :func:`lookup` to find, atomically.

    Args:
        result: a dict of tensors (and plain types).
        the others: as in :func:`lookup`.

    Returns:
        True when written; False, with a warning naming the folder, when it could not be.
    """
    return atomic.save_or_warn(result, _path(kind, model, images, labels, cache_dir, tuple(code)),
                               then=_AGAIN, stacklevel=3)


def cached(kind: str, model: nn.Module, images: Tensor, labels: Tensor, compute: Callable[[], dict],
           cache_dir: str | os.PathLike | None, enabled: bool = True,
           expect: Callable[[dict], str | None] | None = None, code: Iterable[ModuleType] = ()) -> dict:
    """``compute()``'s result, read from ``cache_dir/<kind>-<weights>-<images>-<code>.pt`` when present.

    Otherwise it is computed and written atomically. A folder that cannot be written (read-only, full),
    a damaged file there, or one `expect` refuses still returns the computed result, with one warning.

    Args:
        compute: () -> dict of tensors, called only when nothing usable is stored.
        enabled: False computes and neither reads nor writes the cache.
        the others: as in :func:`lookup`.
    """
    if not enabled:
        return compute()
    path = _path(kind, model, images, labels, cache_dir, tuple(code))
    result, problem = _read(path, expect)
    if result is None:
        result = compute()
        if atomic.save_or_warn(result, path, problem, then=_AGAIN, stacklevel=3) and problem and problem.startswith(_ELSE):
            warnings.warn(f"the cache file {path} {problem}; it was computed again and replaced", RuntimeWarning,
                          stacklevel=2)
    return result
