"""The reusable code of the notebooks, one idea a module (see the README's Python block):

msdnet and layers (the model), data (CIFAR-10), pretrained (loading the shipped weights), cards (their
records), evaluate (every exit's predictions and their accuracy), policies (which exit an image leaves at),
earlyexit (the real early-exit runtime), gradcam (Grad-CAM and its relatives), analysis and faithfulness
(judging the maps), images (a person's picture as the model's input), viz (figures), explorer, turns and app
(the explorer); training: recipe (what a run computes), train (the loss, the step and the loop), state (what a
run saves), augment, schedule, averaging, distill, interrupts and runfolder its pieces, machine (devices,
shared with loading), export (a finished run into a card); cli (the `msdnet` command); checkpoint, atomic,
cache, checks and errors underneath.

`import helpers` alone is cheap: each module is imported the first time it is named
(helpers.msdnet), or with `from helpers import msdnet`.
"""
import importlib

__all__ = ["analysis", "app", "atomic", "augment", "averaging", "cache", "cards", "checkpoint", "checks", "cli",
           "data", "distill", "earlyexit", "errors", "evaluate", "explorer", "export", "faithfulness", "gradcam",
           "images", "interrupts", "layers", "machine", "msdnet", "policies", "pretrained", "recipe", "reference",
           "runfolder", "schedule", "state", "train", "turns", "viz"]


def __getattr__(name: str):
    if name in __all__:  # PEP 562: the submodule on first use, so `import helpers` does not pull in torch
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])  # tab completion lists the modules before their first use
