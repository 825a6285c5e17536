"""The predictions of every exit, and everything notebook 03 computes from them.

    preds = predict(model, "test")         # .logits [N, exits, classes], .labels [N]; cached on disk
    predict(model, "test", flip=True)      # test-time augmentation: logits of the image and its mirror, averaged
    accuracy_with_ci(preds.correct)        # per exit, with a 95% Wilson interval
    class_exit_accuracy(preds)             # [classes, exits]
    difficulty(preds)                      # per image: how many exits are right (the blog's "k/10")
    thresholds = budget_thresholds(val_preds, q=0.6)   # the paper's budgeted batch classification
    budgeted(preds, thresholds, costs)     # accuracy and average cost (multiply-accumulates, or seconds)
    timed_costs(model, images)             # the same costs in seconds, measured here: searches then minimize time
    one_threshold(val_preds, costs, target)        # one confidence threshold for every exit, chosen on validation
    per_exit_thresholds(val_preds, costs, target)  # a threshold per exit: the cheapest that keep `target`
    cross_validated_safety(val_preds, costs)       # the searches' margin of safety, chosen on validation alone
    EarlyExit(model, thresholds)(images)   # real early exit: an image leaves at its exit and stops computing
    EarlyExitStream(EarlyExit(...))(images)  # the same over many images, every block run on a full batch
    LastExitOnly(model)(images)            # the baseline: all blocks, only the last classifier

Predictions are cached under data/cache/, keyed by a hash of the weights and of the images, so the
notebooks and the explorer pay for one pass over a split once.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data, msdnet
from .cache import cached, lookup, store

__all__ = [
    "exit_logits",
    "exit_accuracies",
    "Predictions",
    "predict",
    "cached_predictions",
    "store_predictions",
    "accuracy_with_ci",
    "class_exit_accuracy",
    "difficulty",
    "right_then_wrong",
    "exit_shares",
    "budget_thresholds",
    "exit_points",
    "Budgeted",
    "budgeted",
    "ExitTime",
    "timed_costs",
    "EarlyExit",
    "EarlyExitStream",
    "budget_curve",
    "cheapest_matching",
    "SCORES",
    "one_threshold",
    "per_exit_thresholds",
    "cross_validated_safety",
    "LastExitOnly",
]


class Predictions(NamedTuple):
    """Every exit's logits for every image of a split (float32 [N, exits, classes]) and the true labels
    (int64 [N]), with what the analyses read off them: predicted, correct, confidence, score."""

    logits: Tensor  # float32 [N, exits, classes]
    labels: Tensor  # int64 [N]

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
        """[N, exits]: the maximum softmax probability, which early exit thresholds."""
        return self.logits.softmax(-1).amax(-1)

    def score(self, kind: str = "confidence") -> Tensor:
        """[N, exits]: how sure each exit is, by one of SCORES (higher: surer)."""
        return _score(self.logits, kind)


def _score(logits: Tensor, kind: str) -> Tensor:
    """How sure a classifier is, from its logits [..., classes]: the top softmax probability, the gap
    between the top two ("margin"), or the negative entropy of the softmax."""
    if kind not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {kind!r}")
    p = logits.float().softmax(-1)
    if kind == "confidence":
        return p.amax(-1)
    if kind == "margin":
        top2 = p.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (p * p.clamp(min=1e-12).log()).sum(-1)  # minus the entropy


SCORES = ("confidence", "margin", "entropy")


def exit_logits(model: nn.Module, x: Tensor, flip: bool = False) -> list[Tensor]:
    """Every exit's logits for a batch; flip=True is test-time augmentation: the logits for the images and
    for their horizontal mirrors, averaged (twice the multiply-accumulates). The one place it is written."""
    with msdnet.eval_mode(model):  # a model in training mode would update its batch-norm statistics
        logits = model(x)
        if flip:
            logits = [(a + b) / 2 for a, b in zip(logits, model(x.flip(-1)))]
    return logits


@torch.no_grad()
def exit_accuracies(model: nn.Module, split: data.Split, batch_size: int = 500, device=None,
                    flip: bool = False) -> list[float]:
    """Share of `split` each exit classifies correctly, counted batch by batch (nothing cached, nothing
    kept: what training's validation and the export need)."""
    device = device or next(model.parameters()).device
    correct = None
    with msdnet.eval_mode(model):
        for i in range(0, len(split), batch_size):
            x = split.images[i : i + batch_size].to(device).float().div_(255)
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
    """The logits of every exit for every image of `split` (a name for data.load, or a Split).

    flip=True is test-time augmentation: each exit's logits for the image and for its horizontal
    mirror, averaged. It costs two passes (twice the multiply-accumulates), so report it apart from
    the plain figures. With cache=True the result is stored under data/cache/ (or cache_dir) and
    reused whenever the same weights meet the same images.
    """
    if isinstance(split, str):
        split = data.load(split, source)

    def run() -> dict:
        device = next(model.parameters()).device
        chunks = []
        with msdnet.eval_mode(model):
            for i in tqdm(range(0, len(split), batch_size), desc="predicting", unit="batch", leave=False):
                x = split.images[i : i + batch_size].to(device).float().div_(255)
                chunks.append(torch.stack(exit_logits(model, x, flip), dim=1).float().cpu())
        return {"logits": torch.cat(chunks), "labels": split.labels.clone()}

    saved = cached("predictions_flip" if flip else "predictions", model, split.images, split.labels, run, cache_dir, enabled=cache)
    return Predictions(saved["logits"], saved["labels"])


def cached_predictions(model: nn.Module, split: data.Split, cache_dir=None) -> Predictions | None:
    """predict()'s stored result for these weights and images, or None: never computes."""
    saved = lookup("predictions", model, split.images, split.labels, cache_dir)
    return None if saved is None else Predictions(saved["logits"], saved["labels"])


def store_predictions(model: nn.Module, split: data.Split, preds: Predictions, cache_dir=None) -> None:
    """Store predictions computed elsewhere (the explorer's, in the background) where predict() finds them."""
    store("predictions", model, split.images, split.labels, {"logits": preds.logits, "labels": preds.labels}, cache_dir)


# ----------------------------------------------------------------------------- accuracy


def accuracy_with_ci(correct: Tensor, z: float = 1.959964) -> tuple[Tensor, Tensor, Tensor]:
    """Accuracy per column of a [N, ...] bool tensor, with the Wilson score interval (95% by default),
    which stays inside [0, 1] and is sound near 0% and 100% where the normal approximation is not."""
    n = correct.shape[0]
    p = correct.double().mean(0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


def class_exit_accuracy(preds: Predictions, num_classes: int | None = None) -> Tensor:
    """[classes, exits]: the accuracy of each exit on the images of each class."""
    num_classes = num_classes or preds.logits.shape[-1]
    onehot = nn.functional.one_hot(preds.labels, num_classes).double()  # [N, C]
    hits = onehot.T @ preds.correct.double()  # [C, E]
    return hits / onehot.sum(0)[:, None]


def difficulty(preds: Predictions) -> Tensor:
    """Per image, how many exits classify it correctly (0..exits): "Dog (3/10)" in the blog."""
    return preds.correct.sum(1)


def right_then_wrong(preds: Predictions) -> Tensor:
    """[exits, exits]: entry (i, j) is the share of images that exit i gets right and exit j gets wrong.
    Above the diagonal (j > i) it counts what a later exit forgets."""
    c = preds.correct.double()
    return c.T @ (1 - c) / len(preds)


# ----------------------------------------------------------------------------- budgeted batch classification


def exit_shares(q: float, n_exits: int) -> Tensor:
    """The paper's exit distribution: the share of images leaving at exit k is proportional to q**k.
    q < 1 sends most images out early, q > 1 most late."""
    k = torch.arange(1, n_exits + 1, dtype=torch.float64)
    shares = q**k
    return shares / shares.sum()


def budget_thresholds(val: Predictions, q: float) -> Tensor:
    """Confidence thresholds [exits] chosen on validation predictions so that the share of images
    leaving at exit k is proportional to q**k (as the official code does). An image leaves at the
    first exit whose maximum softmax reaches that exit's threshold; the last exit takes the rest."""
    conf = val.confidence
    n, n_exits = conf.shape
    target = exit_shares(q, n_exits)
    thresholds = torch.full((n_exits,), -math.inf, dtype=conf.dtype)
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(n_exits - 1):
        want = math.floor(n * target[k].item())
        left = conf[remaining, k]
        if want == 0 or len(left) == 0:
            thresholds[k] = math.inf  # nobody leaves here
            continue
        thresholds[k] = left.sort(descending=True).values[min(want, len(left)) - 1]
        remaining &= conf[:, k] < thresholds[k]
    return thresholds


def exit_points(confidence: Tensor, thresholds: Tensor) -> Tensor:
    """[N]: the 0-based exit at which each image leaves: the first whose confidence reaches its threshold."""
    leaves = confidence >= thresholds
    leaves[:, -1] = True
    return leaves.int().argmax(1)  # argmax returns the first maximum


class Budgeted(NamedTuple):
    """Early exit simulated on predictions: accuracy, average cost per image (multiply-accumulates or
    seconds, the unit of the costs given) and the number of images leaving at each exit (0-based list)."""

    accuracy: float
    average_cost: float  # per image, in the costs' unit: multiply-accumulates (ExitCost) or seconds (ExitTime)
    exit_counts: list[int]  # images leaving at each exit

    @property
    def average_macs(self) -> float:
        """average_cost, under the name it has when the costs are msdnet.exit_costs' multiply-accumulates."""
        return self.average_cost


class ExitTime(NamedTuple):
    """msdnet.ExitCost measured in seconds on this machine instead of counted in multiply-accumulates.
    Every cost-minimizing function here takes either; see timed_costs."""
    exit: int  # 1-based, B1..B10
    seconds: float  # per image, to reach this exit: blocks and classifiers up to it
    classifier_seconds: float  # this exit's classifier alone (part of seconds)


Costs = list[msdnet.ExitCost] | list[ExitTime]  # counted (msdnet.exit_costs) or measured (timed_costs)


def _cost_columns(costs: Costs) -> tuple[Tensor, Tensor]:
    """Cumulative cost to reach each exit and each classifier's own, from ExitCost or ExitTime."""
    if all(isinstance(c, ExitTime) for c in costs):
        total, own = [c.seconds for c in costs], [c.classifier_seconds for c in costs]
    elif all(isinstance(c, msdnet.ExitCost) for c in costs):
        total, own = [c.macs for c in costs], [c.classifier_macs for c in costs]
    else:
        kinds = sorted({type(c).__name__ for c in costs})
        raise TypeError(f"costs must be all msdnet.ExitCost or all evaluate.ExitTime, got {', '.join(kinds)}")
    return torch.tensor(total, dtype=torch.float64), torch.tensor(own, dtype=torch.float64)


@torch.no_grad()
def timed_costs(model: msdnet.MSDNet, images: Tensor, repeats: int = 3) -> list[ExitTime]:
    """Each exit's cost in wall-clock seconds per image, measured on this machine for a batch of
    `images` (in [0, 1]; the batch size and memory format that will be used): every block and every
    classifier timed alone, best of `repeats`. Real early exit runs the later blocks on what is left
    of the batch, where a CPU is slower per image, so a simulation with these costs is a little
    optimistic about them.

    Multiply-accumulates do not measure time on a CPU: MSD-Net's first blocks work at full
    resolution on a few channels, where each multiply-accumulate costs several times what it costs in
    the late, coarse blocks. Thresholds searched with these costs minimize time instead (issue 16)."""
    def seconds(fn) -> float:
        fn()  # warm-up: the first call of a shape pays for allocation and kernel choice
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best / len(images)

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    costs, total = [], 0.0
    with msdnet.eval_mode(model):
        xs = model.normalize(images)
        for k in range(model.n_exits):
            block = seconds(lambda: model.run_block(k, xs))
            xs = model.run_block(k, xs)
            own = seconds(lambda: model.classifiers[k](xs[-1]))
            total += block + own
            costs.append(ExitTime(k + 1, total, own))
    return costs


def budgeted(preds: Predictions, thresholds: Tensor, costs: Costs,
             score: str = "confidence") -> Budgeted:
    """Accuracy and average cost when every image leaves at its exit point. An image leaving at
    exit k has paid for blocks 1..k and for the classifiers of the exits up to k that anyone may leave
    at: an exit whose threshold is +inf is skipped, its classifier never run (as EarlyExit does)."""
    return _Table(preds, costs, score).budgeted(thresholds)


class _Table:
    """What the threshold searches need of some predictions, computed once: the score of every exit
    for every image, which exits are right, and each exit's cumulative cost. The searches try
    thousands of thresholds, and recomputing a softmax for each was most of their time."""

    def __init__(self, preds: Predictions, costs: Costs, score: str) -> None:
        self.scores, self.correct = preds.score(score), preds.correct
        total, self.classifier_cost = _cost_columns(costs)
        self.block_cost = total - self.classifier_cost.cumsum(0)  # reaching block k, no classifier run
        self.n_exits = preds.n_exits

    def budgeted(self, thresholds: Tensor) -> Budgeted:
        return self._outcome(thresholds)[0]

    def lower_bound(self, thresholds: Tensor, safety: float) -> tuple[float, Budgeted]:
        """The accuracy minus `safety` standard errors of its paired difference from the last exit's,
        and the Budgeted result. Only images on which the two disagree add to that error."""
        r, right = self._outcome(thresholds)
        if not safety:
            return r.accuracy, r
        diff = right.double() - self.correct[:, -1].double()  # -1, 0 or 1 per image
        se = ((diff.square().mean() - diff.mean().square()).clamp(min=0) / len(diff)).sqrt().item()
        return r.accuracy - safety * se, r

    def _outcome(self, thresholds: Tensor) -> tuple[Budgeted, Tensor]:
        where = exit_points(self.scores, thresholds)
        right = self.correct.gather(1, where[:, None]).squeeze(1)
        counts = torch.bincount(where, minlength=self.n_exits)
        consulted = (thresholds < math.inf).double()  # a skipped exit's classifier costs nothing
        consulted[-1] = 1.0
        cost = self.block_cost + (self.classifier_cost * consulted).cumsum(0)
        return Budgeted(right.double().mean().item(), cost[where].mean().item(), counts.tolist()), right


# ----------------------------------------------------------------------------- real early exit


class EarlyExit(nn.Module):
    """Inference that really stops: after each block, the images whose classifier is confident
    enough leave, and only the others go on through the next block.

    Returns the predicted class and the exit of every image as a 0-based index (0 is B1), like
    Budgeted.exit_counts and exit_points; add 1 for the exit's number. Normalization, blocks and
    classifiers are the model's own, so the answers equal the full network's exits at those points.
    Thresholds: one per exit, a tensor, list or array (+inf switches an exit off).
    """

    def __init__(self, model: msdnet.MSDNet, thresholds: Tensor, score: str = "confidence") -> None:
        super().__init__()
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32)  # a list or an array will do
        if thresholds.shape != (model.n_exits,):
            raise ValueError(f"need one threshold per exit, shape ({model.n_exits},), got shape {tuple(thresholds.shape)}")
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.model, self.score = model, score
        self.register_buffer("thresholds", thresholds.clone(), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with msdnet.eval_mode(self.model):
            return self._forward(x)

    def decide(self, k: int, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """After block k (0-based), from its maps: which images leave here, and every image's class.
        An exit whose threshold is +inf lets nobody leave, so its classifier is not even run."""
        last = k == self.model.n_exits - 1
        if not last and self.thresholds[k] == math.inf:
            n, device = len(maps[-1]), maps[-1].device
            return torch.zeros(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.long, device=device)
        logits = self.model.classifiers[k](maps[-1])
        if last:
            return torch.ones(len(logits), dtype=torch.bool, device=logits.device), logits.argmax(-1)
        return _score(logits, self.score) >= self.thresholds[k], logits.argmax(-1)

    @torch.no_grad()
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        m = self.model
        predicted = torch.empty(len(x), dtype=torch.long, device=x.device)
        exit_of = torch.empty(len(x), dtype=torch.long, device=x.device)
        alive = torch.arange(len(x), device=x.device)  # original index of each image still computing
        xs = m.normalize(x)
        for k in range(m.n_exits):
            xs = m.run_block(k, xs)
            leave, cls = self.decide(k, xs)
            predicted[alive[leave]] = cls[leave]
            exit_of[alive[leave]] = k
            if leave.all():
                break
            if leave.any():  # only then does the batch shrink (indexing copies every scale's maps)
                stay = ~leave
                alive = alive[stay]
                xs = [t[stay] for t in xs]
        return predicted, exit_of


def _select(maps, rows: Tensor):
    """Rows of a block's input: one tensor (the image, for block 1) or a list of maps, one per scale."""
    return maps[rows] if isinstance(maps, Tensor) else [t[rows] for t in maps]


def _concat(states: list):
    return torch.cat(states) if isinstance(states[0], Tensor) else [torch.cat(s) for s in zip(*states)]


class EarlyExitStream:
    """Real early exit over many images, with every block run on a full batch.

    EarlyExit gives each block what is left of the batch it was called with, so the later blocks run
    on a few images at a time, where a CPU computes far below its best rate. Here the images that
    stay after block k wait in a queue until `batch_size` of them have gathered, and then go through
    block k+1 together: each block, early or late, runs near the batch size it is fastest at. The
    answers are EarlyExit's (the same blocks, classifiers and thresholds); only the grouping differs.

        predicted, exit_of = EarlyExitStream(early_exit, batch_size=100)(images)   # images in [0, 1]
    """

    def __init__(self, early: EarlyExit, batch_size: int = 100) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.early, self.batch_size = early, batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        m, n = self.early.model, len(images)
        predicted = torch.empty(n, dtype=torch.long, device=images.device)
        exit_of = torch.empty(n, dtype=torch.long, device=images.device)
        queues = [[] for _ in range(m.n_exits)]  # per block: (image indices, their input) waiting for it
        with msdnet.eval_mode(m):
            for start in range(0, n, self.batch_size):
                x = images[start : start + self.batch_size]
                idx = torch.arange(start, start + len(x), device=images.device)
                queues[0].append((idx, m.normalize(x)))
                self._drain(queues, predicted, exit_of, full_batches_only=True)
            self._drain(queues, predicted, exit_of, full_batches_only=False)  # the stragglers, block by block
        return predicted, exit_of

    def _drain(self, queues: list, predicted: Tensor, exit_of: Tensor, full_batches_only: bool) -> None:
        """Run every block whose queue holds a full batch (or, at the end, anything), in order, so the
        images that stay after block k join block k+1's queue before it is looked at."""
        m = self.early.model
        for k in range(m.n_exits):
            waiting = sum(len(idx) for idx, _ in queues[k])
            if waiting == 0 or (full_batches_only and waiting < self.batch_size):
                continue
            idx = torch.cat([i for i, _ in queues[k]])
            xs = m.run_block(k, _concat([state for _, state in queues[k]]))
            queues[k] = []
            leave, cls = self.early.decide(k, xs)
            predicted[idx[leave]] = cls[leave]
            exit_of[idx[leave]] = k
            if not leave.all():
                stay = ~leave
                queues[k + 1].append((idx[stay], _select(xs, stay)))


def budget_curve(val: Predictions, test: Predictions, costs: Costs,
                 qs: Tensor | None = None) -> list[tuple[float, Budgeted]]:
    """Accuracy vs average cost on `test` for thresholds chosen on `val`, sweeping q (as the paper's
    figure does; the official code sweeps q = 0.05 .. 1.95)."""
    qs = torch.arange(1, 40) / 20 if qs is None else qs
    return [(q, budgeted(test, budget_thresholds(val, q), costs)) for q in qs.tolist()]


def cheapest_matching(val: Predictions, costs: Costs, target: float,
                      qs: Tensor | None = None) -> tuple[float, Tensor]:
    """The q (and its thresholds) with the lowest average cost on `val` whose accuracy on `val`
    reaches `target`, e.g. the last exit's accuracy: early exit at no loss of accuracy."""
    _check_target(target)
    curve = [(q, r) for q, r in budget_curve(val, val, costs, qs) if r.accuracy >= target]
    if not curve:
        raise ValueError(f"no q reaches accuracy {target:.4f} on the validation predictions")
    q, _ = min(curve, key=lambda item: item[1].average_cost)
    return q, budget_thresholds(val, q)


def _check_target(target: float) -> None:
    """A target accuracy is a share: 0.898, not 89.8 (which no thresholds could reach, so the searches
    would silently switch every exit off)."""
    if not 0 < target <= 1:
        raise ValueError(f"target is an accuracy between 0 and 1 (0.898 for 89.8%), got {target!r}")


def _candidates(scores: Tensor, n: int = 200) -> Tensor:
    """Threshold values worth trying: quantiles of the scores (every distinct value when few)."""
    flat = scores.flatten().double()
    if flat.unique().numel() <= n:
        return flat.unique()
    return flat.quantile(torch.linspace(0, 1, n, dtype=torch.float64)).unique()


def one_threshold(val: Predictions, costs: Costs, target: float,
                  score: str = "confidence", safety: float = 0.0) -> Tensor:
    """One threshold for every exit but the last, chosen on validation: the lowest (so the cheapest)
    whose validation accuracy reaches `target`, e.g. the last exit's. Returns thresholds [exits].

    safety > 0 asks more of the validation accuracy: it must reach `target` even after subtracting
    `safety` standard errors of its paired difference from the last exit. Thresholds tuned to 5,000
    images also fit their noise; this margin keeps the test accuracy nearer the target."""
    _check_target(target)
    return _one_threshold(_Table(val, costs, score), target, safety)


def _one_threshold(table: _Table, target: float, safety: float) -> Tensor:
    for t in _candidates(table.scores[:, :-1]).tolist():  # ascending: the first that keeps the accuracy is the cheapest
        thresholds = torch.full((table.n_exits,), t, dtype=torch.float64)
        thresholds[-1] = -math.inf
        if table.lower_bound(thresholds, safety)[0] >= target:
            return thresholds
    return _all_off(table.n_exits)  # nobody leaves early: the last exit's accuracy


def _all_off(n_exits: int) -> Tensor:
    """Thresholds that switch every exit but the last off: the full network."""
    thresholds = torch.full((n_exits,), math.inf, dtype=torch.float64)
    thresholds[-1] = -math.inf
    return thresholds


def per_exit_thresholds(val: Predictions, costs: Costs, target: float,
                        score: str = "confidence", rounds: int = 3, safety: float = 0.0) -> Tensor:
    """A threshold for each exit, chosen on validation by coordinate descent: each exit's threshold in
    turn is moved to the value that makes the average cost lowest while validation accuracy stays at
    `target` or above; a few rounds over the exits. A threshold of +inf switches its exit off (its
    classifier is never run). The descent starts twice, from one_threshold and from every exit
    switched off, and keeps the cheaper result: one move at a time cannot always reach the other.
    `safety` is one_threshold's margin against the noise of the validation images.
    Returns thresholds [exits] (the last is -inf: every image that gets there leaves)."""
    _check_target(target)
    table = _Table(val, costs, score)
    starts = (_one_threshold(table, target, safety), _all_off(val.n_exits))
    found = [_descend(table, start, target, rounds, safety) for start in starts]
    feasible = [f for f in found if table.lower_bound(f[0], safety)[0] >= target] or found[:1]
    return min(feasible, key=lambda f: f[1].average_cost)[0]


def _descend(table: _Table, thresholds: Tensor, target: float, rounds: int, safety: float) -> tuple[Tensor, Budgeted]:
    best = table.budgeted(thresholds)
    grids = [torch.cat([_candidates(table.scores[:, k], 100), torch.tensor([math.inf], dtype=torch.float64)])
             for k in range(table.n_exits - 1)]
    for _ in range(rounds):
        moved = False
        for k in range(table.n_exits - 1):
            for t in grids[k].tolist():
                trial = thresholds.clone()
                trial[k] = t
                bound, r = table.lower_bound(trial, safety)
                if bound >= target and r.average_cost < best.average_cost - 1e-9:
                    thresholds, best, moved = trial, r, True
        if not moved:
            break
    return thresholds, best


def cross_validated_safety(val: Predictions, costs: Costs, score: str = "confidence", tolerance: float = 0.001,
                           safeties: tuple[float, ...] = (0, 0.5, 1, 1.5, 2, 3), rounds: int = 3,
                           seed: int = 0, search: Callable | None = None) -> float:
    """The margin of safety for per_exit_thresholds (or for `search`, another search with its signature,
    such as one_threshold), chosen on validation alone: the validation images are
    halved at random (`rounds` times, seeded); thresholds searched on one half, with the last exit's
    accuracy there as the target, are applied to the other half, and the other way round. The smallest
    safety whose thresholds keep the held-out half within `tolerance` (a share: 0.001 is 0.1 point) of its
    last exit's accuracy, on average over the 2 x rounds trials, is returned; the largest tried when none
    does. Searched on half the images, the thresholds are noisier than on all of them, so the choice errs
    on the safe side."""
    g = torch.Generator().manual_seed(seed)
    trials = []
    for _ in range(rounds):
        order = torch.randperm(len(val), generator=g)
        a, b = order[: len(val) // 2], order[len(val) // 2 :]
        trials += [(a, b), (b, a)]
    half = lambda idx: Predictions(val.logits[idx], val.labels[idx])  # noqa: E731
    search = search or per_exit_thresholds
    for safety in sorted(safeties):
        shortfall = 0.0
        for tune, check in trials:
            tuned, held_out = half(tune), half(check)
            thresholds = search(tuned, costs, tuned.correct[:, -1].double().mean().item(), score=score, safety=safety)
            r = budgeted(held_out, thresholds, costs, score)
            shortfall += (held_out.correct[:, -1].double().mean().item() - r.accuracy) / len(trials)
        if shortfall <= tolerance:
            return safety
    return max(safeties)


class LastExitOnly(nn.Module):
    """The network used as an ordinary classifier: every block, then only the last classifier.
    The fair baseline for early exit (model(x) would also evaluate the nine earlier classifiers)."""

    def __init__(self, model: msdnet.MSDNet) -> None:
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        with msdnet.eval_mode(self.model):
            return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        m = self.model
        xs = m.normalize(x)
        for k in range(m.n_exits):
            xs = m.run_block(k, xs)
        return m.classifiers[-1](xs[-1])
