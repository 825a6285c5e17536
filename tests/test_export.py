"""Export: a finished run becomes half-precision weights, a card and its log, written together, only when
shown better on validation; the card names one command from random weights."""
import json
import multiprocessing
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import write_class_folders

from helpers import atomic, cards, checkpoint, data, export, pretrained, train
from helpers.evaluate import exit_accuracies
from helpers.recipe import RECIPES, Recipe

WEIGHTS, CARD, LOG = cards.weights_name("tiny"), cards.card_path(cards.weights_name("tiny")).name, cards.log_name("tiny")
TINY = replace(RECIPES["laptop"], preset="tiny", epochs=2, batch_size=16, val_size=12, warmup_epochs=0.5,
               ema_decay=0.5)


class Runs:
    """Tiny runs trained once per module, each copied into a test's folder on request."""

    def __init__(self, root: Path):
        self.root, self.source, self.done = root, write_class_folders(root / "tiny-cifar"), {}

    def get(self, name: str, recipe: Recipe = TINY, **kw) -> Path:
        if name not in self.done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(data, "DATA_DIR", self.root / "data_dir")
                try:
                    train.train(recipe, self.root / name, source=str(self.source), progress_bar=False, **kw)
                except KeyboardInterrupt:
                    pass
            self.done[name] = self.root / name
        return self.done[name]

    def copy(self, name: str, to: Path, recipe: Recipe = TINY) -> Path:
        return Path(shutil.copytree(self.get(name, recipe), to / name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"))


def test_export_writes_half_weights_a_card_and_the_log_that_load_back(tmp_path, runs):
    run, out = runs.get("two"), tmp_path / "shipped"
    card = export.export(run, out, source=runs.source, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, CARD, LOG])
    assert cards.read_card(out / CARD) == card and card["training_log"] == LOG
    model = pretrained.load(out / WEIGHTS)  # the card's SHA-256 checked
    assert {v.dtype for v in checkpoint.read(out / WEIGHTS)["model"].values() if v.is_floating_point()} == {torch.float16}
    test = data.load("test", runs.source)
    assert [round(a, 4) for a in exit_accuracies(model, test)] == card["test_accuracy_per_exit"]
    # One command from random weights, the recipe it stands for, the hardware, time and speed of the run.
    training = card["training"]
    assert training["init_from"] is None and training["recipe"] == TINY.to_dict()
    assert training["command"] == ("msdnet train --recipe laptop --preset tiny --epochs 2 --batch-size 16 "
                                   "--warmup-epochs 0.5 --ema-decay 0.5 --val-size 12")
    log = cards.read_log(out / LOG)
    assert [r["epoch"] for r in log] == [1, 2] and log == cards.read_log(run / "log.jsonl")
    assert training["train_images_per_s"] > 0 and training["wall_time_s"] >= training["train_time_s"] >= 0
    assert training["hardware"] == [log[0]["hardware"]] and "CPU" in log[0]["hardware"]
    assert card["val_accuracy_per_exit"] in ([r["acc_average"] for r in log] + [r["acc"] for r in log])


def test_the_command_a_card_records_trains_the_same_recipe():
    from helpers import cli

    named = {n: r.to_dict() for n, r in RECIPES.items()}
    for recipe in (RECIPES["laptop"], replace(RECIPES["paper"], epochs=10, cutout=8), TINY):
        command = cards.command_for(recipe.to_dict(), named)
        args = cli.parser().parse_args(command.split()[1:])
        assert cli.recipe_of(args) == recipe, command
    assert cards.command_for(RECIPES["laptop"].to_dict(), named) == "msdnet train --recipe laptop"


def test_an_unfinished_run_is_not_exported(tmp_path, runs):
    def stop(step):
        if step == 4:
            raise KeyboardInterrupt

    run = runs.get("stopped", on_step=stop)
    with pytest.raises(checkpoint.CheckpointError, match=r"has run 1 of its 2 epochs: go on with the command"):
        export.export(run, tmp_path / "out", source=runs.source)
    assert not (tmp_path / "out").exists()


def test_weights_worse_on_validation_than_the_cards_are_not_exported(tmp_path, runs):
    out = tmp_path / "shipped"
    export.export(runs.get("two"), out, source=runs.source)
    card = json.loads((out / CARD).read_text())
    card["val_accuracy_per_exit"] = [1.0] * 4  # as if the shipped weights were perfect on validation
    (out / CARD).write_text(json.dumps(card))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(checkpoint.CheckpointError, match="not exported; train on, pass --allow-worse"):
        export.export(runs.get("two"), out, source=runs.source)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    export.export(runs.get("two"), out, source=runs.source, allow_worse=True)
    assert cards.read_card(out / CARD)["val_accuracy_per_exit"] != [1.0] * 4


def test_the_last_trained_weights_ship_when_they_beat_the_average_on_validation(tmp_path, runs):
    run = runs.copy("two", tmp_path)
    lines = cards.read_log(run / "log.jsonl")
    lines[-1]["acc"] = [1.0] * 4  # the trained weights of the last epoch beat every average
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    card = export.export(run, tmp_path / "out", source=runs.source)
    assert card["training"]["weights"] == "trained" and card["training"]["chosen_epoch"] == 2
    state = checkpoint.read(run / "last.pt")["model"]
    shipped = checkpoint.read(tmp_path / "out" / WEIGHTS)["model"]
    assert all(torch.equal(shipped[k], v.half() if v.is_floating_point() else v) for k, v in state.items())


def test_other_files_in_the_folder_of_cards_stay(tmp_path, runs):
    out = tmp_path / "shipped"
    out.mkdir()
    (out / "msdnet-seed.json").write_text("another preset's card")
    export.export(runs.get("two"), out, source=runs.source)
    assert (out / "msdnet-seed.json").read_text() == "another preset's card"


def _export_in_a_process(run: str, out: str, source: str, data_dir: str) -> None:
    data.DATA_DIR = Path(data_dir)
    torch.set_num_threads(1)
    export.export(run, out, source=source, allow_worse=True)


def test_two_exports_into_one_folder_at_once_end_with_one_whole_set(tmp_path, runs):
    """Two processes export two runs into one folder at the same moment: they take turns, and the folder
    ends with one run's weights under that run's own card."""
    a, b = runs.get("two"), runs.get("other", replace(TINY, seed=1))
    out = tmp_path / "shipped"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_export_in_a_process, args=(str(r), str(out), str(runs.source), str(tmp_path / "dd")))
             for r in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    card = cards.read_card(out / CARD)
    pretrained.load(out / WEIGHTS)  # the weights are the card's
    mine = [r for r in (a, b) if cards.read_log(r / "log.jsonl") == cards.read_log(out / LOG)]
    assert len(mine) == 1 and card["training"]["recipe"]["seed"] == (0 if mine[0] == a else 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shipped.") and "lock" not in p.name) == []


def test_a_killed_writers_leftovers_are_tidied_and_a_half_switch_undone(tmp_path):
    out = tmp_path / "cards"
    atomic.replace_files(out, {"a": b"1", "b": b"1"})
    os.rename(out, tmp_path / ".cards.old123-dead")  # killed between its two renames: no folder, the old set aside
    (tmp_path / ".cards.new123-dead").mkdir()  # and its staged set
    atomic.replace_files(out, {"a": b"2"})
    assert {f.name: f.read_bytes() for f in out.iterdir()} == {"a": b"2", "b": b"1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cards.lock", "cards"]


def test_a_folder_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="could not write .*a-file"):
        atomic.replace_files(tmp_path / "a-file" / "cards", {"a": b"1"})
