"""The predictions of every exit for a split, and the metrics read off them.

    preds = predict(model, "test")         # .logits [N, exits, classes], .labels [N]; cached on disk
    predict(model, "test", flip=True)      # test-time augmentation: image and mirror, logits averaged
    accuracy_with_ci(preds.correct)        # per exit, with a 95% Wilson interval
    class_exit_accuracy(preds)             # [classes, exits]
    difficulty(preds)                      # per image: how many exits are right (the blog's "k/10")

Exit policies (which exit an image leaves at) live in `policies`, the real early-exit runtime in
`earlyexit`. Predictions are cached under data/cache/, keyed by a hash of the weights, the images and
the code that computed them.
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checks, data, layers, msdnet
from .cache import cached, lookup, store
from .errors import InputError, InputTypeError

__all__ = [
    "SCORES",
    "scores",
    "Predictions",
    "exit_logits",
    "exit_accuracies",
    "predict",
    "check_predictions",
    "cached_predictions",
    "store_predictions",
    "accuracy_with_ci",
    "class_exit_accuracy",
    "difficulty",
    "right_then_wrong",
    "accuracy_line",
]

SCORES = ("confidence", "margin", "entropy")

# The code that computes predictions: a change to any of it names the cache files anew.
_CODE = (msdnet, layers, sys.modules[__name__])


def scores(logits: Tensor, kind: str = "confidence") -> Tensor:
    """How sure a classifier is, from its logits; higher is surer.

    Args:
        logits: [..., classes], any float dtype.
        kind: "confidence" (top softmax probability, in [0, 1]), "margin" (top two probabilities' gap,
            in [0, 1]) or "entropy" (minus the softmax's entropy, <= 0).
    Returns:
        [...], in float32, or float64 for float64 logits.
    """
    if kind not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {kind!r}")
    checks.tensor(logits, "logits", "float [..., classes]")
    if not logits.is_floating_point() or logits.dim() == 0:
        raise InputError(f"logits must be float [..., classes], got {logits.dtype} {list(logits.shape)}")
    p = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # half precision: in float32
    if kind == "confidence":
        return p.amax(-1)
    if kind == "margin":
        top2 = p.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (p * p.clamp(min=1e-12).log()).sum(-1)


class Predictions(NamedTuple):
    """Every exit's logits for every image of a split, and the true labels.

    Fields:
        logits: float32 [N, exits, classes].
        labels: int64 [N].
    """

    logits: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_exits(self) -> int:
        return self.logits.shape[1]

    @property
    def predicted(self) -> Tensor:
        """[N, exits]: each exit's predicted class."""
        return self.logits.argmax(-1)

    @property
    def correct(self) -> Tensor:
        """[N, exits] bool: is each exit right about each image."""
        return self.predicted == self.labels[:, None]

    @property
    def confidence(self) -> Tensor:
        """[N, exits] in [0, 1]: the top softmax probability, scores(logits, "confidence")."""
        return scores(self.logits, "confidence")

    def scores(self, kind: str = "confidence") -> Tensor:
        """[N, exits]: how sure each exit is, by one of SCORES (see evaluate.scores)."""
        return scores(self.logits, kind)


def _check_not_empty(n: int, what: str) -> None:
    if n == 0:
        raise InputError(f"{what} holds no images; pass at least one (a data.Split or images [N, 3, 32, 32] with N >= 1)")


def check_predictions(preds, what: str = "preds") -> Predictions:
    """`preds` itself when it is Predictions with logits float [N, exits, classes] and labels integer [N], N >= 1;
    else one clear error."""
    if not isinstance(preds, Predictions):
        raise InputTypeError(f"{what} must be evaluate.Predictions(logits, labels), got {type(preds).__name__}")
    logits, labels = checks.tensor(preds.logits, f"{what}.logits", "float [N, exits, classes]"), \
        checks.tensor(preds.labels, f"{what}.labels", "int64 [N]")
    if logits.dim() != 3 or not logits.is_floating_point():
        raise InputError(f"{what}.logits must be float [N, exits, classes], got {logits.dtype} {list(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"{what}.labels must be integer [N] with N = {len(logits)} (one per image of the logits), "
                         f"got {labels.dtype} {list(labels.shape)}")
    _check_not_empty(len(labels), what)
    return preds


def exit_logits(model: nn.Module, x: Tensor, flip: bool = False) -> list[Tensor]:
    """Every exit's logits for a batch, the model borrowed in eval mode.

    Args:
        x: float images [B, 3, H, W] in [0, 1].
        flip: test-time augmentation: average the logits of the images and of their mirrors.
    Returns:
        one [B, classes] tensor per exit.
    """
    if not isinstance(flip, bool):
        raise InputTypeError(f"flip must be True or False, got {flip!r}")
    with msdnet.eval_mode(model):
        logits = model(x)
        if flip:
            logits = [(a + b) / 2 for a, b in zip(logits, model(x.flip(-1)))]
    return logits


@torch.no_grad()
def exit_accuracies(model: nn.Module, split: data.Split, batch_size: int = 500, device=None,
                    flip: bool = False, progress: str | None = None) -> list[float]:
    """The share of `split` each exit classifies correctly, batch by batch; nothing is cached.

    Args:
        split: a data.Split, images uint8 in 0..255 (or float in [0, 1]).
        batch_size: images per forward pass, >= 1.
        progress: a progress bar's label (tqdm.auto), or None for none.
    Returns:
        one accuracy in [0, 1] per exit, B1 first.
    """
    checks.split(split)
    batch_size = checks.whole(batch_size, "batch_size")
    device = device or next(model.parameters()).device
    correct = None
    starts = range(0, len(split), batch_size)
    if progress is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    with msdnet.eval_mode(model):
        for i in starts:
            x = checks.unit_images(split.images[i : i + batch_size].to(device))
            y = split.labels[i : i + batch_size].to(device)
            hits = torch.stack([(z.argmax(1) == y).sum() for z in exit_logits(model, x, flip)])
            correct = hits if correct is None else correct + hits
    return (correct.double() / len(split)).tolist()


@torch.no_grad()
def predict(
    model: nn.Module,
    split: str | data.Split = "test",
    source: str | os.PathLike | None = None,
    batch_size: int = 500,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    flip: bool = False,
) -> Predictions:
    """The logits of every exit for every image of `split`, cached on disk.

    Args:
        split: "train", "val", "test" (read with data.load from `source`) or a data.Split (images uint8 in
            0..255, or float in [0, 1]).
        batch_size: images per forward pass, >= 1.
        flip: test-time augmentation (twice the multiply-accumulates; report it apart).
        cache: reuse and store the result under data/cache/ (or `cache_dir`).
    Returns:
        Predictions: logits [N, exits, classes], labels [N].
    """
    if isinstance(split, str):
        split = data.load(split, source)
    checks.split(split)
    batch_size = checks.whole(batch_size, "batch_size")

    def run() -> dict:
        device = next(model.parameters()).device
        chunks = []
        with msdnet.eval_mode(model):
            for i in tqdm(range(0, len(split), batch_size), desc="predicting", unit="batch", leave=False):
                x = checks.unit_images(split.images[i : i + batch_size].to(device))
                chunks.append(torch.stack(exit_logits(model, x, flip), dim=1).float().cpu())
        return {"logits": torch.cat(chunks), "labels": split.labels.clone()}

    saved = cached("predictions_flip" if flip else "predictions", model, split.images, split.labels, run, cache_dir,
                   enabled=cache, expect=_expect(model, split), code=_CODE)
    return Predictions(saved["logits"], saved["labels"])


def _expect(model: nn.Module, split: data.Split):
    """What a stored result must hold for this model and split: the cache's `expect` (None when it does)."""
    shape = [len(split), getattr(model, "n_exits", None), getattr(getattr(model, "config", None), "num_classes", None)]

    def wrong(saved: dict) -> str | None:
        logits, labels = saved.get("logits"), saved.get("labels")
        if not (isinstance(logits, Tensor) and isinstance(labels, Tensor)):
            return f"keys {sorted(saved)}, not logits and labels"
        if logits.dim() != 3 or any(want not in (None, got) for want, got in zip(shape, logits.shape)):
            return f"logits {list(logits.shape)}, not {shape}"
        if not torch.equal(labels, split.labels.cpu()):
            return "other labels than the split's"
        return None

    return wrong


def cached_predictions(model: nn.Module, split: data.Split, cache_dir=None) -> Predictions | None:
    """predict()'s stored result for these weights and images, or None; never computes."""
    checks.split(split)
    saved = lookup("predictions", model, split.images, split.labels, cache_dir, expect=_expect(model, split), code=_CODE)
    return None if saved is None else Predictions(saved["logits"], saved["labels"])


def store_predictions(model: nn.Module, split: data.Split, preds: Predictions, cache_dir=None) -> None:
    """Store predictions computed elsewhere where predict() finds them."""
    checks.split(split)
    check_predictions(preds)
    if len(preds) != len(split):
        raise InputError(f"preds holds {len(preds)} images, the split {len(split)}; store the split's own predictions")
    store("predictions", model, split.images, split.labels, {"logits": preds.logits, "labels": preds.labels}, cache_dir,
          code=_CODE)


def accuracy_with_ci(correct: Tensor, z: float = 1.959964) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy per column with the Wilson score interval (95% by default), sound near 0% and 100%.

    Args:
        correct: bool [N, ...], N >= 1.
    Returns:
        (accuracy, low, high), each float64 [...] in [0, 1].
    """
    checks.tensor(correct, "correct", "bool [N, ...]")
    if correct.dtype != torch.bool or correct.dim() == 0:
        raise InputError(f"correct must be bool [N, ...] (e.g. preds.correct), got {correct.dtype} {list(correct.shape)}")
    z = checks.number(z, "z", 0, 10, "a positive number of standard deviations (1.96 for 95%)")
    n = correct.shape[0]
    _check_not_empty(n, "correct")
    p = correct.double().mean(0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


def class_exit_accuracy(preds: Predictions, num_classes: int | None = None) -> Tensor:
    """[classes, exits]: the accuracy of each exit on the images of each class (NaN for a class with none)."""
    check_predictions(preds)
    num_classes = preds.logits.shape[-1] if num_classes is None else checks.whole(num_classes, "num_classes")
    onehot = nn.functional.one_hot(preds.labels, num_classes).double()  # [N, C]
    hits = onehot.T @ preds.correct.double()  # [C, E]
    return hits / onehot.sum(0)[:, None]


def difficulty(preds: Predictions) -> Tensor:
    """[N]: how many exits classify each image correctly, 0..exits (the blog's "Dog (3/10)")."""
    check_predictions(preds)
    return preds.correct.sum(1)


def right_then_wrong(preds: Predictions) -> Tensor:
    """[exits, exits]: entry (i, j) is the share of images exit i+1 gets right and exit j+1 gets wrong.
    Above the diagonal it counts what a later exit forgets."""
    check_predictions(preds)
    c = preds.correct.double()
    return c.T @ (1 - c) / len(preds)


def accuracy_line(accs: list[float]) -> str:
    """Every exit's accuracy as the project prints it: ``B1=86.20 B2=88.13 ...`` (percent)."""
    return " ".join(f"B{k + 1}={a * 100:.2f}" for k, a in enumerate(accs))
