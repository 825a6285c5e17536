"""CIFAR-10 as uint8 tensors, decoded once and cached, plus batch augmentation on tensors.

Sources (the first that is set wins):
  1. the `source` argument,
  2. the environment variable CIFAR10_SOURCE,
  3. "torchvision": the canonical files under data/, downloaded by torchvision when online.
A source is "torchvision" or a path to a folder or .tar.gz laid out one folder per class
(train/<class>/*.png|jpg, test/<class>/*), such as ../shared/data/cifar10-jpeg.tar.gz.

Whatever the source, the decoded arrays are cached under data/cache/, so later loads take
seconds. Images are uint8 [N, 3, 32, 32]; the model normalizes them itself.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import atomic

__all__ = [
    "CLASSES",
    "DATA_DIR",
    "ENV_SOURCE",
    "DataNotFoundError",
    "Split",
    "load",
    "random_crop_flip",
    "subset",
]

# CIFAR-10's label order (also alphabetical).
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ENV_SOURCE = "CIFAR10_SOURCE"
# Downloads and caches live in the repository's data/ folder unless MSDNET_DATA_DIR says otherwise.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("MSDNET_DATA_DIR", PROJECT_ROOT / "data"))
SPLITS = ("train", "val", "test", "trainval")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class DataNotFoundError(RuntimeError):
    pass


def _short_error_in_notebooks() -> None:
    """In Jupyter, a missing dataset shows its message alone, not behind a long traceback through
    torchvision and this module: the message already says what to do."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def show(shell, etype, value, tb, tb_offset=None):
        # _showtraceback is the hook the kernel overrides to send an error output: one entry, the message
        shell._showtraceback(etype, value, [f"{etype.__name__}: {value}"])

    shell.set_custom_exc((DataNotFoundError,), show)


_short_error_in_notebooks()


class Split(NamedTuple):
    """Images (uint8 [N, 3, 32, 32], 0..255) and their labels (int64 [N]); the splits are sorted by
    class, so take spread-out samples with data.subset. The model wants images.float() / 255."""

    images: Tensor  # uint8 [N, 3, 32, 32]
    labels: Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def _no_data_message(detail: str, data_dir: Path | None = None) -> str:
    folder = data_dir or DATA_DIR  # where the torchvision source reads and downloads
    return (
        f"CIFAR-10 could not be loaded: {detail}\n"
        "Provide it in one of these ways:\n"
        f"  - online: let torchvision download it (the default source, saved under {folder});\n"
        f"  - offline: copy cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) into {folder};\n"
        f"  - a folder or .tar.gz laid out train/<class>/*, test/<class>/*: pass source=PATH or set "
        f"{ENV_SOURCE}=PATH (on the project's machines: {ENV_SOURCE}=../shared/data/cifar10-jpeg.tar.gz)."
    )


def resolve_source(source: str | os.PathLike | None) -> str:
    source = str(source if source is not None else os.environ.get(ENV_SOURCE) or "torchvision")
    if source == "torchvision":
        return source
    path = Path(source).expanduser()
    # A relative path is read from the current folder, else from the project's root, where the README's
    # commands run: a notebook's kernel starts in notebooks/ but sees the same CIFAR10_SOURCE.
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


def _decode(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name} is not a readable image ({e}); remove it or replace the dataset") from e
    if img.size != (32, 32):
        raise ValueError(f"{name} is {img.size[0]}x{img.size[1]}; CIFAR-10 images must be 32x32")
    return np.asarray(img)


def _split_and_class(relpath: str) -> tuple[str, str] | None:
    """('train', 'dog') for '.../train/dog/0001.jpg'; None for files outside the layout."""
    parts = relpath.replace("\\", "/").split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    split, cls = parts[-3], parts[-2]
    return (split, cls) if split in ("train", "test") else None


def _iter_files(path: Path, data_dir: Path | None = None):
    """(relative path, bytes) of every file in a folder or tarball, in sorted order."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                yield p.relative_to(path).as_posix(), p.read_bytes()
        return
    try:
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            for m in members:
                yield m.name, tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # not a tarball, or cut short
        raise DataNotFoundError(_no_data_message(f"{path} is not a readable .tar.gz, or is truncated ({e!r})", data_dir)) from e


def _from_class_folders(path: Path, data_dir: Path | None = None) -> dict[str, Split]:
    from tqdm.auto import tqdm

    found: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for rel, data in tqdm(_iter_files(path, data_dir), desc=f"decoding {path.name}", unit=" files", mininterval=1):
        where = _split_and_class(rel)
        if where is None:
            continue
        split, cls = where
        if cls not in CLASSES:
            raise ValueError(f"{path}: folder {split}/{cls} is not a CIFAR-10 class; expected one of {CLASSES}")
        found[split][0].append(_decode(data, f"{path}/{rel}"))
        found[split][1].append(CLASSES.index(cls))
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
            raise DataNotFoundError(_no_data_message(f"torchvision could not find or download it into {root} ({e})", root)) from e
        out[split] = Split(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return out


def _load_decoded(source: str, data_dir: Path) -> dict[str, Split]:
    if source == "torchvision":
        key = "torchvision"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataNotFoundError(_no_data_message(f"the source {path} does not exist", data_dir))
        key = f"{path.name.split('.')[0]}-{_fingerprint(path)}"
    cache = data_dir / "cache" / f"cifar10-{key}.pt"
    if cache.exists():
        try:
            d = torch.load(cache, weights_only=True)
            return {s: Split(d[s]["images"], d[s]["labels"]) for s in ("train", "test")}
        except Exception:  # a damaged cache is rebuilt, not trusted
            cache.unlink()
    decoded = _from_torchvision(data_dir) if source == "torchvision" else _from_class_folders(path, data_dir)
    atomic.save({s: {"images": v.images, "labels": v.labels} for s, v in decoded.items()}, cache)
    return decoded


def validation_indices(n_train: int, val_size: int, seed: int) -> Tensor:
    """The seeded hold-out: `val_size` indices of the training set, sorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=g)[:val_size].sort().values


def load(
    split: str = "train",
    source: str | os.PathLike | None = None,
    val_size: int = 5000,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> Split:
    """One split of CIFAR-10 as uint8 images [N,3,32,32] and int64 labels.

    split: "train" (the training set minus the validation hold-out), "val" (the hold-out:
    `val_size` training images chosen with `seed`), "trainval" (all 50,000) or "test".
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
    """n images spread evenly over the split (splits are ordered by class, so every class keeps its share).
    `name` is what the error calls n (a command-line flag, say)."""
    if not 0 < n <= len(split):
        raise ValueError(f"{name} must be between 1 and {len(split)} (the split's images), got {n}")
    idx = torch.linspace(0, len(split) - 1, n).round().long()
    return Split(split.images[idx], split.labels[idx])


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The paper's augmentation on a whole batch at once, on the batch's own device: a random
    crop of the zero-padded image and a horizontal flip with probability 1/2.

    images: [B, C, H, W] of any dtype. Random numbers come from `generator` (on the CPU), so
    a seeded generator gives the same crops on every device.
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
    """Cutout (DeVries and Taylor, 2017) on a whole batch: one `size` x `size` square per image, centred
    on a uniformly random pixel (so near the border only part of it falls inside), painted `fill`.

    images: [B, C, H, W]; fill: one value per channel, in the images' units. Painting the dataset's mean
    colour makes the square zero after normalization, as in the paper, which cuts after normalizing.
    Random numbers come from `generator` (on the CPU), as in random_crop_flip.
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
