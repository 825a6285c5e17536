"""The one command line, ``msdnet`` (or ``python -m helpers``): train, evaluate, export, checkpoint, app.

Options mean one thing in every command: ``--device`` the device (default: auto, CUDA when there is
one), ``--weights`` a weights file read, ``--out`` what is written, ``--source`` where CIFAR-10 is.
Accuracy prints as ``B1=86.20 ... B10=90.01`` (percent). A failure is one line on stderr, ending in what
to do, with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

from .errors import OneLineError

__all__ = ["main", "parser", "recipe_of"]

_EXAMPLES = {
    "train": "msdnet train --recipe laptop --compile         # the shipped checkpoint's run; again to go on after a stop",
    "evaluate": "msdnet evaluate                                # the shipped checkpoint on the test split",
    "export": "msdnet export --run runs/laptop                # its chosen weights into data/pretrained/",
    "checkpoint": "msdnet checkpoint compact --weights runs/laptop/last.pt --out small.pt",
    "app": "msdnet app                                     # the explorer as a web page",
}


def _add_common(p: argparse.ArgumentParser, device: bool = True, source: bool = True) -> None:
    if device:
        p.add_argument("--device", default="auto", help="auto (default: CUDA when there is one, else the CPU), cpu, "
                                                        "cuda, cuda:N or mps")
    if source:
        p.add_argument("--source", default=None, help="CIFAR-10: a folder or .tar.gz of train/<class>/* and "
                                                      "test/<class>/* (default: $CIFAR10_SOURCE, else torchvision's download)")


def _sub(subs, name: str, help: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help, description=help, epilog=f"example:\n  {_EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)


def parser() -> argparse.ArgumentParser:
    """The parser of ``msdnet``, every command with its options."""
    from .recipe import RECIPES, Recipe

    p = argparse.ArgumentParser(prog="msdnet", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + "\n".join(f"  {e}" for e in _EXAMPLES.values()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = _sub(subs, "train", "train MSD-Net on CIFAR-10 from random weights, or go on with the run in --out")
    t.add_argument("--recipe", default="laptop", choices=sorted(RECIPES),
                   help="the settings to start from (default: laptop, the shipped checkpoint's)")
    t.add_argument("--out", type=Path, default=None, help="the run's folder (default: runs/<recipe>)")
    t.add_argument("--compile", action="store_true", help="torch.compile the training step (faster after minutes "
                                                          "of compiling; needs a C++ compiler on a CPU)")
    t.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast (auto: bf16 or fp16 on a GPU, float32 elsewhere)")
    t.add_argument("--channels-last", action="store_true", help="the channels_last memory layout")
    t.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    t.add_argument("--time-limit", type=float, default=0.0, metavar="SECONDS",
                   help="stop (saved, resumable) after this much time in this process")
    _add_common(t)
    r = t.add_argument_group("recipe settings (override the recipe's; a run goes on only with the same ones)")
    for f in fields(Recipe):
        kind = {"int": int, "float": float, "str": str}[f.type]
        r.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, metavar=f.type.upper())

    e = _sub(subs, "evaluate", "every exit's accuracy on the test split, of the shipped checkpoint or of --weights")
    e.add_argument("--weights", type=Path, default=None, help="a weights file (a run's best.pt, say); default: the "
                                                              "shipped checkpoint")
    e.add_argument("--flip", action="store_true", help="also with flip test-time augmentation (twice the cost)")
    _add_common(e)

    x = _sub(subs, "export", "measure a finished run's chosen weights and write them, their card and log")
    x.add_argument("--run", type=Path, required=True, help="the run's folder (msdnet train's --out)")
    x.add_argument("--out", type=Path, default=None, help="the folder of cards (default: data/pretrained)")
    x.add_argument("--allow-worse", action="store_true", help="replace a card whose weights score higher on validation")
    _add_common(x)

    c = _sub(subs, "checkpoint", "checkpoint tools: compact (half precision, no optimizer) or upgrade (an older format)")
    c.add_argument("action", choices=("compact", "upgrade"))
    c.add_argument("--weights", type=Path, required=True, help="the checkpoint to read")
    c.add_argument("--out", type=Path, required=True, help="the file to write (not --weights itself)")

    a = _sub(subs, "app", "serve the explorer as a web page (Voila), until Ctrl-C")
    a.add_argument("--port", type=int, default=0, help="the port (default: a free one)")
    a.add_argument("--no-browser", action="store_true", help="do not open a browser")
    return p


def recipe_of(args: argparse.Namespace):
    """The recipe ``msdnet train`` runs: the named ``--recipe`` with the settings given on the line."""
    from .recipe import RECIPES

    settings = {f.name: getattr(args, f.name) for f in fields(RECIPES[args.recipe]) if getattr(args, f.name) is not None}
    return replace(RECIPES[args.recipe], **settings)


def _train(args: argparse.Namespace) -> int:
    import torch

    from . import train
    from .evaluate import accuracy_line
    from .interrupts import TimeUp

    recipe = recipe_of(args)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.time_limit < 0:
        raise ValueError(f"--time-limit must be >= 0 seconds (0: none), got {args.time_limit:g}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / args.recipe
    try:
        record = train.train(recipe, out, device=args.device, source=args.source, amp=args.amp,
                             channels_last=args.channels_last, compile=args.compile, time_limit=args.time_limit)
    except TimeUp:
        print(f"--time-limit {args.time_limit:g} s reached: run the same command to go on", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 130
    if record.get("acc"):
        print(f"done: {out}; validation {accuracy_line(record.get('acc_average', record['acc']))}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import cards, data, evaluate, pretrained
    from .evaluate import accuracy_line

    uncarded = args.weights is not None and not cards.card_path(args.weights).is_file() and not cards.is_shipped(args.weights)
    model = pretrained.load(args.weights, device=args.device, verify=not uncarded)
    if uncarded:
        print(f"{args.weights} has no card beside it: evaluated without a SHA-256 check", file=sys.stderr)
    test = data.load("test", args.source)
    print(f"test accuracy per exit: {accuracy_line(evaluate.exit_accuracies(model, test, progress='test split'))}")
    if args.flip:
        flipped = evaluate.exit_accuracies(model, test, flip=True, progress="test split, flipped too")
        print(f"with flip TTA (2x MACs): {accuracy_line(flipped)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from . import export, pretrained
    from .evaluate import accuracy_line

    out = args.out or pretrained.PRETRAINED_DIR
    card = export.export(args.run, out, source=args.source, allow_worse=args.allow_worse,
                         device=args.device)
    print(f"wrote {Path(out) / card['weights']}, its card and {card['training_log']}")
    print(f"test accuracy per exit: {accuracy_line(card['test_accuracy_per_exit'])}")
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    from . import checkpoint

    (checkpoint.compact if args.action == "compact" else checkpoint.upgrade)(args.weights, args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB")
    return 0


def _app(args: argparse.Namespace) -> int:
    from . import app

    voila = [*([f"--port={args.port}"] if args.port else []), *(["--no-browser"] if args.no_browser else [])]
    return app.main(voila)


USER_ERRORS = (OneLineError, ValueError, OSError)
"""The errors a user can fix (the project's own, bad values, files and disks), shown as their one line."""


def _message(e: BaseException) -> str:
    """An error as one line: an OSError without its "[Errno N]" prefix, naming its file."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """``msdnet``: 0 when done, 2 with one line on stderr for what the user can fix, 130 when stopped."""
    args = parser().parse_args(argv)
    run = {"train": _train, "evaluate": _evaluate, "export": _export, "checkpoint": _checkpoint, "app": _app}
    try:
        return run[args.command](args)
    except USER_ERRORS as e:
        print(f"msdnet {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
