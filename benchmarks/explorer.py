"""How fast the explorer opens and answers a slider move, with the shipped model on this CPU.

    CIFAR10_SOURCE=../shared/data/cifar10-jpeg.tar.gz python benchmarks/explorer.py

Opening: `explorer.explore(pretrained.load())` as on a fresh clone (an empty data/ folder: the data is
decoded, the first images predicted, the rest predicted in the background), then again once the
caches exist (the goals: 30 s and 5 s).

Moves the exit slider over all exits on several images, and the image slider, as a user would,
and prints the redraw times (the goal: within 200 ms). The first view of an image computes the
maps of all ten exits (one trunk pass); moving the exit slider then redraws from them.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
from helpers import data, evaluate, explorer, pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10, help="images to visit")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as empty:
        data.DATA_DIR = Path(empty)  # a fresh clone: nothing decoded, nothing predicted
        start = time.perf_counter()
        app = explorer.Explorer(pretrained.load(), data.load("test"))  # what explorer.explore(...) does
        fresh = time.perf_counter() - start
        app.wait()  # the background predictions, stored in the cache for next time
        start = time.perf_counter()
        explorer.Explorer(pretrained.load(), data.load("test"))
        warm = time.perf_counter() - start
    print(f"opening: {fresh:.1f} s on a fresh clone (decoding included), {warm:.1f} s once the caches exist")
    model = pretrained.load()
    test = data.load("test")
    app = explorer.Explorer(model, test, evaluate.predict(model, test))
    exit_moves, image_moves = [], []
    for i in range(1, args.images + 1):
        app.image.value = i * 37
        image_moves.append(app.last_redraw_s)
        for name in app.exit.options:
            app.exit.value = name
            exit_moves.append(app.last_redraw_s)
    ms = lambda xs: f"median {statistics.median(xs) * 1000:.0f} ms, slowest {max(xs) * 1000:.0f} ms"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"exit slider, {len(exit_moves)} moves:  {ms(exit_moves)}")
    print(f"image slider, {len(image_moves)} moves: {ms(image_moves)} (computes the new image's ten maps)")
    worst = max(exit_moves + image_moves)
    print(f"every redraw within 200 ms: {'yes' if worst <= 0.2 else 'no'}")


if __name__ == "__main__":
    _errors.run(main)
