"""Where a benchmark writes what it measured: docs/results/<script>.md, a page part that docs/benchmarks.md
includes, so each number on the site comes from the run that measured it.

    add_option(parser)                           # --results DIR ("" writes nothing)
    report = Report("early_exit", args.results)  # names the command line and the machine
    report.table(["batch", "images/s"], rows)    # a Markdown table
    report.text("One sentence under it.")
    report.write()                               # temporary name, then rename: never half a page
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from helpers import atomic

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def add_option(parser: argparse.ArgumentParser, default: str = str(RESULTS)) -> None:
    """The --results option every benchmark takes; `default` "" for a script the site does not show."""
    where = "docs/results" if default == str(RESULTS) else repr(default)
    parser.add_argument("--results", default=default, metavar="DIR",
                        help=f"folder for this run's Markdown page part (default: {where}); '' writes nothing")


def machine() -> str:
    """One line naming this machine's CPU, torch's threads and version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} torch thread{'s' if threads != 1 else ''}, torch {torch.__version__}"


class Report:
    """The Markdown page part of one benchmark run.

    Args:
        name: the script's name without `.py`; the page part is written to `folder / f"{name}.md"`.
        folder: where page parts go (docs/results by default); "" or None: nowhere.
    """

    def __init__(self, name: str, folder: str | Path | None = RESULTS) -> None:
        self.path = Path(folder) / f"{name}.md" if folder else None
        argv = sys.argv[1:]
        for i, a in enumerate(argv):  # where the page part went is not part of what was measured
            if a == "--results":
                argv = argv[:i] + argv[i + 2:]
                break
            if a.startswith("--results="):
                argv = argv[:i] + argv[i + 1:]
                break
        command = shlex.join(["python", f"benchmarks/{name}.py", *argv])
        setting = {k: v for k, v in os.environ.items()  # the variables that change what is measured
                   if k.startswith("MALLOC_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD")}
        env = "".join(f"{k}={shlex.quote(v)} " for k, v in sorted(setting.items()))
        self.parts = [f"Measured by `{env}{command}` on {machine()}."]

    def text(self, line: str) -> None:
        """A paragraph under the tables so far."""
        self.parts.append(line)

    def table(self, header: list[str], rows: list[list]) -> None:
        """A Markdown table: one header, rows of cells already formatted (str() is applied)."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.parts.append("\n".join(lines))

    def write(self) -> Path | None:
        """Writes the page part atomically, says where, and returns its path (None when it goes nowhere)."""
        if self.path is None:
            return None
        atomic.write_text(self.path, "\n\n".join(self.parts) + "\n")
        print(f"results written to {self.path}")
        return self.path
