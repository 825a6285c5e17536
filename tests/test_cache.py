"""Atomic writes and the caches (decoded data, results): concurrent writers, folders that cannot be
written, damaged files."""
import shutil
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import atomic, cache, data

WRITERS = 40


def warnings_of(run) -> tuple[object, list[str]]:
    """run()'s result and the messages of every warning it gave, each time it gave it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]


@pytest.fixture
def read_only():
    """read_only(folder): the folder, made so that nothing can be created or removed in it."""
    made = []

    def writable(folder: Path) -> bool:
        probe = folder / ".probe"
        try:
            probe.touch()
        except OSError:
            return False
        probe.unlink()
        return True

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        made.append(folder)
        folder.chmod(0o555)
        if writable(folder) and shutil.which("chattr"):  # root ignores permissions, not an immutable folder
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if writable(folder):
            pytest.skip("cannot make a read-only folder here (root, and no chattr)")
        return folder

    yield make
    for folder in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)




def in_threads(write, n: int = WRITERS) -> list[BaseException]:
    """Runs write(i) for i < n, all threads released at once; the exceptions they raised."""
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        try:
            write(i)
        except BaseException as e:  # collected: an exception in a worker thread fails nothing by itself
            return e

    with ThreadPoolExecutor(n) as pool:
        return [e for e in pool.map(one, range(n)) if e is not None]


def test_threads_saving_one_file_never_collide(tmp_path):
    path = tmp_path / "shared.pt"
    for _ in range(3):
        assert in_threads(lambda i: atomic.save({"i": torch.tensor(i), "x": torch.full((1000,), i)}, path)) == []
        saved = torch.load(path, weights_only=True)
        assert 0 <= saved["i"] < WRITERS and (saved["x"] == saved["i"]).all()  # one writer's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["shared.pt"]  # no temporary file left behind


def test_threads_writing_one_text_never_collide(tmp_path):
    path = tmp_path / "card.json"
    assert in_threads(lambda i: atomic.write_text(path, f"writer {i}\n" * 100)) == []
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and len(set(lines)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]


def test_threads_writing_one_picture_never_collide(tmp_path):
    path = tmp_path / "explorer.png"
    assert in_threads(lambda i: atomic.write_bytes(path, bytes([i]) * 100_000)) == []
    data = path.read_bytes()
    assert len(data) == 100_000 and len(set(data)) == 1  # one writer's bytes, whole
    assert [p.name for p in tmp_path.iterdir()] == ["explorer.png"]


def test_threads_storing_one_result_neither_fail_nor_warn(tmp_path):
    model = nn.Linear(2, 2)
    images, labels = torch.zeros(3, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)
    result = {"maps": torch.rand(3, 32, 32)}
    written, said = warnings_of(lambda: in_threads(lambda i: cache.store("maps", model, images, labels, result, tmp_path)))
    assert written == [] and said == []
    assert torch.equal(cache.lookup("maps", model, images, labels, tmp_path)["maps"], result["maps"])


def test_a_failed_save_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic.save({"x": torch.ones(1)}, path)

    def full_disk(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device") as e:
        atomic.save({"x": torch.zeros(1)}, path)
    assert e.value.errno == 28
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["x"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_saving_into_a_read_only_folder_names_the_file(tmp_path, read_only):
    folder = read_only(tmp_path / "ro")
    with pytest.raises(PermissionError, match=f"could not write {folder / 'x.pt'}: "):
        atomic.save({"x": torch.ones(1)}, folder / "x.pt")
    with pytest.raises(PermissionError, match=f"could not write {folder / 'sub' / 'x.txt'}: "):
        atomic.write_text(folder / "sub" / "x.txt", "text")  # its folder cannot be made either


# ----------------------------------------------------------------------------- the result cache


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    return nn.Linear(4, 3), torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.arange(5)


def counting(result):
    calls = []

    def compute():
        calls.append(1)
        return result

    return compute, calls


def test_a_result_is_computed_once_and_then_read(inputs, tmp_path):
    compute, calls = counting({"logits": torch.rand(5, 3)})
    first = cache.cached("predictions", *inputs, compute, tmp_path)
    again = cache.cached("predictions", *inputs, compute, tmp_path)
    assert len(calls) == 1 and torch.equal(first["logits"], again["logits"])


def test_a_read_only_cache_folder_returns_the_result_with_one_warning(inputs, tmp_path, read_only):
    folder = read_only(tmp_path / "ro")
    compute, calls = counting({"logits": torch.rand(5, 3)})
    got, said = warnings_of(lambda: cache.cached("predictions", *inputs, compute, folder))
    assert torch.equal(got["logits"], compute()["logits"])
    assert len(said) == 1 and f" in {folder} (" in said[0] and "computed again next time" in said[0]
    assert "inline_container" not in said[0] and "\n" not in said[0]
    written, said = warnings_of(lambda: cache.store("predictions", *inputs, {"x": torch.ones(1)}, folder))
    assert written is False and len(said) == 1 and f" in {folder} (" in said[0]


def test_a_full_disk_returns_the_result_with_one_warning(inputs, tmp_path, monkeypatch):
    def full_disk(obj, f):  # what torch's C++ writer raises when a write fails
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", full_disk)
    compute, calls = counting({"logits": torch.rand(5, 3)})
    got, said = warnings_of(lambda: cache.cached("predictions", *inputs, compute, tmp_path))
    assert got is compute() and len(said) == 1 and f" in {tmp_path} (" in said[0] and "failed writing file" in said[0]
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_result_is_recomputed_and_rewritten(inputs, tmp_path):
    compute, calls = counting({"logits": torch.rand(5, 3)})
    cache.cached("predictions", *inputs, compute, tmp_path)
    (path,) = tmp_path.glob("predictions-*.pt")
    path.write_bytes(path.read_bytes()[:50])
    got = cache.cached("predictions", *inputs, compute, tmp_path)
    assert len(calls) == 2 and torch.equal(got["logits"], compute()["logits"])
    assert torch.equal(torch.load(path, weights_only=True)["logits"], got["logits"])


def test_a_damaged_result_in_a_read_only_folder_is_named(inputs, tmp_path, read_only):
    compute, calls = counting({"logits": torch.rand(5, 3)})
    cache.cached("predictions", *inputs, compute, tmp_path / "c")
    (path,) = (tmp_path / "c").glob("predictions-*.pt")
    path.write_bytes(b"not a torch file")
    read_only(path.parent)
    got, said = warnings_of(lambda: cache.cached("predictions", *inputs, compute, path.parent))
    assert torch.equal(got["logits"], compute()["logits"])
    assert len(said) == 1 and said[0].startswith(f"the cache file {path} is damaged or unreadable")
    found, said = warnings_of(lambda: cache.lookup("predictions", *inputs, path.parent))
    assert found is None and len(said) == 1 and said[0].startswith(f"the cache file {path} is damaged")


def test_predictions_in_a_read_only_cache_folder_are_returned(tmp_path, read_only):
    from helpers import data, evaluate, msdnet

    model = msdnet.build("tiny").eval()
    split = data.Split(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4))
    want = evaluate.predict(model, split, cache=False)
    folder = read_only(tmp_path / "ro")
    got, said = warnings_of(lambda: evaluate.predict(model, split, cache_dir=folder))
    assert torch.allclose(got.logits, want.logits) and len(said) == 1 and f" in {folder} (" in said[0]


# ----------------------------------------------------------------------------- a data folder that cannot be written


def test_a_read_only_data_folder_still_returns_the_data(tiny_folder, tmp_path, read_only):
    want = data.load("test", source=tiny_folder, data_dir=tmp_path / "writable")
    folder = read_only(tmp_path / "read-only")
    got, said = warnings_of(lambda: data.load("test", source=tiny_folder, data_dir=folder))
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert len(said) == 1 and f"could not write the cache cifar10-tiny-cifar-" in said[0]
    assert f"in {folder / 'cache'} (" in said[0] and "decoded again next time" in said[0] and "\n" not in said[0]


def test_a_damaged_cache_in_a_read_only_folder_is_named_and_the_data_returned(tiny_folder, tmp_path, read_only):
    want = data.load("test", source=tiny_folder, data_dir=tmp_path / "d")
    (cache,) = (tmp_path / "d" / "cache").glob("*.pt")
    cache.write_bytes(b"not a torch file")
    read_only(cache.parent)
    got, said = warnings_of(lambda: data.load("test", source=tiny_folder, data_dir=tmp_path / "d"))
    assert torch.equal(got.images, want.images)
    assert len(said) == 1 and said[0].startswith(f"the cache file {cache} is damaged or unreadable")
    assert "could not be removed" in said[0] and f"in {cache.parent} (" in said[0]


def test_a_read_only_folder_with_its_cache_loads_in_silence(tiny_folder, tmp_path, read_only):
    want = data.load("test", source=tiny_folder, data_dir=tmp_path / "d")
    read_only(tmp_path / "d" / "cache")
    got, said = warnings_of(lambda: data.load("test", source=tiny_folder, data_dir=tmp_path / "d"))
    assert torch.equal(got.images, want.images) and not said


def test_the_code_that_computed_a_result_is_part_of_its_name(inputs, tmp_path):
    import importlib.util

    def module(name: str, text: str):
        (tmp_path / f"{name}.py").write_text(text)
        spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m

    old, new = module("old_walk", "def walk(): return 1\n"), module("new_walk", "def walk(): return 2\n")
    compute, calls = counting({"logits": torch.rand(5, 3)})
    for code in ([old], [old], [new], [new]):
        cache.cached("predictions", *inputs, compute, tmp_path / "c", code=code)
    assert len(calls) == 2 and len(list((tmp_path / "c").glob("predictions-*.pt"))) == 2
    assert cache.code_version([old]) != cache.code_version([new]) == cache.code_version([new])


def test_a_stored_result_the_caller_does_not_expect_is_replaced_with_one_warning(inputs, tmp_path):
    compute, calls = counting({"logits": torch.rand(5, 3)})
    cache.store("predictions", *inputs, {"other": torch.ones(2)}, tmp_path)
    expect = lambda saved: None if "logits" in saved else f"keys {sorted(saved)}"  # noqa: E731
    got, said = warnings_of(lambda: cache.cached("predictions", *inputs, compute, tmp_path, expect=expect))
    assert calls == [1] and got is compute()
    assert len(said) == 1 and "holds something else (keys ['other'])" in said[0] and "\n" not in said[0]
    again, said = warnings_of(lambda: cache.cached("predictions", *inputs, compute, tmp_path, expect=expect))
    assert calls == [1, 1] and torch.equal(again["logits"], got["logits"]) and said == []  # replaced, then read
