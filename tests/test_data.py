"""CIFAR-10 sources (folder, tarball, torchvision, the real mirror), cache, hold-out, augmentation."""
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import augment, data
from conftest import TEST_PER_CLASS, TRAIN_PER_CLASS, class_image, write_class_folders


def as_tarball(folder: Path, path: Path, top: str | None = "cifar10") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=top or ".")
    return path


def warnings_of(run) -> tuple[object, list[str]]:
    """run()'s result and the messages of every warning it gave, each time it gave it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]


def expected_split(per_class: int) -> data.Split:
    images = [class_image(label, i) for label in range(10) for i in range(per_class)]
    labels = [label for label in range(10) for _ in range(per_class)]
    return data.Split(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels))


@pytest.mark.parametrize("source_fixture", ["tiny_folder", "tiny_tarball"])
def test_folder_and_tarball_decode_every_image_with_cifar_labels(source_fixture, request):
    source = request.getfixturevalue(source_fixture)
    for split, per_class in (("trainval", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        got = data.load(split, source=source)
        want = expected_split(per_class)
        assert got.images.dtype == torch.uint8 and got.images.shape == (10 * per_class, 3, 32, 32)
        assert torch.equal(got.labels, want.labels)
        assert torch.equal(got.images, want.images)


def test_the_environment_variable_selects_the_source(tiny_tarball, monkeypatch):
    monkeypatch.setenv(data.ENV_SOURCE, str(tiny_tarball))
    assert len(data.load("test")) == 10 * TEST_PER_CLASS


def test_a_relative_source_is_found_from_the_project_root_too(tiny_tarball, tmp_path, monkeypatch):
    # a notebook's kernel runs in notebooks/, yet CIFAR10_SOURCE=../shared/... was written for the root
    root, elsewhere = tmp_path / "project", tmp_path / "project" / "notebooks"
    elsewhere.mkdir(parents=True)
    (root / "mirror.tar.gz").write_bytes(tiny_tarball.read_bytes())
    monkeypatch.setattr(data, "PROJECT_ROOT", root)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(data.ENV_SOURCE, "mirror.tar.gz")
    assert len(data.load("test")) == 10 * TEST_PER_CLASS
    monkeypatch.setenv(data.ENV_SOURCE, "missing.tar.gz")
    with pytest.raises(data.DataNotFoundError, match="missing.tar.gz does not exist"):
        data.load("test")


def test_decoded_data_is_cached_and_reused(tiny_folder, isolated_data_dir, monkeypatch):
    first = data.load("test", source=tiny_folder)
    assert list((isolated_data_dir / "cache").glob("cifar10-tiny-cifar-*.pt"))

    def no_decoding(*args):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_from_class_folders", no_decoding)
    again = data.load("test", source=tiny_folder)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)


def test_two_loaders_at_once_decode_once_and_the_second_reads_the_first_ones_cache(tiny_folder, monkeypatch):
    """Two notebooks (or test workers) opening the data together: the second waits for the cache."""
    import threading

    decoding, release, decoded = threading.Event(), threading.Event(), []
    from_folders = data._from_class_folders

    def slow_decode(*args):
        decoded.append(threading.current_thread().name)
        decoding.set()
        release.wait(10)  # the second loader starts while the first is still decoding
        return from_folders(*args)

    monkeypatch.setattr(data, "_from_class_folders", slow_decode)
    results = {}
    load = lambda name: results.__setitem__(name, data.load("test", source=tiny_folder))  # noqa: E731
    first = threading.Thread(target=load, args=("first",), name="first")
    first.start()
    assert decoding.wait(10)
    second = threading.Thread(target=load, args=("second",), name="second")
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second loader did not wait for the first one's cache"
    release.set()
    first.join(10), second.join(10)
    assert decoded == ["first"] and torch.equal(results["first"].images, results["second"].images)


def test_a_changed_source_is_decoded_anew(tiny_folder):
    before = data.load("test", source=tiny_folder)
    img = class_image(0, 0)
    img[...] = 255
    Image.fromarray(img).save(tiny_folder / "test" / "airplane" / "9999.png")
    after = data.load("test", source=tiny_folder)
    assert len(after) == len(before) + 1


def test_a_damaged_cache_is_rebuilt(tiny_folder, isolated_data_dir):
    want = data.load("test", source=tiny_folder)
    for cache in (isolated_data_dir / "cache").glob("*.pt"):
        cache.write_bytes(b"not a torch file")
    assert torch.equal(data.load("test", source=tiny_folder).images, want.images)


def test_torchvision_source_reads_the_canonical_files(isolated_data_dir, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:  # what torchvision gives: data [N,32,32,3] uint8, targets list
        def __init__(self, root, train, download):
            assert Path(root) == isolated_data_dir and download
            n = 20 if train else 10
            self.data = np.stack([class_image(i % 10, i) for i in range(n)])
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    test = data.load("test", source="torchvision")
    assert test.images.shape == (10, 3, 32, 32)
    assert torch.equal(test.images[3].permute(1, 2, 0), torch.from_numpy(class_image(3, 3)))
    assert test.labels.tolist() == list(range(10))


def test_no_data_offline_says_how_to_provide_it(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("test")  # default source: torchvision, which must download here
    message = str(e.value)
    assert "no network" in message and data.ENV_SOURCE in message and "cifar-10-python.tar.gz" in message
    assert "\n" not in message and "--source" in message and "shared" not in message  # one line, for a user
    assert e.value._render_traceback_() == [f"DataNotFoundError: {message}"]  # a notebook shows that line alone
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("test", data_dir=tmp_path)  # the advice names the folder that is read, not the default one
    assert f"copy cifar-10-python.tar.gz into {tmp_path}," in str(e.value)
    with pytest.raises(data.DataNotFoundError) as e:  # a missing source, too
        data.load("test", source=tmp_path / "nowhere.tar.gz", data_dir=tmp_path)
    assert f"copy cifar-10-python.tar.gz into {tmp_path}," in str(e.value)


def test_a_damaged_torchvision_archive_is_named_as_damaged(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"half a download")
    with pytest.raises(data.DataNotFoundError) as e:
        data.load("test", data_dir=tmp_path)
    assert str(e.value) == (f"{tmp_path / 'cifar-10-python.tar.gz'} is damaged (its MD5 is not CIFAR-10's): delete "
                            "it, and torchvision downloads it again, or copy a good one there")


def test_a_missing_path_says_how_to_provide_it(tmp_path):
    with pytest.raises(data.DataNotFoundError, match=data.ENV_SOURCE):
        data.load("test", source=tmp_path / "nowhere.tar.gz")


def test_a_tarball_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataNotFoundError, match="not a readable .tar.gz"):
        data.load("test", source=bad)


def test_a_truncated_tarball_is_refused_clearly(tiny_tarball):
    raw = tiny_tarball.read_bytes()
    tiny_tarball.write_bytes(raw[: len(raw) // 2])  # a download or copy cut short
    with pytest.raises(data.DataNotFoundError, match="is not a readable .tar.gz, or is truncated"):
        data.load("test", source=tiny_tarball)


def test_an_image_edited_in_place_is_decoded_anew(tiny_folder):
    before = data.load("test", source=tiny_folder)
    path, other = tiny_folder / "test" / "airplane" / "0000.png", tiny_folder / "test" / "airplane" / "0001.png"
    assert path.stat().st_size == other.stat().st_size  # so the edit keeps the file's size: only its content changes
    mtime = path.stat().st_mtime_ns
    path.write_bytes(other.read_bytes())
    os.utime(path, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))  # saved a second later
    after = data.load("test", source=tiny_folder)
    assert len(after) == len(before) and (after.images[0, 1] == 1).all()  # image 0 now shows index 1


def test_a_missing_class_folder_is_refused(tiny_folder):
    shutil.rmtree(tiny_folder / "test" / "truck")
    with pytest.raises(data.DataNotFoundError, match="has no test images of class truck"):
        data.load("test", source=tiny_folder)


def test_a_killed_cache_write_leaves_no_temporary_file_for_long(tiny_folder, isolated_data_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended, as a SIGKILLed writer has
    cache_dir = isolated_data_dir / "cache"
    data.load("test", source=tiny_folder)
    (cache_file,) = cache_dir.glob("cifar10-*.pt")
    stale = [cache_file.with_name(f".{cache_file.name}.tmp{pid}{tail}") for tail in ("", "-140213-9f2c61ab")]
    for file in stale:
        file.write_bytes(b"half of a cache")
    cache_file.unlink()  # the next load writes the cache again, and sweeps the dead writer's files
    data.load("test", source=tiny_folder)
    assert not any(file.exists() for file in stale) and cache_file.exists()


def test_a_folder_without_the_layout_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(class_image(0, 0)).save(tmp_path / "photos" / "a.png")
    with pytest.raises(data.DataNotFoundError, match="train/<class>"):
        data.load("test", source=tmp_path)


def test_wrong_image_size_is_refused(tiny_folder):
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tiny_folder / "train" / "cat" / "big.png")
    with pytest.raises(ValueError, match="28x28.*must be 32x32"):
        data.load("test", source=tiny_folder)


def test_unreadable_image_is_refused(tiny_folder):
    (tiny_folder / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        data.load("test", source=tiny_folder)


def test_unknown_class_folder_is_refused(tiny_folder):
    (tiny_folder / "train" / "unicorn").mkdir()
    Image.fromarray(class_image(0, 0)).save(tiny_folder / "train" / "unicorn" / "0.png")
    with pytest.raises(ValueError, match="unicorn is not a CIFAR-10 class"):
        data.load("test", source=tiny_folder)


def test_grayscale_files_become_rgb(tiny_folder):
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(tiny_folder / "test" / "cat" / "gray.png")
    test = data.load("test", source=tiny_folder)
    assert test.images.shape[1] == 3 and (test.images == 77).all(dim=(1, 2, 3)).sum() == 1


def test_validation_hold_out_is_seeded_and_disjoint(tiny_folder):
    full = data.load("trainval", source=tiny_folder)
    train = data.load("train", source=tiny_folder, val_size=12, seed=0)
    val = data.load("val", source=tiny_folder, val_size=12, seed=0)
    assert len(train) == len(full) - 12 and len(val) == 12
    # Each pixel pattern (class, index) is unique: together the two halves are the full set, once each.
    key = lambda s: {(int(l), int(im[1, 0, 0])) for im, l in zip(s.images, s.labels)}
    assert key(train) | key(val) == key(full) and not key(train) & key(val)
    assert torch.equal(data.load("val", source=tiny_folder, val_size=12, seed=0).images, val.images)
    assert not torch.equal(data.load("val", source=tiny_folder, val_size=12, seed=1).images, val.images)


def test_bad_split_and_val_size_are_refused(tiny_folder):
    with pytest.raises(ValueError, match="split must be one of"):
        data.load("validation", source=tiny_folder)
    with pytest.raises(ValueError, match="val_size > 0"):
        data.load("val", source=tiny_folder, val_size=0)


def test_subset_keeps_every_class(tiny_folder):
    sub = data.subset(data.load("trainval", source=tiny_folder), 20)
    assert sub.labels.bincount().tolist() == [2] * 10


@pytest.mark.slow  # the real CIFAR-10: the slow lane
def test_real_mirror_has_cifar10s_splits(real_cifar):
    test = real_cifar("test")
    assert test.images.shape == (10_000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.bincount().tolist() == [1000] * 10
    train, val = real_cifar("train"), real_cifar("val")
    assert len(train) == 45_000 and len(val) == 5_000
    # Real photos, not blank files: every image has some contrast.
    assert (test.images.flatten(1).float().std(1) > 5).all()


# ----------------------------------------------------------------------------- the layout of a source


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tarball"])
def test_a_backup_copy_beside_the_layout_is_skipped_and_named(packed, tiny_folder, tmp_path):
    want = data.load("trainval", source=tiny_folder)
    shutil.copytree(tiny_folder / "train", tiny_folder / "backup" / "train")  # would count each image twice
    shutil.copytree(tiny_folder / "test", tiny_folder / "backup" / "test")
    source = as_tarball(tiny_folder, tmp_path / "with-backup.tar.gz") if packed else tiny_folder
    got, said = warnings_of(lambda: data.load("trainval", source=source))
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert len(said) == 1 and f"skipped {10 * (TRAIN_PER_CLASS + TEST_PER_CLASS)} file(s)" in said[0]
    assert said[0].endswith(("): backup/ (80 files)", "): cifar10/backup/ (80 files)")) and "\n" not in said[0]


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tarball"])
def test_files_one_folder_deeper_or_not_images_are_named(packed, tiny_folder, tmp_path):
    (tiny_folder / "train" / "cat" / "extra").mkdir()
    Image.fromarray(class_image(3, 0)).save(tiny_folder / "train" / "cat" / "extra" / "x.png")
    for i in range(5):
        (tiny_folder / "test" / "dog" / f"notes{i}.txt").write_text("not an image")
    (tiny_folder / "README.md").write_text("about")
    (tiny_folder / "train" / "dog" / "._0000.png").write_bytes(b"macOS metadata, not an image")
    source = as_tarball(tiny_folder, tmp_path / "deep.tar.gz", top=None) if packed else tiny_folder
    got, said = warnings_of(lambda: data.load("trainval", source=source))
    assert len(got) == 10 * TRAIN_PER_CLASS and len(said) == 1
    assert "skipped 8 file(s)" in said[0] and said[0].endswith(
        ": train/cat/extra/x.png; README.md; test/dog/{notes0.txt, notes1.txt, notes2.txt and 2 more}; train/dog/._0000.png")


def test_webp_images_are_decoded_where_pillow_reads_them(tiny_folder):
    from PIL import features

    Image.fromarray(np.full((32, 32, 3), 201, np.uint8)).save(tiny_folder / "test" / "cat" / "extra.webp", lossless=True)
    got, said = warnings_of(lambda: data.load("test", source=tiny_folder))
    if features.check("webp"):
        assert len(got) == 10 * TEST_PER_CLASS + 1 and not said
        assert (got.images == 201).all(dim=(1, 2, 3)).sum() == 1 and got.labels[(got.images == 201).all(dim=(1, 2, 3))] == 3
    else:  # a Pillow built without WebP: the file is named, not dropped in silence
        assert len(got) == 10 * TEST_PER_CLASS and "test/cat/{extra.webp}" in said[0]


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tarball"])
def test_two_dataset_trees_are_refused_as_ambiguous(packed, tmp_path):
    write_class_folders(tmp_path / "two" / "cifar10")
    write_class_folders(tmp_path / "two" / "old-copy", train_per_class=1, test_per_class=1)
    source = as_tarball(tmp_path / "two", tmp_path / "two.tar.gz", top=None) if packed else tmp_path / "two"
    with pytest.raises(data.DataNotFoundError, match=r"more than one train/ or test/ tree \(under cifar10/, old-copy/\)"):
        data.load("test", source=source)


def test_one_top_folder_without_the_layout_is_refused(tmp_path):
    write_class_folders(tmp_path / "deep" / "a" / "b")  # two folders down: not the layout
    with pytest.raises(data.DataNotFoundError, match="has no train/<class>/ or test/<class>/ folders"):
        data.load("test", source=tmp_path / "deep")


@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_source_is_refused(empty, tiny_folder, monkeypatch):
    monkeypatch.chdir(tiny_folder)  # would otherwise be read as the source
    with pytest.raises(ValueError, match="source is empty; pass a folder or .tar.gz"):
        data.load("test", source=empty)
    monkeypatch.setenv(data.ENV_SOURCE, empty)  # an empty variable is no variable: the default, torchvision
    assert data.resolve_source(None) == "torchvision"


def test_importing_data_installs_nothing_in_ipython(tmp_path):
    fake = tmp_path / "IPython"  # records every use of the shell a notebook would have
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "used = []\n"
        "class _Shell:\n"
        "    def __getattr__(self, name):\n"
        "        used.append(name)\n"
        "        return lambda *args, **kwargs: None\n"
        "def get_ipython():\n"
        "    return _Shell()\n"
    )
    root = Path(data.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", "import IPython, helpers.data; print(IPython.used)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr


# ----------------------------------------------------------------------------- augmentation


def test_crop_flip_returns_a_padded_crop_of_each_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(8 * 3 * 32 * 32).reshape(8, 3, 32, 32).float() + 1  # every pixel distinct, none zero
    y = augment.random_crop_flip(x, padding=4, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        matches = [
            (dy, dx, f)
            for dy in range(9) for dx in range(9) for f in (False, True)
            if torch.equal(y[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]  # fmt: skip
        assert len(matches) == 1  # one crop (within the 4-pixel padding), maybe flipped


def test_crop_flip_offsets_cover_the_padding_and_flip_half_the_time():
    g = torch.Generator().manual_seed(1)
    n = 4000
    x = torch.zeros(n, 1, 32, 32)
    x[:, :, 0, 0] = 1  # a marker at the top-left corner
    y = augment.random_crop_flip(x, padding=4, generator=g)
    pos = y[:, 0].flatten(1).argmax(1)
    row, col = pos // 32, pos % 32
    seen = y[:, 0].flatten(1).amax(1) == 1  # the marker stays inside unless the crop moved it out
    # The marker lands at (4 - dy, 4 - dx), mirrored in x when flipped: rows 0..4 only.
    assert set(row[seen].tolist()) == {0, 1, 2, 3, 4}
    assert set(col[seen].tolist()) == {0, 1, 2, 3, 4, 27, 28, 29, 30, 31}
    flipped = (col[seen] >= 27).float().mean().item()
    assert 0.45 < flipped < 0.55


def test_crop_flip_is_reproducible_and_works_on_uint8():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment.random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    b = augment.random_crop_flip(x, generator=torch.Generator().manual_seed(5))
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(augment.random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(5)).sort(3).values,
                       x.sort(3).values)  # no padding: only flips, which keep every row's pixels


def test_cutout_paints_one_clipped_square_per_image_and_nothing_else():
    x = torch.randint(1, 256, (500, 3, 32, 32), dtype=torch.uint8)  # no pixel equals the fill 0
    y = augment.cutout(x, 16, torch.zeros(3), generator=torch.Generator().manual_seed(3))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    painted = (y == 0).all(1)  # [B, H, W]: every channel painted together
    assert torch.equal(y[~painted[:, None].expand_as(y)], x[~painted[:, None].expand_as(x)])  # the rest untouched
    rows, cols = painted.any(2), painted.any(1)
    # The painted pixels are exactly a rectangle (rows x cols), at most 16 on a side, at least 8
    # (its centre is inside the image), and exactly 16 x 16 when it lies wholly inside.
    assert torch.equal(painted, rows[:, :, None] & cols[:, None, :])
    h, w = rows.sum(1), cols.sum(1)
    assert ((h >= 8) & (h <= 16) & (w >= 8) & (w <= 16)).all()
    interior = (rows[:, 0] == 0) & (rows[:, -1] == 0) & (cols[:, 0] == 0) & (cols[:, -1] == 0)
    assert interior.any() and ((h[interior] == 16) & (w[interior] == 16)).all()
    # Centred on a uniform pixel: the square's first row is that pixel's row minus 8, clipped at 0.
    first = rows.float().argmax(1)
    assert (first == 0).float().mean().item() == pytest.approx(9 / 32, abs=0.07)


def test_cutout_with_the_mean_colour_is_zero_after_normalization_and_reproducible():
    from helpers import msdnet

    model = msdnet.build("tiny")
    fill = (model.mean.view(-1) * 255).round()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = augment.cutout(x, 16, fill, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, augment.cutout(x, 16, fill, generator=torch.Generator().manual_seed(4)))
    painted = (a != x).any(1)
    z = model.standardize(a.float() / 255)
    assert z.permute(0, 2, 3, 1)[painted].abs().max() < 0.01  # within rounding to whole 0..255 levels
    assert torch.equal(augment.cutout(x, 0, fill), x)
    with pytest.raises(ValueError, match="fill has 1 values, the images have 3 channels"):
        augment.cutout(x, 16, torch.zeros(1))
