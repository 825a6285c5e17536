"""CIFAR-10 as uint8 tensors, decoded once and cached (augmentation for training is in helpers.augment).

Sources (the first that is set wins): the ``source`` argument, the environment variable
CIFAR10_SOURCE, then "torchvision" (the canonical files under data/, downloaded when online).
A path source is a folder or .tar.gz holding ``train/<class>/<image>`` and ``test/<class>/<image>``,
directly or under one top folder. The decoded arrays are cached under data/cache/.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import atomic
from .errors import OneLineError

__all__ = [
    "CLASSES",
    "DATA_DIR",
    "ENV_SOURCE",
    "DataNotFoundError",
    "Split",
    "load",
    "resolve_source",
    "subset",
    "validation_indices",
]

# CIFAR-10's label order (also alphabetical).
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ENV_SOURCE = "CIFAR10_SOURCE"
# Downloads and caches live in the repository's data/ folder unless MSDNET_DATA_DIR says otherwise.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MSDNET_DATA_DIR", PROJECT_ROOT / "data"))
SPLITS = ("train", "val", "test", "trainval")
# The note of skipped files names a few of each kind: it stays one readable line.
_SHOWN_ENTRIES, _SHOWN_FILES = 10, 3


class DataNotFoundError(OneLineError, RuntimeError):
    """CIFAR-10 could not be found or read; the message says how to provide it."""


class Split(NamedTuple):
    """Images and their labels, sorted by class (take spread-out samples with :func:`subset`).

    Attributes:
        images: uint8 [N, 3, 32, 32] in 0..255; the model takes ``images.float() / 255``.
        labels: int64 [N] in 0..9, indices into CLASSES.
    """

    images: Tensor  # uint8 [N, 3, 32, 32]
    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def _no_data_message(detail: str, data_dir: Path | None = None) -> str:
    """One line: what went wrong, then the ways to provide CIFAR-10."""
    folder = data_dir or DATA_DIR  # where the torchvision source reads and downloads
    return (f"CIFAR-10 could not be loaded: {detail}. Provide it: online, torchvision downloads it into {folder}; "
            f"offline, copy cifar-10-python.tar.gz into {folder}, or point --source (in Python source=, or the "
            f"environment variable {ENV_SOURCE}) at a folder or .tar.gz laid out train/<class>/*, test/<class>/*")


def resolve_source(source: str | os.PathLike | None) -> str:
    """The source load() reads: "torchvision" or a path.

    Args:
        source: "torchvision", a path, or None for the environment variable CIFAR10_SOURCE (when
            set and not empty), else "torchvision". A relative path is read from the current folder,
            else from the project's root.

    Raises:
        ValueError: ``source`` is empty (it would read the current folder).
    """
    if source is not None and not str(source).strip():
        raise ValueError(
            f"source is empty; pass a folder or .tar.gz of CIFAR-10, 'torchvision', or None "
            f"(then {ENV_SOURCE}, else torchvision)"
        )
    source = str(source if source is not None else os.environ.get(ENV_SOURCE, "").strip() or "torchvision")
    if source == "torchvision":
        return source
    path = Path(source).expanduser()
    # A notebook's kernel starts in notebooks/ but sees the CIFAR10_SOURCE written for the root.
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    return str(path)


def _fingerprint(path: Path) -> str:
    """Names the cache after the content of a folder or archive, so a changed source is decoded anew."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for p in sorted(path.rglob("*")):
            if p.is_file():  # size and modification time: an image edited in place changes the key
                st = p.stat()
                h.update(f"{p.relative_to(path).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _image_suffixes() -> frozenset[str]:
    """The file endings this Pillow can open (.png, .jpg, .webp where built with it, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name} is not a readable image ({e}); remove it or replace the dataset") from e
    if img.size != (32, 32):
        raise ValueError(f"{name} is {img.size[0]}x{img.size[1]}; CIFAR-10 images must be 32x32")
    return np.asarray(img)


def _parts(name: str) -> tuple[str, ...]:
    # Tarballs made with `tar -C dir .` name their members ./train/...
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _layout(names: list[str], source: Path, data_dir: Path | None) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """Sort a source's file names into images of the layout and files skipped.

    The layout is ``train/<class>/<image>`` and ``test/<class>/<image>`` at the top of the source, or
    under one top folder (``cifar10/train/...``, as archives are made). Anything else, such as a
    ``backup/train/`` copy, a deeper folder or a file Pillow cannot open, is skipped, never guessed at.

    Returns:
        ({name: (split, label)} of the images, the names of the files skipped).
    """
    parts = {n: _parts(n) for n in names}
    has_split = lambda p, i: len(p) > i + 1 and p[i] in ("train", "test")  # noqa: E731
    if any(has_split(p, 0) for p in parts.values()):
        top = ()
    else:
        tops = sorted({p[0] for p in parts.values() if has_split(p, 1)})
        if len(tops) > 1:  # two datasets: taking both would mix them, taking one would be a guess
            raise DataNotFoundError(_no_data_message(
                f"{source} holds more than one train/ or test/ tree (under {', '.join(t + '/' for t in tops)}); "
                "keep one, or point the source at the one to use", data_dir))
        if not tops:
            raise DataNotFoundError(_no_data_message(f"{source} has no train/<class>/ or test/<class>/ folders", data_dir))
        top = (tops[0],)
    suffixes = _image_suffixes()
    images, skipped = {}, []
    for name, p in parts.items():
        rel = p[len(top):]
        if (p[: len(top)] == top and len(rel) == 3 and rel[0] in ("train", "test") and not rel[2].startswith(".")
                and os.path.splitext(rel[2])[1].lower() in suffixes):
            if rel[1] not in CLASSES:
                raise ValueError(f"{source}: folder {rel[0]}/{rel[1]} is not a CIFAR-10 class; expected one of {CLASSES}")
            images[name] = (rel[0], CLASSES.index(rel[1]))
        else:
            skipped.append(name)
    return images, skipped


def _skipped_note(source: Path, skipped: list[str], kept: list[str]) -> str:
    """One line naming the skipped files: a folder holding no kept image is named once, as a whole."""
    kept_dirs = {_parts(name)[:i] for name in kept for i in range(len(_parts(name)))}
    wholes: dict[str, list[str]] = {}
    loose: dict[str, list[str]] = {}
    for name in sorted(skipped):
        p = _parts(name)
        whole = next((p[:i] for i in range(1, len(p)) if p[:i] not in kept_dirs), None)
        if whole:
            wholes.setdefault("/".join(whole) + "/", []).append("/".join(p))
        else:
            loose.setdefault("".join(f"{d}/" for d in p[:-1]), []).append(p[-1])
    shown = [names[0] if len(names) == 1 else f"{folder} ({len(names)} files)" for folder, names in wholes.items()]
    for folder, files in loose.items():
        more = f" and {len(files) - _SHOWN_FILES} more" if len(files) > _SHOWN_FILES else ""
        shown.append(f"{folder}{files[0]}" if len(files) == 1 else f"{folder}{{{', '.join(files[:_SHOWN_FILES])}{more}}}")
    if len(shown) > _SHOWN_ENTRIES:
        shown[_SHOWN_ENTRIES:] = [f"and {len(shown) - _SHOWN_ENTRIES} more places"]
    return (
        f"{source}: skipped {len(skipped)} file(s) that are not train/<class>/<image> or test/<class>/<image> "
        f"(with an image type Pillow opens): {'; '.join(shown)}"
    )


def _read_files(path: Path, data_dir: Path | None) -> tuple[list[tuple[str, str, int, bytes]], list[str]]:
    """(name, split, label, bytes) of the layout's images in a folder or tarball, sorted by name, and
    the names of the files skipped."""
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
        images, skipped = _layout(list(files), path, data_dir)
        read = {name: files[name].read_bytes() for name in images}
    else:
        try:
            with tarfile.open(path) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                images, skipped = _layout([m.name for m in members], path, data_dir)
                # In the archive's order: going back in a .tar.gz decompresses it again from the start.
                read = {m.name: tar.extractfile(m).read() for m in members if m.name in images}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # not a tarball, or cut short
            raise DataNotFoundError(_no_data_message(f"{path} is not a readable .tar.gz, or is truncated ({e!r})", data_dir)) from e
    return [(name, *images[name], read[name]) for name in sorted(read)], skipped


def _from_class_folders(path: Path, data_dir: Path | None = None) -> dict[str, Split]:
    from tqdm.auto import tqdm

    files, skipped = _read_files(path, data_dir)
    if skipped:
        warnings.warn(_skipped_note(path, skipped, [name for name, *_ in files]), stacklevel=4)  # at load()'s caller
    found: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for name, split, label, raw in tqdm(files, desc=f"decoding {path.name}", unit=" files", mininterval=1):
        found[split][0].append(_decode(raw, f"{path}/{name}"))
        found[split][1].append(label)
    for split, (images, labels) in found.items():
        if not images:
            raise DataNotFoundError(_no_data_message(f"{path} has no images under {split}/<class>/", data_dir))
        missing = [c for i, c in enumerate(CLASSES) if i not in set(labels)]
        if missing:  # accuracy over nine classes would pass for accuracy on CIFAR-10
            raise DataNotFoundError(_no_data_message(f"{path} has no {split} images of class {', '.join(missing)}", data_dir))
    return {
        split: Split(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))
        for split, (images, labels) in found.items()
    }


def _from_torchvision(root: Path) -> dict[str, Split]:
    from torchvision.datasets import CIFAR10

    out = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR10(root, train=split == "train", download=True)
        except Exception as e:  # offline: URLError, socket errors, ...; corrupt files: RuntimeError
            archive = root / CIFAR10.filename
            if archive.is_file() and not _torchvision_archive_ok(archive):
                raise DataNotFoundError(f"{archive} is damaged (its MD5 is not CIFAR-10's): delete it, and torchvision "
                                        "downloads it again, or copy a good one there") from None
            raise DataNotFoundError(_no_data_message(f"torchvision could not find or download it into {root} "
                                                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", root)) from None
        out[split] = Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return out


def _torchvision_archive_ok(archive: Path) -> bool:
    """Whether `archive` is torchvision's CIFAR-10 download, whole (its published MD5)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    return check_integrity(str(archive), CIFAR10.tgz_md5)


def _load_decoded(source: str, data_dir: Path) -> dict[str, Split]:
    if source == "torchvision":
        key = "torchvision"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataNotFoundError(_no_data_message(f"the source {path} does not exist", data_dir))
        key = f"{path.name.split('.')[0]}-{_fingerprint(path)}"
    cache = data_dir / "cache" / f"cifar10-{key}.pt"
    with atomic.taking_turns(cache):  # a second process (a notebook, a test worker) reads the first one's cache
        saved, problem = atomic.load_or_discard(cache)
        if saved is not None:
            try:
                return {s: Split(saved[s]["images"], saved[s]["labels"]) for s in ("train", "test")}
            except (KeyError, TypeError):  # a file of another shape under this name: decode anew
                problem = "holds something else"
        decoded = _from_torchvision(data_dir) if source == "torchvision" else _from_class_folders(path, data_dir)
        # A read-only data folder still gets its data: the cache only saves decoding it again.
        atomic.save_or_warn({s: {"images": v.images, "labels": v.labels} for s, v in decoded.items()}, cache, problem,
                            then="the data is returned but will be decoded again next time", stacklevel=3)
        return decoded


def validation_indices(n_train: int, val_size: int, seed: int) -> Tensor:
    """The seeded validation hold-out: ``val_size`` indices into the training set.

    Args:
        n_train: the training set's size.
        val_size: how many to hold out, 0..n_train.
        seed: the same seed gives the same indices.

    Returns:
        int64 [val_size], sorted, distinct, in 0..n_train-1.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=g)[:val_size].sort().values


def load(
    split: str = "train",
    source: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> Split:
    """One split of CIFAR-10, decoded once per source and cached under ``data_dir/cache``.

    Args:
        split: "train" (the training set minus the validation hold-out), "val" (the hold-out),
            "trainval" (the whole training set, 50,000) or "test" (10,000).
        source: see :func:`resolve_source`.
        val_size: the hold-out's size, 0..len(trainval)-1 (at least 1 for "val").
        seed: chooses the hold-out (see :func:`validation_indices`).
        data_dir: where caches and torchvision's downloads go; DATA_DIR when None.

    Returns:
        A :class:`Split`: uint8 images [N, 3, 32, 32] in 0..255, int64 labels [N], sorted by class.

    Raises:
        DataNotFoundError: no source could be read; the message says how to provide one.
        ValueError: a bad argument, or a source with files that are no CIFAR-10 image.

    A data folder that cannot be written still returns the data, with one warning; so does a
    source with files outside the layout, which names them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    decoded = _load_decoded(resolve_source(source), Path(data_dir) if data_dir else DATA_DIR)
    if split in ("test", "trainval"):
        return decoded["test" if split == "test" else "train"]
    full = decoded["train"]
    if split == "val" and val_size <= 0:
        raise ValueError("split='val' needs val_size > 0")
    if not 0 <= val_size < len(full):
        raise ValueError(f"val_size must be between 0 and {len(full) - 1}, got {val_size}")
    held = torch.zeros(len(full), dtype=torch.bool)
    held[validation_indices(len(full), val_size, seed)] = True
    keep = held if split == "val" else ~held
    return Split(full.images[keep], full.labels[keep])


def subset(split: Split, n: int, name: str = "subset size") -> Split:
    """``n`` images spread evenly over a split, so every class keeps its share.

    Args:
        split: a :class:`Split` (sorted by class, as load() returns it).
        n: how many, 1..len(split).
        name: what the error calls ``n`` (a command-line flag, say).
    """
    if not 0 < n <= len(split):
        raise ValueError(f"{name} must be between 1 and {len(split)} (the split's images), got {n}")
    idx = torch.linspace(0, len(split) - 1, n).round().long()
    return Split(split.images[idx], split.labels[idx])
