"""The reusable code of the notebooks, one idea a module (see the README's Python block):

msdnet and layers (the model), pretrained (loading the shipped weights), export (a run into a shipped card), data (CIFAR-10), evaluate (every
exit's predictions and their accuracy), policies (which exit an image leaves at), earlyexit (the
real early-exit runtime), gradcam (Grad-CAM and its relatives), analysis and faithfulness (judging
the maps), images (a person's picture as the model's input), explorer (the app), train (the training
core and command; run, safeguards, schedule, averaging and distill are its pieces), checkpoint (saving
and reading weights).

`import helpers` alone is cheap: each module is imported the first time it is named
(helpers.msdnet), or with `from helpers import msdnet`.
"""
import importlib

__all__ = ["analysis", "app", "atomic", "averaging", "cache", "checkpoint", "data", "distill", "earlyexit", "evaluate",
           "explorer", "export", "faithfulness", "gradcam", "images", "layers", "msdnet", "policies", "pretrained",
           "reference", "run", "safeguards", "schedule", "train", "viz"]


def __getattr__(name: str):
    if name in __all__:  # PEP 562: the submodule on first use, so `import helpers` does not pull in torch
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])  # tab completion lists the modules before their first use
