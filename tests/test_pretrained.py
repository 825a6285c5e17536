"""The shipped checkpoint: it loads offline after its SHA-256 check, refuses damage clearly, and its
card's numbers are the ones a rerun measures; export turns a run into such a checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny_args

from helpers import checkpoint, data, msdnet, pretrained, train

SHIPPED = pretrained.PRETRAINED_DIR / pretrained.WEIGHTS_NAME
TINY = pretrained.weights_name("tiny")  # the tests' runs train the tiny preset, and export under its name
TINY_LOG = "msdnet-tiny-training-log.jsonl"
CARD = json.loads(SHIPPED.with_suffix(".json").read_text())


def test_shipped_weights_load_as_the_paper_model_in_eval_mode():
    model = pretrained.load()
    assert not model.training
    assert model.config == msdnet.build("cifar10-anytime").config
    assert sum(p.numel() for p in model.parameters()) == 4_839_544
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = model(torch.rand(2, 3, 32, 32))
    assert len(logits) == 10 and logits[0].shape == (2, 10)


def test_shipped_files_fit_the_size_budget_and_match_their_card():
    total = sum(f.stat().st_size for f in pretrained.PRETRAINED_DIR.iterdir() if f.is_file())
    cards = pretrained.shipped_presets()
    assert cards[0] == "cifar10-anytime" and len(cards) <= 2  # the paper's model, and at most a second (the blog's)
    assert total <= 12 * 1024 * 1024 * len(cards)
    assert CARD["sha256"] == pretrained.sha256(SHIPPED) and CARD["file_bytes"] == SHIPPED.stat().st_size
    log = [json.loads(line) for line in (pretrained.PRETRAINED_DIR / "training-log.jsonl").read_text().splitlines()]
    assert len(log) == CARD["training"]["total_epochs"]
    # half precision moved no exit's test accuracy by 0.1 point or more
    assert max(abs(a - b) for a, b in zip(CARD["test_accuracy_per_exit"], CARD["test_accuracy_per_exit_float32"])) < 0.001


def copy_shipped(tmp_path):
    for f in (SHIPPED, SHIPPED.with_suffix(".json")):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / SHIPPED.name


def test_each_preset_has_a_card_of_its_own(tmp_path, tiny_folder, monkeypatch):
    """A run of another preset exports beside the default card, never over it, and load(preset=...) finds it."""
    out = tmp_path / "shipped"
    out.mkdir()
    copy_shipped(out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))
    card = pretrained.export(tmp_path / "run", out, command="tiny", source=tiny_folder)
    assert card["weights"] == TINY and card["preset"] == "tiny" and card["training_log"] == TINY_LOG
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.name in before} == before
    assert sorted(f.name for f in out.iterdir()) == sorted([*before, TINY, "msdnet-tiny.json", TINY_LOG])
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", out)
    assert pretrained.shipped_presets() == ["cifar10-anytime", "tiny"]
    assert pretrained.load(preset="tiny").config == msdnet.PRESETS["tiny"]
    assert pretrained.load().config == msdnet.PRESETS["cifar10-anytime"]
    with pytest.raises(checkpoint.CheckpointError, match="no weights are shipped for the preset 'seed' "
                                                         r"\(shipped: cifar10-anytime, tiny\); train them"):
        pretrained.load(preset="seed")
    with pytest.raises(ValueError, match="unknown preset 'seeds'; choose one of"):
        pretrained.load(preset="seeds")
    for preset in ("tiny", "cifar10-anytime"):
        with pytest.raises(ValueError, match="either path .* or preset"):
            pretrained.load(out / TINY, preset=preset)
    with pytest.raises(SystemExit):  # on the command line too: argparse says the two flags exclude each other
        pretrained.main(["evaluate", "--weights", str(out / TINY), "--preset", "tiny"])
    names = [pretrained.weights_name(p) for p in msdnet.PRESETS] + [pretrained._log_name(p) for p in msdnet.PRESETS]
    assert len(set(names)) == 2 * len(msdnet.PRESETS)  # no preset's card could overwrite another's
    shutil.copy(SHIPPED, out / TINY)  # the paper's weights under the tiny card's name, their card with them
    shutil.copy(SHIPPED.with_suffix(".json"), out / "msdnet-tiny.json")
    with pytest.raises(checkpoint.CheckpointError, match="holds another model than the preset 'tiny'"):
        pretrained.load(preset="tiny")


def test_a_changed_byte_fails_the_sha256_check(tmp_path):
    weights = copy_shipped(tmp_path)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(raw)
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        pretrained.load(weights)


def test_a_truncated_file_without_a_card_is_refused_as_unreadable(tmp_path):
    weights = copy_shipped(tmp_path)
    weights.with_suffix(".json").unlink()
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        pretrained.load(weights, verify=False)


@pytest.mark.parametrize("card, words", [
    (None, "no card msdnet-cifar10-anytime.json beside"),
    ("{not json", "not a valid card"),
    ("[1, 2]", "not a valid card"),
    ('{"weights": "msdnet-cifar10-anytime.pt"}', "records no sha256"),
])
def test_weights_whose_card_is_missing_or_broken_are_not_loaded_unchecked(tmp_path, card, words):
    weights = copy_shipped(tmp_path)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # damaged: without the check it would load with one weight changed
    weights.write_bytes(raw)
    if card is None:
        weights.with_suffix(".json").unlink()
    else:
        weights.with_suffix(".json").write_text(card)
    with pytest.raises(checkpoint.CheckpointError, match=words):
        pretrained.load(weights)


def test_missing_weights_say_how_to_restore_them(tmp_path, monkeypatch):
    with pytest.raises(checkpoint.CheckpointError, match="no weights at .*nothing.pt: check the path"):
        pretrained.load(tmp_path / "nothing.pt")
    with pytest.raises(checkpoint.CheckpointError, match="is a folder: pass the weights file in it"):
        pretrained.load(tmp_path)
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)  # a shipped file lost: git brings it back
    with pytest.raises(checkpoint.CheckpointError, match="restore them with `git checkout -- "):
        pretrained.load()
    (tmp_path / pretrained.WEIGHTS_NAME).symlink_to(tmp_path / "annex" / "not-pulled")  # a dangling link, as git-annex leaves
    with pytest.raises(checkpoint.CheckpointError, match="restore them with `git checkout -- "):
        pretrained.load()
    with pytest.raises(checkpoint.CheckpointError, match="restore them with `git checkout -- "):
        pretrained.load(tmp_path / pretrained.WEIGHTS_NAME)


def test_weights_of_your_own_save_and_load_and_a_bare_state_dict_is_explained(tmp_path):
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    checkpoint.save(model, tmp_path / "mine.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"no card mine.json .* pretrained.load\(path, verify=False\)"):
        pretrained.load(tmp_path / "mine.pt")
    loaded = pretrained.load(tmp_path / "mine.pt", verify=False)
    x = torch.rand(2, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), model(x)))
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(checkpoint.CheckpointError, match="bare state dict, without the config.* checkpoint.save"):
        pretrained.load(tmp_path / "bare.pt", verify=False)


def test_weights_whose_config_was_edited_are_refused(tmp_path):
    ckpt = checkpoint.read(SHIPPED)
    ckpt["config"]["growth_rate"] = 8
    weights = tmp_path / "edited.pt"
    torch.save(ckpt, weights)
    with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
        pretrained.load(weights, verify=False)


def test_export_writes_half_weights_a_card_and_a_log_that_load_back(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "2"))
    out = tmp_path / "shipped"
    card = pretrained.export(tmp_path / "run", out, command="python -m helpers.train ...", source=tiny_folder)
    assert card["training"]["hardware"] == train.hardware_name(torch.device("cpu"))  # as the run recorded it
    assert card["macs_per_exit_flip_tta"] == [2 * m for m in card["macs_per_exit"]]
    saved = torch.load(out / TINY, weights_only=True)
    assert all(v.dtype == torch.float16 for v in saved["model"].values() if v.is_floating_point())
    assert card["sha256"] == pretrained.sha256(out / TINY)
    # The weights of the epoch with the best mean validation accuracy over the exits (the first, on a tie).
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    means = [sum(r["acc"]) / len(r["acc"]) for r in records]
    chosen = 1 + means.index(max(means))
    assert card["training"]["epochs_done"] == card["training"]["total_epochs"] == chosen
    assert card["val_accuracy_per_exit"] == records[chosen - 1]["acc"] and card["training"]["weights"] == "trained"
    assert card["test_images"] == len(data.load("test", source=tiny_folder))
    assert len(card["test_accuracy_per_exit"]) == 4 and card["macs_per_exit"] == sorted(card["macs_per_exit"])
    model = pretrained.load(out / TINY)
    assert train.exit_accuracies(model, data.load("test", source=tiny_folder)) == pytest.approx(
        card["test_accuracy_per_exit"], abs=1e-4)
    assert not list(out.glob(".*"))  # no staged or temporary file left behind


def test_the_card_names_the_torch_that_trained_not_the_one_that_exported(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["torch"] == torch.__version__
    best["torch"] = "2.11.0+cu130"  # as a GPU machine's run records it
    torch.save(best, tmp_path / "run" / "best.pt")
    card = pretrained.export(tmp_path / "run", tmp_path / "shipped", command="...", source=tiny_folder)
    assert card["training"]["torch"] == "2.11.0+cu130"


def test_a_second_cycle_keeps_the_first_cycles_record(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "c1", tiny_folder, "--epochs", "2"))
    out = tmp_path / "shipped"
    first = pretrained.export(tmp_path / "c1", out, command="cycle 1", hardware="test", source=tiny_folder)
    weights = out / TINY
    train.train(tiny_args(tmp_path / "c2", tiny_folder, "--epochs", "1", "--init-from", str(weights)))
    second = pretrained.export(tmp_path / "c2", out, command="cycle 2", hardware="test", source=tiny_folder,
                               note="paused twice", allow_worse=True)
    t = second["training"]
    assert t["command"] == "cycle 2" and t["started_from"]["command"] == "cycle 1"
    assert t["note"] == "paused twice" and "note" not in t["started_from"]
    assert t["init_from_sha256"] == first["sha256"] != second["sha256"]
    assert t["total_epochs"] == first["training"]["epochs_done"] + t["epochs_done"]
    log = [json.loads(line) for line in (out / TINY_LOG).read_text().splitlines()]
    n1, n2 = first["training"]["epochs_done"], t["epochs_done"]  # each cycle's log ends at its shipped epoch
    assert [(r["cycle"], r["epoch"], r["total_epoch"]) for r in log] == (
        [(1, e, e) for e in range(1, n1 + 1)] + [(2, e, n1 + e) for e in range(1, n2 + 1)])
    pretrained.load(weights)  # the new card's SHA-256 matches the new weights


def test_weights_worse_on_validation_than_the_shipped_ones_are_not_exported(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1", "--ema", "0.5"))
    out = tmp_path / "shipped"
    pretrained.export(tmp_path / "run", out, command="first", hardware="test", source=tiny_folder)
    card_path = out / "msdnet-tiny.json"
    card = json.loads(card_path.read_text())
    card["val_accuracy_per_exit"] = [1.0] * 4  # as if the shipped weights were perfect
    card_path.write_text(json.dumps(card))
    before = (out / TINY).read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="not exported"):
        pretrained.export(tmp_path / "run", out, command="second", hardware="test", source=tiny_folder)
    assert (out / TINY).read_bytes() == before and json.loads(card_path.read_text()) == card
    again = pretrained.export(tmp_path / "run", out, command="second", hardware="test", source=tiny_folder,
                              allow_worse=True)
    assert again["training"]["command"] == "second"


def test_the_last_trained_weights_ship_when_they_beat_the_moving_average_on_validation(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1", "--ema", "0.5"))
    log_path = tmp_path / "run" / "log.jsonl"
    record = json.loads(log_path.read_text().splitlines()[-1])
    best = checkpoint.read(tmp_path / "run" / "best.pt")
    assert best["weights"] == "ema" and best["val_accuracy_per_exit"] == record["acc_ema"]
    for trained_acc, shipped in ((0.0, "ema"), (1.0, "trained")):  # the trained weights worse, then better
        log_path.write_text(json.dumps({**record, "acc": [trained_acc] * len(record["acc"])}) + "\n")
        card = pretrained.export(tmp_path / "run", tmp_path / f"out-{shipped}", command="c", hardware="test",
                                 source=tiny_folder)
        assert card["training"]["weights"] == shipped
        assert card["val_accuracy_per_exit"] == (record["acc_ema"] if shipped == "ema" else [1.0] * len(record["acc"]))
    last = checkpoint.read(tmp_path / "run" / "last.pt")
    shipped_model = pretrained.load(tmp_path / "out-trained" / TINY)
    for k, v in shipped_model.state_dict().items():  # the trained weights, not the average (to half precision)
        if v.is_floating_point():
            torch.testing.assert_close(v, last["model"][k].half().float())


@pytest.mark.slow
def test_the_cards_test_accuracy_is_what_evaluate_measures(real_cifar, capsys):
    test = real_cifar("test")
    assert len(test) == CARD["test_images"] == 10_000
    measured = train.exit_accuracies(pretrained.load(), test)
    assert measured == pytest.approx(CARD["test_accuracy_per_exit"], abs=1e-4)


def test_the_gpu_script_runs_on_a_cpu_and_its_weights_export(tmp_path, tiny_folder):
    """tools/gpu_train.sh end to end, with the tiny preset for one epoch on the CPU (bf16 autocast and
    channels_last as on the GPU), then `pretrained export` of the half-precision weights it brings back."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu"
    cmd = ["bash", str(root / "tools" / "gpu_train.sh"), "--preset", "tiny", "--epochs", "1", "--device", "cpu",
           "--amp", "bf16", "--source", str(tiny_folder), "--val-size", "12", "--batch-size", "16"]
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in (out / "export").iterdir()) == ["best.pt", "last.pt", "log.jsonl"]
    card = pretrained.export(out / "export", tmp_path / "shipped", command="bash tools/gpu_train.sh", source=tiny_folder)
    # last.pt came back too, so the export can prefer the trained weights when they beat their average on validation.
    record = json.loads((out / "export" / "log.jsonl").read_text().splitlines()[-1])
    mean = lambda accs: sum(accs) / len(accs)
    assert card["training"]["weights"] == ("trained" if mean(record["acc"]) > mean(record["acc_ema"]) else "ema")
    assert card["training"]["amp"] == "bf16" and card["training"]["channels_last"]
    assert card["training"]["hardware"] == train.hardware_name(torch.device("cpu"))  # on CUDA: the GPU's name
    assert card["training"]["torch"] == torch.__version__  # recorded by the run: on a GPU machine, its own torch
    assert card["training"]["epochs_done"] == 1 and card["training"]["distill"] == 0.5
    assert card["training"]["trained_on"]["train_images"] == 48 and card["training"]["trained_on"]["source"] == str(tiny_folder)
    pretrained.load(tmp_path / "shipped" / TINY)


