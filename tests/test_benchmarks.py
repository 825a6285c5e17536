"""The benchmark scripts, as a user runs them: what goes wrong on the user's side ends in one message."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["early_exit.py", "gradcam.py", "explorer.py", "train_speed.py",
                                    "checkpoint_averages.py HEAD"])
def test_a_missing_dataset_ends_the_benchmark_with_the_message_alone(tmp_path, script):
    env = {**os.environ, "CIFAR10_SOURCE": str(tmp_path / "no-such-cifar.tar.gz"), "OMP_NUM_THREADS": "1"}
    script, *args = script.split()
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: CIFAR-10 could not be loaded: the source " in done.stderr  # a library's warning may come first
    assert "no-such-cifar.tar.gz does not exist" in done.stderr and "CIFAR10_SOURCE=PATH" in done.stderr
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
