"""The one command line, `msdnet`, run as a user runs it: every command's help has an example, every failure is
one line on stderr ending in what to do, with exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import checkpoint, cli, msdnet

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "evaluate", "export", "checkpoint", "app")


def msdnet_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`msdnet ARGS` through the console script the package installs (beside this Python)."""
    script = Path(sys.executable).with_name("msdnet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


def one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"msdnet {command}: error: "), err
    return err


def test_the_console_script_and_python_m_helpers_are_one_command():
    via_module = subprocess.run([sys.executable, "-m", "helpers", "--help"], capture_output=True, text=True, timeout=120)
    via_script = msdnet_script("--help")
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    assert all(c in via_script.stdout for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_commands_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and f"example:\n  msdnet {command}" in out
    if command != "checkpoint":
        assert "--device" in out or command == "app"


def test_device_means_one_thing_with_one_default_everywhere():
    p = cli.parser()
    for command in ("train", "evaluate", "export"):
        args = p.parse_args([command, *(["--run", "x"] if command == "export" else [])])
        assert args.device == "auto"


@pytest.mark.parametrize("command, extra", [("train", ["--preset", "tiny"]), ("evaluate", []), ("export", ["--run", "x"])])
def test_a_device_this_machine_lacks_is_one_line_naming_those_it_has(tmp_path, command, extra):
    if torch.cuda.device_count() > 99:
        pytest.skip("this machine has a 100th GPU")
    done = msdnet_script(command, *extra, "--device", "cuda:99", "--source", str(tmp_path / "none"),
                         *(["--out", str(tmp_path / "run")] if command == "train" else []))
    err = one_line_error(done, command)
    assert "device 'cuda:99' is not on this machine" in err and "use one of cpu" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_without_data_says_how_to_provide_it_in_one_line(tmp_path):
    err = one_line_error(msdnet_script("train", "--preset", "tiny", "--source", str(tmp_path / "none"), "--out",
                                       str(tmp_path / "run")), "train")
    assert "CIFAR-10 could not be loaded" in err and "--source" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "epochs must be at least 1, got 0"),
    (["--schedule", "linear"], "schedule must be one of paper, cosine, constant, got 'linear'"),
    (["--cutout", "64"], "cutout must be 0 (off) to 31 pixels"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_bad_training_settings_are_one_line(tmp_path, flags, words, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msdnet train: error: ") and words in err and err.count("\n") == 1


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path, tiny_folder, capsys):
    (tmp_path / "a-file").write_text("")
    assert cli.main(["train", "--preset", "tiny", "--val-size", "12", "--batch-size", "16", "--source",
                     str(tiny_folder), "--out", str(tmp_path / "a-file" / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"msdnet train: error: cannot write to {tmp_path / 'a-file' / 'run'}") and err.count("\n") == 1


def test_train_runs_a_recipe_and_goes_on_with_the_same_command(tmp_path, tiny_folder, capsys):
    argv = ["train", "--recipe", "laptop", "--preset", "tiny", "--epochs", "2", "--batch-size", "16",
            "--val-size", "12", "--source", str(tiny_folder), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert cli.main([*argv, "--time-limit", "1e-9"]) == 0
    assert "--time-limit 1e-09 s reached: run the same command to go on" in capsys.readouterr().err
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "done: " in out and "validation B1=" in out
    assert cli.main([*argv[:-4], "--out", str(tmp_path / "run"), "--lr", "0.5"]) == 2
    assert "is a run of another recipe (lr: 0.1 -> 0.5)" in capsys.readouterr().err


def test_evaluate_prints_accuracy_the_one_way_and_names_weights_without_a_card(tmp_path, tiny_folder, capsys):
    checkpoint.save(msdnet.build("tiny"), tmp_path / "best.pt")
    assert cli.main(["evaluate", "--weights", str(tmp_path / "best.pt"), "--source", str(tiny_folder)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("test accuracy per exit: B1=") and "B4=" in out and "%" not in out
    assert "best.pt has no card beside it: evaluated without a SHA-256 check" in err
    assert "test split: " in err  # a progress bar while it measures, never a silent minute
    (tmp_path / "best.json").write_text("{}")  # a card beside the weights is checked
    assert cli.main(["evaluate", "--weights", str(tmp_path / "best.pt"), "--source", str(tiny_folder)]) == 2
    assert "best.json is a card of format None" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "--weights", "nowhere.pt"], "no weights at nowhere.pt: check the path"),
    (["export", "--run", "nowhere"], "no training run at nowhere: pass the --out folder of `msdnet train`"),
    (["checkpoint", "compact", "--weights", "nowhere.pt", "--out", "small.pt"], "no checkpoint at nowhere.pt"),
])
def test_missing_inputs_are_named_in_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"msdnet {argv[0]}: error: {words}\n"


def test_checkpoint_compact_never_replaces_its_own_source(tmp_path, capsys):
    checkpoint.save(msdnet.build("tiny"), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()
    assert cli.main(["checkpoint", "compact", "--weights", str(tmp_path / "last.pt"), "--out",
                     str(tmp_path / "." / "last.pt")]) == 2
    assert "would replace" in capsys.readouterr().err and (tmp_path / "last.pt").read_bytes() == before
    assert cli.main(["checkpoint", "compact", "--weights", str(tmp_path / "last.pt"), "--out", str(tmp_path / "s.pt")]) == 0
    assert checkpoint.read(tmp_path / "s.pt")["model"]["classifiers.0.linear.weight"].dtype == torch.float16


def test_every_msdnet_command_the_readme_and_the_site_show_parses():
    """A command quoted in the README, the site or a notebook is one the parser takes as written."""
    import re

    generated = {ROOT / "docs" / "README.md"}  # the site's copy of the README, written by its build
    texts = [ROOT / "README.md", *(set((ROOT / "docs").glob("*.md")) - generated), *(ROOT / "notebooks").glob("*.ipynb")]
    found = []
    for path in texts:
        for line in re.findall(r"(?:^|`|\n)\s*(msdnet [^`\n#]+)", path.read_text()):
            words = line.replace("\\n", " ").replace('\\"', "").split()
            if any(w in ("COMMAND", "...") or w.startswith("<") for w in words):
                continue  # a pattern, not a command
            found.append(words)
            try:
                cli.parser().parse_args(words[1:])
            except SystemExit as e:
                if e.code != 0:  # --help exits with 0
                    pytest.fail(f"{path.name}: `{' '.join(words)}` is not a command msdnet takes")
    assert len(found) >= 5


def test_a_full_disk_at_an_epochs_end_is_one_line_and_the_last_good_state_stays(tmp_path, tiny_folder, monkeypatch,
                                                                                  capsys):
    from helpers import cards

    real, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):  # the second state write (epoch 2's) finds the disk full
        if ".last.pt.tmp" in str(f):
            saves.append(f)
            if len(saves) == 2:
                Path(f).write_bytes(b"half")
                raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                                   "file data/3: file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["train", "--preset", "tiny", "--epochs", "2", "--batch-size", "16", "--val-size", "12", "--source",
            str(tiny_folder), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()  # after the data's progress bar
    errors = [line for line in lines if line.startswith("msdnet train: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1]
    assert errors[0].startswith(f"msdnet train: error: could not write {tmp_path / 'run' / 'last.pt'}: the disk "
                                "may be full") and errors[0].endswith("free some space")
    assert checkpoint.read(tmp_path / "run" / "last.pt")["progress"]["epoch"] == 1  # the last good state
    assert [p.name for p in (tmp_path / "run").iterdir() if ".tmp" in p.name] == []
    monkeypatch.setattr(torch, "save", real)
    assert cli.main(argv) == 0  # room again: the same command goes on
    assert [r["epoch"] for r in cards.read_log(tmp_path / "run" / "log.jsonl")] == [1, 2]


def test_weights_that_are_no_checkpoint_are_one_line(tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not weights")
    assert cli.main(["evaluate", "--weights", str(tmp_path / "notes.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"msdnet evaluate: error: {tmp_path / 'notes.pt'} is not a readable checkpoint")
    assert err.count("\n") == 1 and "weights_only" not in err
    card = tmp_path / "msdnet-cifar10-anytime.json"
    card.write_text("{}")
    assert cli.main(["evaluate", "--weights", str(card)]) == 2
    assert "is a card, not weights: pass the .pt file beside it" in capsys.readouterr().err
