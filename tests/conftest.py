"""Shared fixtures: tiny CIFAR-10-shaped datasets made on the fly, and the real mirror where CI has it."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from helpers import data

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 2
# Read before any fixture clears it: tests use their own tiny sources unless they ask for the mirror.
REAL_SOURCE = os.environ.get(data.ENV_SOURCE)


def class_image(label: int, index: int) -> np.ndarray:
    """A 32x32 RGB image whose pixels encode its class and index, so a test can tell which one it got."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[..., 0] = label * 20
    img[..., 1] = index
    img[..., 2] = np.arange(32, dtype=np.uint8)[None, :] * 7  # varies along x, so a flip shows
    return img


def write_class_folders(root: Path, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS) -> Path:
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(data.CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(class_image(label, i)).save(folder / f"{i:04d}.png")  # PNG: lossless
    return root


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path, monkeypatch):
    """Every test gets its own data/ (caches, downloads), never the repository's."""
    d = tmp_path / "data_dir"
    monkeypatch.setattr(data, "DATA_DIR", d)
    monkeypatch.setenv("MSDNET_DATA_DIR", str(d))  # for subprocesses
    monkeypatch.delenv(data.ENV_SOURCE, raising=False)
    return d


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return write_class_folders(tmp_path / "tiny-cifar")


@pytest.fixture
def tiny_tarball(tmp_path, tiny_folder) -> Path:
    path = tmp_path / "tiny-cifar.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tiny_folder, arcname="cifar10")  # one extra top folder, as real archives have
    return path


def pytest_configure(config):
    """Under pytest-xdist (`-n auto`) each worker has one core: torch, and the kernels and scripts it
    starts, use one thread, as two-thread processes side by side would fight over the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@contextmanager
def shared_by_workers(tmp_path_factory, name: str):
    """A folder made once per test session, shared by pytest-xdist's workers, yielded under a lock held
    while it is used: the first to hold it builds what the folder should hold, the others find it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield tmp_path_factory.mktemp(name)
        return
    root = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    with FileLock(str(root / f"{name}.lock")):
        folder = root / name
        folder.mkdir(exist_ok=True)
        yield folder


@pytest.fixture(scope="session")
def real_cifar(tmp_path_factory):
    """load(split) on the real CIFAR-10 (the offline mirror in CI), decoded once per test session.
    In CI (CI=true) its absence is a failure, never a skip."""
    path = Path(REAL_SOURCE) if REAL_SOURCE else None
    if path is None or not path.exists():
        msg = f"the real CIFAR-10 is needed: set {data.ENV_SOURCE} to it (got {REAL_SOURCE!r})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with shared_by_workers(tmp_path_factory, "real_cifar_cache") as cache:
        data.load("train", source=path, data_dir=cache)  # decodes both splits into the cache, once
    load = lambda split, **kw: data.load(split, source=path, data_dir=cache, **kw)  # noqa: E731
    load.source, load.data_dir = path, cache  # for code that finds the data as a user's does (env, data folder)
    return load


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The site built from this checkout (warnings as errors), once per test session."""
    with shared_by_workers(tmp_path_factory, "site") as out:
        if not (out / "index.html").is_file():
            done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-b", "html", "docs", str(out)],
                                  cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"the site does not build without warnings:\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


LONGEST_FIRST = ["test_pretrained.py", "test_train.py", "06_what_makes_a_classifier_better.ipynb",
                 "test_benchmarks.py", "04_early_exit.ipynb", "test_site.py", "08_beyond_the_blog.ipynb",
                 "test_browser.py", "02_training_msdnet_on_cifar10.ipynb", "test_gradcam.py"]
"""The files whose tests take longest in the slow lane, longest first (measured with --durations)."""


def pytest_collection_modifyitems(config, items):
    """The notebooks' cells (collected by nbval from notebooks/) belong to the slow lane. Files run in the
    order of LONGEST_FIRST, then as collected: pytest-xdist hands each worker the next file in this order,
    so the long ones start early and no worker is left alone with one at the end."""
    for item in items:
        if str(getattr(item, "path", "")).endswith(".ipynb"):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.path)).name, len(rank)))  # stable: cells keep their order
