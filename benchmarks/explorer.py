"""How fast the explorer opens and answers its controls, with the shipped model on this machine.

    python benchmarks/explorer.py

1. A fresh clone (an empty data/ folder): `explorer.explore(pretrained.load())`, the time to its first
   image, then every control moved while the background predicts the split (the goal: each answers
   within 150 ms), then the time until every image is predicted.
2. Opening again once the caches exist.
3. Moves of the exit and image sliders with every prediction known (the goal: 200 ms).
A control's answer is the wall time of setting its value, as the kernel does for a move in the browser:
waiting for the model's turn (at most one background chunk) and the redraw.
The tables are also written to docs/results/explorer.md, which the site's Benchmarks page includes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import data, evaluate, explorer, pretrained


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:.0f} ms, slowest {max(xs) * 1000:.0f} ms"


def ms_cells(what: str, xs: list[float], goal: float) -> list[str]:
    """A table row: what moved, how many moves, median and slowest in ms, the goal and whether all met it."""
    return [what, str(len(xs)), f"{statistics.median(xs) * 1000:.0f}", f"{max(xs) * 1000:.0f}",
            f"{goal * 1000:.0f}", "yes" if max(xs) <= goal else "no"]


def moves(app: explorer.Explorer, rounds: int) -> list[tuple]:
    """(widget, value) pairs: every control, `rounds` times, each to a new value."""
    out = []
    for r in range(rounds):
        out += [(app.image, 1 + 37 * (r + 1)), (app.exit, f"B{1 + (3 * r) % app.n_exits}"),
                (app.method, ["gradcam++", "layercam", "gradcam"][r % 3]), (app.target, ["true", "predicted"][r % 2]),
                (app.class_filter, data.CLASSES[r % 10]), (app.difficulty_filter, f"{app.n_exits - r % 3}/{app.n_exits}"),
                (app.correct_filter, ["right", "any"][r % 2]), (app.difficulty_filter, "any"),
                (app.class_filter, "all"), (app.alpha, 0.3 + 0.1 * (r % 5)), (app.image, 1 + 11 * (r + 1))]
    return out


def answers_while_predicting(app: explorer.Explorer, rounds: int) -> tuple[list[float], int]:
    """The wall time of each move, made at a person's pace, and the moves made before the background ended."""
    times, during = [], 0
    for widget, value in moves(app, rounds):
        time.sleep(0.1)
        predicting = not app.known.all()
        start = time.perf_counter()
        widget.value = value
        times.append(time.perf_counter() - start)
        during += predicting
    return times, during


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10, help="images to visit with every prediction known")
    p.add_argument("--rounds", type=int, default=5, help="rounds of moves of every control while predicting")
    p.add_argument("--subset", type=int, default=None, help="explore this many test images (default: all 10,000)")
    _report.add_option(p)
    args = p.parse_args()
    split = lambda: data.load("test") if args.subset is None else data.subset(data.load("test"), args.subset)  # noqa: E731
    home = data.DATA_DIR
    with tempfile.TemporaryDirectory() as empty:
        data.DATA_DIR = Path(empty)  # a fresh clone: nothing decoded, nothing predicted
        start = time.perf_counter()
        app = explorer.Explorer(pretrained.load(), split(), split_name="test").start()  # what explore() does
        opened = time.perf_counter() - start
        while not len(app.indices):
            time.sleep(0.005)
        first = time.perf_counter() - start
        answers, during = answers_while_predicting(app, args.rounds)
        app.wait()  # the rest, stored in the cache for next time
        total = time.perf_counter() - start
        start = time.perf_counter()
        explorer.Explorer(pretrained.load(), split(), split_name="test").start()
        warm = time.perf_counter() - start
        data.DATA_DIR = home
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(app.split):,} test images")
    print(f"fresh clone: opened in {opened:.1f} s (decoding included), first image after {first:.1f} s, "
          f"every image predicted after {total:.1f} s")
    print(f"controls while the background predicts ({during} of {len(answers)} moves before it ended): {ms(answers)}; "
          f"every answer within 150 ms: {'yes' if max(answers) <= 0.15 else 'no'}")
    print(f"opening once the caches exist: {warm:.1f} s")
    model = pretrained.load()
    test = split()
    app = explorer.Explorer(model, test, evaluate.predict(model, test)).start()
    exit_moves, image_moves = [], []
    for i in range(1, args.images + 1):
        app.image.value = i * 37
        image_moves.append(app.last_redraw_s)
        for name in app.exit.options:
            app.exit.value = name
            exit_moves.append(app.last_redraw_s)
    print(f"exit slider, {len(exit_moves)} moves:  {ms(exit_moves)}")
    print(f"image slider, {len(image_moves)} moves: {ms(image_moves)} (computes the new image's ten maps)")
    worst = max(exit_moves + image_moves)
    print(f"every redraw within 200 ms: {'yes' if worst <= 0.2 else 'no'}")
    report = _report.Report("explorer", args.results)
    report.text(f"Opening the explorer on {len(app.split):,} test images, from a fresh clone (an empty data/ folder) "
                "and again once the caches exist.")
    report.table(["opening", "time, s"],
                 [["fresh clone: opened (decoding included)", f"{opened:.1f}"],
                  ["fresh clone: first image", f"{first:.1f}"],
                  ["fresh clone: every image predicted", f"{total:.1f}"],
                  ["again, with the caches", f"{warm:.1f}"]])
    report.text("Each control's answer: the wall time of setting its value, as the kernel does for a move in the "
                f"browser; while the background predicts, every control moved at a person's pace ({during} of "
                f"{len(answers)} moves before it ended); then the sliders with every prediction known.")
    report.table(["moves", "count", "median, ms", "slowest, ms", "goal, ms", "all within the goal"],
                 [ms_cells("every control, while the background predicts", answers, 0.15),
                  ms_cells("exit slider, every prediction known", exit_moves, 0.2),
                  ms_cells("image slider (the new image's ten maps), every prediction known", image_moves, 0.2)])
    report.write()


if __name__ == "__main__":
    _errors.run(main)
