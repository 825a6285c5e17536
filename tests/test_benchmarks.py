"""The benchmark scripts, as a user runs them: what goes wrong on the user's side ends in one message."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.slow  # each runs a benchmark script in a process of its own: the slow lane


@pytest.mark.parametrize("script", ["early_exit.py", "gradcam.py", "explorer.py", "train_speed.py",
                                    "checkpoint_averages.py HEAD", "compare_checkpoints.py HEAD HEAD"])
def test_a_missing_dataset_ends_the_benchmark_with_the_message_alone(tmp_path, script):
    env = {**os.environ, "CIFAR10_SOURCE": str(tmp_path / "no-such-cifar.tar.gz"), "OMP_NUM_THREADS": "1"}
    script, *args = script.split()
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: CIFAR-10 could not be loaded: the source " in done.stderr  # a library's warning may come first
    assert "no-such-cifar.tar.gz does not exist" in done.stderr and "environment variable CIFAR10_SOURCE" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_early_exit_benchmark_takes_a_number_or_auto_as_its_margin_of_safety(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "early_exit.py"), "--safety", "two"], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--safety must be a number or auto, got 'two'" in done.stderr


def test_a_checkpoint_that_is_neither_a_file_nor_a_commit_is_named(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "checkpoint_averages.py"), "no-such-commit"], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error: 'no-such-commit' is neither a weights file nor a commit" in done.stderr
    assert "Traceback" not in done.stderr


def test_compare_checkpoints_gives_the_known_paired_differences(tmp_path, real_cifar):
    """The shipped weights against themselves: every difference exactly 0. Against a copy whose first
    classifier has zero weights (it then answers its bias's class for every image): B1 scores that
    class's share of the images, B1's difference is that minus the shipped B1, CONTRADICTED; B2 on
    is untouched."""
    import torch
    from helpers import data, pretrained
    shipped = pretrained.PRETRAINED_DIR / "msdnet-cifar10-anytime.pt"
    broken = torch.load(shipped, weights_only=True)
    broken["model"]["classifiers.0.linear.weight"].zero_()
    torch.save(broken, tmp_path / "broken.pt")
    one_class = int(broken["model"]["classifiers.0.linear.bias"].float().argmax())
    share = round((data.subset(real_cifar("test"), 200).labels == one_class).double().mean().item() * 100, 2)
    env = {**os.environ, "CIFAR10_SOURCE": str(real_cifar.source), "MSDNET_DATA_DIR": str(real_cifar.data_dir),
           "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, str(BENCHMARKS / "compare_checkpoints.py"), *a, "--images", "200",
                                     "--results", ""],
                                    env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    same = run(str(shipped), str(shipped))
    assert same.returncode == 0, same.stderr
    rows = [line for line in same.stdout.splitlines() if line.startswith("B")]
    assert len(rows) == 10 and all("+0.00 [+0.00, +0.00]  NOT SUPPORTED" in r for r in rows), same.stdout
    worse = run(str(shipped), "broken.pt")
    assert worse.returncode == 0, worse.stderr
    b1 = next(line for line in worse.stdout.splitlines() if line.startswith("B1 ")).split()
    assert float(b1[2]) == share and float(b1[3]) == round(share - float(b1[1]), 2) and b1[-1] == "CONTRADICTED", worse.stdout
    b2 = next(line for line in worse.stdout.splitlines() if line.startswith("B2 "))
    assert "+0.00 [+0.00, +0.00]" in b2