def test_an_export_that_fails_leaves_nothing_behind(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))
    out = tmp_path / "shipped"
    with pytest.raises(data.DataNotFoundError):
        pretrained.export(tmp_path / "run", out, command="x", source=tmp_path / "no-data")
    assert list(out.iterdir()) == []


def test_a_run_stopped_mid_epoch_without_a_validated_epoch_is_not_exported(tmp_path, tiny_folder):
    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(tmp_path / "run", tiny_folder, "--eval-split", "test"), on_step=interrupt)
    with pytest.raises(checkpoint.CheckpointError, match="middle of epoch 1 .*finish the epoch with --resume"):
        pretrained.export(tmp_path / "run", tmp_path / "shipped", command="x", source=tiny_folder)


def test_the_shipped_log_ends_at_the_epoch_whose_weights_are_shipped(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "4", "--lr", "0.1"))
    card = pretrained.export(tmp_path / "run", tmp_path / "shipped", command="x", source=tiny_folder)
    log = (tmp_path / "shipped" / TINY_LOG).read_text().splitlines()
    assert len(log) == card["training"]["epochs_done"] == card["training"]["total_epochs"]


def test_evaluate_reports_bad_data_in_one_line(tmp_path, tiny_folder, capsys):
    (tiny_folder / "test" / "unicorn").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tiny_folder / "test" / "unicorn" / "0.png")
    assert pretrained.main(["evaluate", "--source", str(tiny_folder)]) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in err and "unicorn is not a CIFAR-10 class" in err and "Traceback" not in err


