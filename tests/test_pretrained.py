"""The shipped checkpoint: it loads offline after its SHA-256 check, refuses damage and older formats
clearly, and its card's numbers are the ones a rerun measures."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cards, checkpoint, machine, msdnet, pretrained

SHIPPED = pretrained.PRETRAINED_DIR / cards.WEIGHTS_NAME
CARD = json.loads(SHIPPED.with_suffix(".json").read_text())
ROOT = Path(__file__).resolve().parents[1]


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
    presets = cards.shipped_presets()
    assert presets[0] == "cifar10-anytime" and len(presets) <= 2  # the paper's model, and at most a second (the blog's)
    assert total <= 12 * 1024 * 1024 * len(presets)
    assert CARD["format"] == cards.CARD_FORMAT and checkpoint.read(SHIPPED)["format"] == checkpoint.FORMAT
    assert CARD["sha256"] == cards.sha256(SHIPPED) and CARD["file_bytes"] == SHIPPED.stat().st_size
    assert CARD["training_log"] == cards.log_name()
    log = [json.loads(line) for line in (pretrained.PRETRAINED_DIR / CARD["training_log"]).read_text().splitlines()]
    assert len(log) == CARD["training"]["total_epochs"]
    # half precision moved no exit's test accuracy by 0.1 point or more
    assert max(abs(a - b) for a, b in zip(CARD["test_accuracy_per_exit"], CARD["test_accuracy_per_exit_float32"])) < 0.001


def test_the_shipped_cards_weights_say_which_average_they_hold():
    training = CARD["training"]
    assert training["swa"] and not training["ema"] and training["weights"] == "swa"


def test_loading_imports_nothing_of_training():
    code = ("import sys; from helpers import pretrained; pretrained.load(); "
            "print([m for m in ('helpers.train', 'helpers.export', 'helpers.augment', 'helpers.state', 'helpers.recipe') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_names_of_presets_files_never_collide():
    names = [cards.weights_name(p) for p in msdnet.PRESETS] + [cards.log_name(p) for p in msdnet.PRESETS]
    names += [cards.card_path(cards.weights_name(p)).name for p in msdnet.PRESETS]
    assert len(set(names)) == 3 * len(msdnet.PRESETS)


def copy_shipped(tmp_path):
    for f in (SHIPPED, SHIPPED.with_suffix(".json")):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / SHIPPED.name


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
    ("{not json", "msdnet-cifar10-anytime.json is not a valid card"),
    ("[1, 2]", "msdnet-cifar10-anytime.json is not a valid card"),
    ('{"weights": "msdnet-cifar10-anytime.pt", "sha256": "00"}', "a card of format None, these helpers read format 2"),
    ('{"format": 2, "weights": "msdnet-cifar10-anytime.pt"}', "records no sha256"),
])
def test_weights_whose_card_is_missing_broken_or_older_are_not_loaded(tmp_path, card, words):
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


def test_a_checkpoint_of_an_older_format_is_refused_and_upgrade_converts_its_weights(tmp_path):
    old = {**torch.load(SHIPPED, weights_only=True), "format": "msdnet-weights/1"}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"old.pt is a checkpoint of format 'msdnet-weights/1', these helpers read format 2 only\. "
                             r"Weights: convert them with `msdnet checkpoint upgrade --weights "):
        pretrained.load(tmp_path / "old.pt", verify=False)
    del old["format"]
    torch.save(old, tmp_path / "older.pt")
    with pytest.raises(checkpoint.CheckpointError, match="format None"):
        checkpoint.read(tmp_path / "older.pt")
    from helpers import cli

    assert cli.main(["checkpoint", "upgrade", "--weights", str(tmp_path / "older.pt"), "--out", str(tmp_path / "new.pt")]) == 0
    new, shipped = pretrained.load(tmp_path / "new.pt", verify=False), pretrained.load()
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), shipped.state_dict().values()))


def test_a_checkpoint_holds_tensors_and_plain_types_only(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['where'\] is a PosixPath|checkpoint\['where'\] is a WindowsPath"):
        checkpoint.write({"config": {}, "model": {}, "where": tmp_path}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_missing_weights_say_how_to_restore_them(tmp_path, monkeypatch):
    with pytest.raises(checkpoint.CheckpointError, match="no weights at .*nothing.pt: check the path"):
        pretrained.load(tmp_path / "nothing.pt")
    with pytest.raises(checkpoint.CheckpointError, match="is a folder: pass the weights file in it"):
        pretrained.load(tmp_path)
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setattr(cards, "PRETRAINED_DIR", tmp_path)  # a shipped file lost: git brings it back
    with pytest.raises(checkpoint.CheckpointError, match="restore them with `git checkout -- "):
        pretrained.load()
    (tmp_path / cards.WEIGHTS_NAME).symlink_to(tmp_path / "annex" / "not-pulled")  # a dangling link, as git-annex leaves
    with pytest.raises(checkpoint.CheckpointError, match="restore them with `git checkout -- "):
        pretrained.load()
    with pytest.raises(checkpoint.CheckpointError, match="restore them with `git checkout -- "):
        pretrained.load(tmp_path / cards.WEIGHTS_NAME)


def test_a_preset_without_shipped_weights_is_named(monkeypatch):
    with pytest.raises(checkpoint.CheckpointError, match=r"no weights are shipped for the preset 'seed' "
                                                         r"\(shipped: cifar10-anytime\); train them"):
        pretrained.load(preset="seed")
    with pytest.raises(ValueError, match="unknown preset 'seeds'; choose one of"):
        pretrained.load(preset="seeds")
    with pytest.raises(ValueError, match="either path .* or preset"):
        pretrained.load(SHIPPED, preset="cifar10-anytime")


def test_weights_of_another_preset_under_a_cards_name_are_refused(tmp_path, monkeypatch):
    checkpoint.save(msdnet.build("tiny"), tmp_path / cards.WEIGHTS_NAME)
    card = {**CARD, "sha256": cards.sha256(tmp_path / cards.WEIGHTS_NAME)}
    (tmp_path / "msdnet-cifar10-anytime.json").write_text(json.dumps(card))
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setattr(cards, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="holds another model than the preset 'cifar10-anytime'"):
        pretrained.load()


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


def test_a_device_this_machine_lacks_is_named_with_those_it_has():
    with pytest.raises(ValueError, match=r"unknown device 'foo': use one of cpu"):
        pretrained.load(device="foo")
    with pytest.raises(ValueError, match=r"device 'cuda:99' is not on this machine \(it has \d+ CUDA GPUs?\): use one of cpu"):
        pretrained.load(device="cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not on this machine \(it has 0 CUDA GPUs\)"):
            pretrained.load(device="cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"device 'mps' is not on this machine \(it has no Apple GPU"):
            pretrained.load(device="mps")
    assert machine.check_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_the_cards_test_accuracy_is_what_evaluate_measures(real_cifar):
    from helpers.evaluate import exit_accuracies

    test = real_cifar("test")
    assert len(test) == CARD["test_images"] == 10_000
    measured = exit_accuracies(pretrained.load(), test)
    assert measured == pytest.approx(CARD["test_accuracy_per_exit"], abs=1e-4)


