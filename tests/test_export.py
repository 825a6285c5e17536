"""Export: a run becomes half-precision weights, a card and a chained log, switched in whole or not at
all, only when shown better on validation, after checking everything it reads."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_class_folders

from helpers import checkpoint, data, export, msdnet, pretrained, train
from helpers.safeguards import hardware_name
from helpers.evaluate import exit_accuracies

ROOT = Path(__file__).resolve().parents[1]
TINY = pretrained.weights_name("tiny")  # the tests' runs train the tiny preset and export under its name
TINY_CARD = pretrained.card_path(TINY).name
TINY_LOG = pretrained.log_name("tiny")
SHIPPED = pretrained.PRETRAINED_DIR / pretrained.WEIGHTS_NAME


def tiny_args(out: Path, source: Path, *extra: str):
    """A few steps of the tiny preset on the tiny dataset (60 training images, 12 held out)."""
    return train.parse_args([
        "--preset", "tiny", "--source", str(source), "--out", str(out), "--val-size", "12", "--batch-size", "16",
        "--epochs", "1", "--lr", "0.05", "--schedule", "cosine", "--warmup-epochs", "0.5", "--label-smoothing", "0.1",
        "--weight-decay", "5e-4", *extra,
    ])  # fmt: skip


class Runs:
    """Tiny runs trained once per module, each copied into a test's folder on request."""

    def __init__(self, root: Path):
        self.root, self.source, self.done = root, write_class_folders(root / "tiny-cifar"), {}

    def get(self, name: str, *extra: str) -> Path:
        if name not in self.done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(data, "DATA_DIR", self.root / "data_dir")
                train.train(tiny_args(self.root / name, self.source, *extra))
            self.done[name] = self.root / name
        return self.done[name]

    def copy(self, name: str, to: Path, *extra: str) -> Path:
        return Path(shutil.copytree(self.get(name, *extra), to / name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"))


def files(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(".")] + [p.name for p in out.glob(".*")]


def assert_complete(out: Path, command: str) -> dict:
    """The card set in `out` is whole: the card's weights load with their SHA-256 checked, its log is there."""
    card = pretrained.read_card(out / TINY_CARD)
    assert card["training"]["command"] == command
    pretrained.load(out / TINY)
    assert len((out / card["training_log"]).read_text().splitlines()) == card["training"]["total_epochs"]
    return card


def test_export_writes_half_weights_a_card_and_a_log_that_load_back(tmp_path, runs):
    run = runs.get("two", "--epochs", "2")
    out = tmp_path / "shipped"
    card = export.export(run, out, command="python -m helpers.train ...", source=runs.source)
    assert card["format"] == pretrained.CARD_FORMAT and card["training_log"] == TINY_LOG
    assert card["training"]["hardware"] == hardware_name(torch.device("cpu"))  # as the run recorded it
    assert card["macs_per_exit_flip_tta"] == [2 * m for m in card["macs_per_exit"]]
    saved = torch.load(out / TINY, weights_only=True)
    assert saved["format"] == checkpoint.FORMAT
    assert all(v.dtype == torch.float16 for v in saved["model"].values() if v.is_floating_point())
    assert card["sha256"] == pretrained.sha256(out / TINY)
    # The weights of the epoch with the best mean validation accuracy over the exits (the first, on a tie).
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    means = [sum(r["acc"]) / len(r["acc"]) for r in records]
    chosen = 1 + means.index(max(means))
    assert card["training"]["epochs_done"] == card["training"]["total_epochs"] == chosen
    assert card["val_accuracy_per_exit"] == records[chosen - 1]["acc"] and card["training"]["weights"] == "trained"
    test = data.load("test", source=runs.source)
    assert card["test_images"] == len(test) and len(card["test_accuracy_per_exit"]) == 4
    assert exit_accuracies(pretrained.load(out / TINY), test) == pytest.approx(card["test_accuracy_per_exit"], abs=1e-4)
    assert len((out / TINY_LOG).read_text().splitlines()) == chosen  # the log ends at the shipped epoch
    assert sorted(os.listdir(out)) == sorted([TINY, TINY_CARD, TINY_LOG]) and leftovers(out) == []


def test_each_preset_has_a_card_of_its_own(tmp_path, runs, monkeypatch):
    """A run of another preset exports beside the default card, never over it, and load(preset=...) finds it."""
    out = tmp_path / "shipped"
    out.mkdir()
    for f in (SHIPPED, SHIPPED.with_suffix(".json"), SHIPPED.parent / pretrained.log_name()):
        shutil.copy(f, out / f.name)
    before = files(out)
    export.export(runs.get("one"), out, command="tiny", source=runs.source)
    assert {k: v for k, v in files(out).items() if k in before} == before
    assert sorted(os.listdir(out)) == sorted([*before, TINY, TINY_CARD, TINY_LOG])
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", out)
    assert pretrained.shipped_presets() == ["cifar10-anytime", "tiny"]
    assert pretrained.load(preset="tiny").config == msdnet.PRESETS["tiny"]
    assert pretrained.load().config == msdnet.PRESETS["cifar10-anytime"]


@pytest.mark.parametrize("flag, kind", [(("--swa",), "swa"), (("--ema", "0.5"), "ema")])
def test_the_card_says_which_average_its_weights_are(tmp_path, runs, flag, kind):
    run = runs.copy(kind, tmp_path, *flag)
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    (run / "log.jsonl").write_text(json.dumps({**record, "acc": [0.0] * len(record["acc"])}) + "\n")  # the average wins
    card = export.export(run, tmp_path / "out", command="c", source=runs.source)
    assert card["training"]["weights"] == kind and card["val_accuracy_per_exit"] == record["acc_average"]
    (run / "best.pt").unlink()  # without best.pt: last.pt's average, named the same way
    card = export.export(run, tmp_path / "out2", command="c", source=runs.source)
    assert card["training"]["weights"] == kind


def test_the_last_trained_weights_ship_when_they_beat_the_average_on_validation(tmp_path, runs):
    run = runs.copy("ema", tmp_path, "--ema", "0.5")
    log_path = run / "log.jsonl"
    record = json.loads(log_path.read_text().splitlines()[-1])
    log_path.write_text(json.dumps({**record, "acc": [1.0] * len(record["acc"])}) + "\n")
    card = export.export(run, tmp_path / "out", command="c", source=runs.source)
    assert card["training"]["weights"] == "trained" and card["val_accuracy_per_exit"] == [1.0] * len(record["acc"])
    last = checkpoint.read(run / "last.pt")
    for k, v in pretrained.load(tmp_path / "out" / TINY).state_dict().items():  # the trained weights, in half precision
        if v.is_floating_point():
            torch.testing.assert_close(v, last["model"][k].half().float())


def test_the_card_names_the_torch_that_trained_not_the_one_that_exported(tmp_path, runs):
    run = runs.copy("one", tmp_path)
    best = checkpoint.read(run / "best.pt")
    assert best["torch"] == torch.__version__
    checkpoint.write({**best, "torch": "2.11.0+cu130"}, run / "best.pt")  # as a GPU machine's run records it
    card = export.export(run, tmp_path / "shipped", command="...", source=runs.source)
    assert card["training"]["torch"] == "2.11.0+cu130"


def test_cycles_chain_to_the_card_they_started_from(tmp_path, runs):
    """A run started from exported weights chains to their card; exporting it twice (mid-way, then at the
    end) still chains to the card it started from, not to its own earlier export."""
    out = tmp_path / "shipped"
    first = export.export(runs.get("two", "--epochs", "2"), out, command="cycle 1", hardware="test", source=runs.source)
    assert export.init_record_of(out / TINY)["card"] == first
    train.train(tiny_args(tmp_path / "c2", runs.source, "--epochs", "2", "--init-from", str(out / TINY)))
    mid = export.export(tmp_path / "c2", out, command="cycle 2", source=runs.source, note="paused", allow_worse=True)
    final = export.export(tmp_path / "c2", out, command="cycle 2 again", source=runs.source, allow_worse=True)
    n1 = first["training"]["epochs_done"]
    for card in (mid, final):
        t = card["training"]
        assert t["started_from"]["command"] == "cycle 1" and t["init_from_sha256"] == first["sha256"]
        assert t["total_epochs"] == n1 + t["epochs_done"]
    assert mid["training"]["note"] == "paused" and "note" not in final["training"]
    log = [json.loads(line) for line in (out / TINY_LOG).read_text().splitlines()]
    n2 = final["training"]["epochs_done"]
    assert [(r["cycle"], r["epoch"], r["total_epoch"]) for r in log] == (
        [(1, e, e) for e in range(1, n1 + 1)] + [(2, e, n1 + e) for e in range(1, n2 + 1)])
    assert_complete(out, "cycle 2 again")


def test_init_record_of_reads_the_card_and_log_beside_weights(tmp_path):
    checkpoint.save(msdnet.build("tiny"), tmp_path / "mine.pt")
    assert export.init_record_of(tmp_path / "mine.pt") is None  # weights of one's own: no record
    (tmp_path / "mine.json").write_text('{"format": 1, "training_log": "log.jsonl"}')
    with pytest.raises(checkpoint.CheckpointError, match="mine.json is a card of format 1, these helpers read format 2 .*move it away"):
        export.init_record_of(tmp_path / "mine.pt")
    (tmp_path / "mine.json").write_text('{"format": 2, "training_log": "log.jsonl"}')
    with pytest.raises(checkpoint.CheckpointError, match="no log at .*log.jsonl"):
        export.init_record_of(tmp_path / "mine.pt")
    (tmp_path / "log.jsonl").write_text('{"epoch": 1}\n')
    assert export.init_record_of(tmp_path / "mine.pt")["log"] == [{"epoch": 1}]


# ----------------------------------------------------------------------------- only improves


def test_weights_worse_on_validation_than_the_cards_are_not_exported(tmp_path, runs):
    out = tmp_path / "shipped"
    export.export(runs.get("one"), out, command="first", source=runs.source)
    card = json.loads((out / TINY_CARD).read_text())
    (out / TINY_CARD).write_text(json.dumps({**card, "val_accuracy_per_exit": [1.0] * 4}))  # as if perfect
    before = files(out)
    with pytest.raises(checkpoint.CheckpointError, match="on validation .*: not exported. Train on, or pass --allow-worse"):
        export.export(runs.get("one"), out, command="second", source=runs.source)
    assert files(out) == before
    again = export.export(runs.get("one"), out, command="second", source=runs.source, allow_worse=True)
    assert again["training"]["command"] == "second"


def test_a_run_without_a_validation_score_never_replaces_a_card_unasked(tmp_path, runs):
    """--eval-split test: nothing shows the weights better, so a card is not replaced without --allow-worse."""
    out = tmp_path / "shipped"
    run = runs.get("test-split", "--eval-split", "test")
    first = export.export(run, out, command="first", source=runs.source)  # no card yet: nothing to compare
    assert first["val_accuracy_per_exit"] is None
    before = files(out)
    with pytest.raises(checkpoint.CheckpointError, match="has no validation score .*cannot be shown better .*not exported"):
        export.export(run, out, command="second", source=runs.source)
    assert files(out) == before
    export.export(runs.get("one"), tmp_path / "scored", command="scored", source=runs.source)
    shutil.copy(out / TINY_CARD, tmp_path / "scored" / TINY_CARD)  # a card without a score, weights with one
    with pytest.raises(checkpoint.CheckpointError, match="records no validation score to compare with: not exported"):
        export.export(runs.get("one"), tmp_path / "scored", command="x", source=runs.source)
    assert export.export(run, out, command="second", source=runs.source, allow_worse=True)["training"]["command"] == "second"


# ----------------------------------------------------------------------------- checks before any work


def test_a_run_without_its_log_fails_before_the_test_measurement(tmp_path, runs):
    run = runs.copy("one", tmp_path)
    (run / "log.jsonl").unlink()
    # the test split's source does not exist: an export that measured first would fail on it instead
    with pytest.raises(checkpoint.CheckpointError, match=r"no log at .*log.jsonl"):
        export.export(run, tmp_path / "out", command="x", source=tmp_path / "no-data")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, words", [
    ("log", r"log.jsonl, line 1, is not a JSON record \(cut short\?\)"),
    ("card", rf"{TINY_CARD} is not a valid card \(not JSON"),
    ("old card", rf"{TINY_CARD} is a card of format None, these helpers read format 2 only"),
    ("no run", r"no training run at .*nowhere: pass the --out folder of helpers.train"),
    ("empty run", r"holds neither best.pt nor last.pt"),
    ("old run", r"last.pt is a checkpoint of format 'msdnet-train/1', these helpers read format 2"),
    ("device", r"device 'cuda:99' is not on this machine"),
    ("unknown device", r"unknown device 'foo'"),
    ("out is a file", r"--out .*shipped is a file"),
])
def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, runs, capsys, damage, words):
    run, out = runs.copy("one", tmp_path), tmp_path / "shipped"
    export.export(run, out, command="first", source=runs.source)
    argv = ["--run", str(run), "--out", str(out), "--command", "x", "--source", str(runs.source), "--allow-worse"]
    if damage == "log":
        text = (run / "log.jsonl").read_text()
        (run / "log.jsonl").write_text(text[: len(text) // 2])
    elif damage in ("card", "old card"):
        (out / TINY_CARD).write_text("{broken" if damage == "card" else '{"val_accuracy_per_exit": [1, 1, 1, 1]}')
        argv.remove("--allow-worse")
    elif damage == "no run":
        argv[1] = str(tmp_path / "nowhere")
    elif damage == "empty run":
        (run / "best.pt").unlink()
        (run / "last.pt").unlink()
    elif damage == "old run":
        (run / "best.pt").unlink()
        torch.save({**torch.load(run / "last.pt", weights_only=True), "format": "msdnet-train/1"}, run / "last.pt")
    elif damage in ("device", "unknown device"):
        argv += ["--device", "cuda:99" if damage == "device" else "foo"]
    else:
        shutil.rmtree(out)
        out.write_text("")
    before = files(out) if out.is_dir() else None
    capsys.readouterr()
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(words, err), err
    assert (files(out) if out.is_dir() else None) == before


def test_a_read_only_out_folder_is_refused_before_any_work(tmp_path, runs, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: a read-only file system then
            locked = Path("/sys/msdnet-export")
            if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and not Path("/sys/kernel").is_dir():
                pytest.skip("no read-only folder to try")
        run = runs.get("one")
        capsys.readouterr()
        argv = ["--run", str(run), "--out", str(locked / "shipped"), "--command", "x",
                "--source", str(tmp_path / "no-data")]  # were the data read first, the error would be about them
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {locked / 'shipped'} is not writable (") and "choose another --out" in err
        assert err.count("\n") == 1
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_the_export_command_exits_with_its_message_alone(tmp_path):
    done = subprocess.run([sys.executable, "-m", "helpers.export", "--run", str(tmp_path / "nowhere"), "--command", "x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr.startswith("error: no training run at ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_run_stopped_mid_epoch_without_a_validated_epoch_is_not_exported(tmp_path, runs):
    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(tmp_path / "run", runs.source, "--eval-split", "test"), on_step=interrupt)
    (tmp_path / "run" / "log.jsonl").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="middle of epoch 1 .*finish the epoch with --resume"):
        export.export(tmp_path / "run", tmp_path / "shipped", command="x", source=runs.source)


def test_evaluate_takes_a_runs_best_weights(runs, capsys):
    best = runs.get("one") / "best.pt"
    assert pretrained.main(["evaluate", "--weights", str(best), "--source", str(runs.source)]) == 0
    assert capsys.readouterr().out.startswith("test accuracy per exit: B1=")


# ----------------------------------------------------------------------------- all or nothing


class Steps:
    """Within it, os.fsync and os.rename are counted, and the n-th raises before it runs."""

    def __init__(self, fail_at: int = 0):
        self.calls, self.fail_at, self.patch = [], fail_at, pytest.MonkeyPatch()

    def __enter__(self):
        for name in ("fsync", "rename"):
            self.patch.setattr(os, name, self.wrap(name, getattr(os, name)))
        return self

    def __exit__(self, *exc):
        self.patch.undo()

    def wrap(self, name, real):
        def step(*args):
            self.calls.append((name, *map(str, args)))
            if len(self.calls) == self.fail_at:
                raise OSError(f"injected failure at {name}")
            return real(*args)
        return step


def old_and_new(tmp_path, runs):
    """A folder holding a card set (and another preset's file); the old set's bytes."""
    out = tmp_path / "shipped"
    export.export(runs.get("one"), out, command="old", source=runs.source)
    (out / "other-preset.json").write_text("{}")
    return out, files(out)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_failure_at_any_step_leaves_the_old_set_or_the_new_one(tmp_path, runs, monkeypatch, exchange):
    if not exchange:  # a system without an atomic exchange of two folders: the two renames
        monkeypatch.setattr(sys, "platform", "unknown")
    new_run = runs.get("two", "--epochs", "2")
    out, old = old_and_new(tmp_path / "count", runs)
    with Steps() as counted:
        export.export(new_run, out, command="new", source=runs.source)
    assert len(counted.calls) == (5 if exchange else 7) and leftovers(out) == []
    outcomes = []
    for n in range(1, len(counted.calls) + 1):
        out, old = old_and_new(tmp_path / f"fail{n}", runs)
        with Steps(fail_at=n), pytest.raises(OSError, match="injected failure"):
            export.export(new_run, out, command="new", source=runs.source)
        if files(out) == old:
            outcomes.append("old")
        else:
            assert_complete(out, "new")
            assert (out / "other-preset.json").read_text() == "{}"
            outcomes.append("new")
        assert leftovers(out) == [], n
    assert outcomes == ["old"] * (len(counted.calls) - 1) + ["new"]  # the last step, the folder's fsync, follows the switch


KILLER = """
import os, signal, sys
from helpers import export
n, count = int(sys.argv[4]), [0]
def counted(real):
    def step(*args):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return step
os.fsync, os.rename = counted(os.fsync), counted(os.rename)
if sys.argv[5] == "two-renames":
    sys.platform = "unknown"
export.export(sys.argv[1], sys.argv[2], command="new", source=sys.argv[3])
"""


def kill_at(tmp_path, runs, step: int, path: str):
    out, old = old_and_new(tmp_path, runs)
    done = subprocess.run([sys.executable, "-c", KILLER, str(runs.get("two", "--epochs", "2")), str(out),
                           str(runs.source), str(step), path], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # the data cache old_and_new wrote: no write to count
    assert done.returncode == -signal.SIGKILL, done.stderr
    return out, old


@pytest.mark.parametrize("path, step, left", [
    ("two-renames", 6, None),  # after the old folder was moved aside, before the new one took its place
    ("exchange", 5, "new"),  # after the exchange, before the old folder was removed
    pytest.param("exchange", 2, "old", marks=pytest.mark.slow),  # weights written and measured, card not yet
])
def test_an_export_killed_mid_way_leaves_a_whole_set_and_the_next_one_tidies_up(tmp_path, runs, monkeypatch, path,
                                                                                 step, left):
    if path == "two-renames":
        monkeypatch.setattr(sys, "platform", "unknown")
    probe, _ = old_and_new(tmp_path / "probe", runs)
    new_run = runs.get("two", "--epochs", "2")  # trained (and its checkpoints written) before the counting starts
    with Steps() as counted:  # the step killed is the one the comment above says
        export.export(new_run, probe, command="new", source=runs.source)
    before = counted.calls[step - 2]
    assert before == (("rename", str(probe), str(probe.with_name(".shipped.old"))) if path == "two-renames"
                      else ("fsync",) + before[1:])
    out, old = kill_at(tmp_path / "killed", runs, step, path)
    if left == "old":
        assert files(out) == old
    elif left == "new":
        assert_complete(out, "new")
    else:  # the two renames' window, on systems without an exchange: the next export finishes the switch
        assert not out.exists() and files(out.with_name(".shipped.old")) == old
        assert_complete(out.with_name(".shipped.new"), "new")
    assert leftovers(out)  # what the killed export left beside the folder
    export.export(runs.get("one"), out, command="after", source=runs.source, allow_worse=True)
    assert_complete(out, "after")
    assert (out / "other-preset.json").read_text() == "{}" and leftovers(out) == []


def test_an_older_exports_staged_weights_are_removed(tmp_path, runs):
    out, _ = old_and_new(tmp_path, runs)
    (out / f".{TINY}.new").write_bytes(b"half a file")  # what a killed export of the past left
    export.export(runs.get("one"), out, command="again", source=runs.source)
    assert leftovers(out) == [] and (out / "other-preset.json").is_file()


def test_the_gpu_script_runs_on_a_cpu_and_its_weights_export(tmp_path):
    """tools/gpu_train.sh end to end, with the tiny preset for one epoch on the CPU (bf16 autocast and
    channels_last as on the GPU), then the export of the half-precision weights it brings back."""
    tiny_folder = write_class_folders(tmp_path / "tiny-cifar")
    out = tmp_path / "gpu"
    cmd = ["bash", str(ROOT / "tools" / "gpu_train.sh"), "--preset", "tiny", "--epochs", "1", "--device", "cpu",
           "--amp", "bf16", "--source", str(tiny_folder), "--val-size", "12", "--batch-size", "16"]
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (out / "export").iterdir()) == ["best.pt", "last.pt", "log.jsonl"]
    card = export.export(out / "export", tmp_path / "shipped", command="bash tools/gpu_train.sh", source=tiny_folder)
    # last.pt came back too, so the export can prefer the trained weights when they beat their average on validation.
    record = json.loads((out / "export" / "log.jsonl").read_text().splitlines()[-1])
    mean = lambda accs: sum(accs) / len(accs)
    assert card["training"]["weights"] == ("trained" if mean(record["acc"]) > mean(record["acc_average"]) else record["average"])
    assert card["training"]["amp"] == "bf16" and card["training"]["channels_last"]
    assert card["training"]["hardware"] == hardware_name(torch.device("cpu"))  # on CUDA: the GPU's name
    assert card["training"]["torch"] == torch.__version__  # recorded by the run: on a GPU machine, its own torch
    assert card["training"]["epochs_done"] == 1 and card["training"]["distill"] == 0.5
    assert card["training"]["trained_on"]["train_images"] == 48 and card["training"]["trained_on"]["source"] == str(tiny_folder)
    pretrained.load(tmp_path / "shipped" / TINY)