def test_exporting_a_run_twice_chains_to_the_weights_it_started_from(tmp_path, tiny_folder):
    """A long run exported mid-way replaces the shipped card; its final export must still chain to the
    card of the weights it started from (recorded when it started), not to its own earlier export."""
    train.train(tiny_args(tmp_path / "c1", tiny_folder, "--epochs", "1"))
    out = tmp_path / "shipped"
    first = pretrained.export(tmp_path / "c1", out, command="cycle 1", source=tiny_folder)
    train.train(tiny_args(tmp_path / "long", tiny_folder, "--epochs", "2", "--init-from", str(out / TINY)))
    mid = pretrained.export(tmp_path / "long", out, command="long, mid-way", source=tiny_folder, allow_worse=True)
    final = pretrained.export(tmp_path / "long", out, command="long, final", source=tiny_folder, allow_worse=True)
    for card in (mid, final):
        assert card["training"]["started_from"]["command"] == "cycle 1"
        assert card["training"]["init_from_sha256"] == first["sha256"]
        assert card["training"]["total_epochs"] == first["training"]["epochs_done"] + card["training"]["epochs_done"]
    log = [json.loads(line) for line in (out / TINY_LOG).read_text().splitlines()]
    assert [r["cycle"] for r in log].count(1) == first["training"]["epochs_done"]
