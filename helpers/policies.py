"""Exit policies: which exit each image leaves at, chosen on validation and simulated on predictions.

    thresholds = budget_thresholds(val, q=0.6)     # the paper's budgeted batch classification
    budgeted(test, thresholds, costs)               # accuracy, average cost, images leaving at each exit
    one_threshold(val, costs, target)               # one confidence threshold for every exit
    per_exit_thresholds(val, costs, target)         # the cheapest threshold per exit that keeps `target`
    cross_validated_safety(val, costs)              # the searches' margin of safety, on validation alone

An image leaves at the first exit whose score reaches that exit's threshold; the last exit takes the
rest; a threshold of +inf switches its exit off (its classifier never runs). Costs are counted
(msdnet.exit_costs, multiply-accumulates) or measured (earlyexit.timed_costs, seconds).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import checks, msdnet
from .errors import InputError, InputTypeError
from .evaluate import SCORES, Predictions, check_predictions

__all__ = [
    "ExitTime",
    "Budgeted",
    "check_thresholds",
    "exit_shares",
    "budget_thresholds",
    "exit_points",
    "budgeted",
    "budget_curve",
    "cheapest_matching",
    "one_threshold",
    "per_exit_thresholds",
    "cross_validated_safety",
]


class ExitTime(NamedTuple):
    """msdnet.ExitCost measured in seconds instead of counted in multiply-accumulates (earlyexit.timed_costs)."""

    exit: int  # 1..n_exits
    seconds: float  # per image, to reach this exit: blocks and classifiers up to it
    classifier_seconds: float  # this exit's classifier alone (part of seconds)


Costs = list[msdnet.ExitCost] | list[ExitTime]


class Budgeted(NamedTuple):
    """Early exit simulated on predictions.

    Fields:
        accuracy: in [0, 1].
        average_cost: per image, in the costs' unit (multiply-accumulates or seconds).
        exit_counts: images leaving at B1, B2, ..., in exit order.
    """

    accuracy: float
    average_cost: float
    exit_counts: list[int]


def check_thresholds(thresholds, n_exits: int, score: str = "confidence") -> Tensor:
    """Thresholds as a float64 tensor [n_exits], or one clear error.

    Args:
        thresholds: one per exit (tensor, list or array); +inf switches an exit off.
        score: the score they apply to (evaluate.SCORES): confidence and margin lie in [0, 1], entropy <= 0.
    """
    if score not in SCORES:
        raise InputError(f"score must be one of {SCORES}, got {score!r}")
    t = torch.as_tensor(thresholds, dtype=torch.float64).flatten().cpu()
    if t.numel() != n_exits:
        raise InputError(f"need one threshold per exit, {n_exits} in all, got {t.numel()}")
    if t.isnan().any():
        raise InputError("thresholds must not be NaN; use +inf to switch an exit off")
    finite = t[:-1][t[:-1].isfinite()]
    high = 0.0 if score == "entropy" else 1.0
    if (finite > high).any():
        hint = "0.9 for 90%" if score != "entropy" else "minus an entropy"
        raise InputError(f"{score} thresholds lie at or below {high:g} ({hint}), got {finite.max().item():g}: "
                         "no image would ever leave early")
    return t


def exit_shares(q: float, n_exits: int) -> Tensor:
    """The paper's exit distribution: the share leaving at exit k is proportional to q**k.

    Args:
        q: a positive ratio; below 1 most images leave early, above 1 most leave late.
    Returns:
        float64 [n_exits], summing to 1.
    """
    try:
        ok = not isinstance(q, (bool, str)) and math.isfinite(float(q)) and float(q) > 0
    except (TypeError, ValueError, RuntimeError):  # not a number, or a tensor of several
        ok = False
    if not ok:
        raise InputError(f"q must be a positive number (the paper sweeps 0.05 .. 1.95), got {q!r}")
    q = float(q)
    n_exits = checks.whole(n_exits, "n_exits")
    k = torch.arange(1, n_exits + 1, dtype=torch.float64)
    # q**k / sum(q**k) in logarithms: q = 1e300 (or 1e-300) would overflow (underflow) to inf / inf = NaN.
    return (k * math.log(q)).softmax(0)


def budget_thresholds(val: Predictions, q: float) -> Tensor:
    """Confidence thresholds chosen on validation so that the share leaving at exit k is proportional to q**k.

    Returns:
        float64 [exits]; the last is -inf (every image that gets there leaves).
    """
    conf = check_predictions(val, "val").confidence.double()
    n, n_exits = conf.shape
    target = exit_shares(q, n_exits)
    thresholds = torch.full((n_exits,), -math.inf, dtype=torch.float64)
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


def exit_points(scores: Tensor, thresholds: Tensor) -> Tensor:
    """The exit each image leaves at: the first whose score reaches its threshold.

    Args:
        scores: [N, exits]; thresholds: [exits].
    Returns:
        int64 [N] of exit numbers 1..exits.
    """
    checks.tensor(scores, "scores", "[N, exits]")
    checks.tensor(thresholds, "thresholds", "[exits]")
    if scores.dim() != 2 or thresholds.shape != scores.shape[1:]:
        raise InputError(f"scores must be [N, exits] and thresholds [exits], got {list(scores.shape)} and "
                         f"{list(thresholds.shape)}")
    leaves = scores >= thresholds.to(scores.device)
    leaves[:, -1] = True
    return leaves.int().argmax(1) + 1  # argmax finds the first maximum


def budgeted(preds: Predictions, thresholds: Tensor, costs: Costs, score: str = "confidence") -> Budgeted:
    """Accuracy and average cost when every image leaves at its exit point.

    An image leaving at exit k has paid for blocks 1..k and for the classifiers up to k that are
    switched on (threshold below +inf), as earlyexit.EarlyExit runs them.
    """
    return _Table(preds, costs, score).budgeted(check_thresholds(thresholds, preds.n_exits, score))


def _cost_columns(costs: Costs) -> tuple[Tensor, Tensor]:
    """Cumulative cost to reach each exit and each classifier's own, from ExitCost or ExitTime."""
    if all(isinstance(c, ExitTime) for c in costs):
        total, own = [c.seconds for c in costs], [c.classifier_seconds for c in costs]
    elif all(isinstance(c, msdnet.ExitCost) for c in costs):
        total, own = [c.macs for c in costs], [c.classifier_macs for c in costs]
    else:
        kinds = sorted({type(c).__name__ for c in costs})
        raise InputTypeError(f"costs must be all msdnet.ExitCost or all policies.ExitTime, got {', '.join(kinds)}")
    return torch.tensor(total, dtype=torch.float64), torch.tensor(own, dtype=torch.float64)


class _Table:
    """What the searches need of some predictions, computed once: every score, which exits are right,
    each exit's cost. The searches try thousands of thresholds; a softmax each would dominate."""

    def __init__(self, preds: Predictions, costs: Costs, score: str) -> None:
        check_predictions(preds)
        if isinstance(costs, (str, bytes)) or not hasattr(costs, "__len__"):
            raise InputTypeError(f"costs must be a list of msdnet.ExitCost or policies.ExitTime, got {costs!r}")
        if len(costs) != preds.n_exits:
            raise InputError(f"need one cost per exit, {preds.n_exits} in all, got {len(costs)}")
        self.scores, self.correct = preds.scores(score).double(), preds.correct
        total, self.classifier_cost = _cost_columns(costs)
        self.block_cost = total - self.classifier_cost.cumsum(0)  # reaching block k, no classifier run
        self.n_exits = preds.n_exits

    def budgeted(self, thresholds: Tensor) -> Budgeted:
        return self._outcome(thresholds)[0]

    def lower_bound(self, thresholds: Tensor, safety: float) -> tuple[float, Budgeted]:
        """The accuracy minus `safety` standard errors of its paired difference from the last exit's."""
        r, right = self._outcome(thresholds)
        if not safety:
            return r.accuracy, r
        diff = right.double() - self.correct[:, -1].double()  # -1, 0 or 1 per image
        se = ((diff.square().mean() - diff.mean().square()).clamp(min=0) / len(diff)).sqrt().item()
        return r.accuracy - safety * se, r

    def _outcome(self, thresholds: Tensor) -> tuple[Budgeted, Tensor]:
        where = exit_points(self.scores, thresholds) - 1
        right = self.correct.gather(1, where[:, None]).squeeze(1)
        counts = torch.bincount(where, minlength=self.n_exits)
        consulted = (thresholds < math.inf).double()  # a skipped exit's classifier costs nothing
        consulted[-1] = 1.0
        cost = self.block_cost + (self.classifier_cost * consulted).cumsum(0)
        return Budgeted(right.double().mean().item(), cost[where].mean().item(), counts.tolist()), right


def budget_curve(val: Predictions, test: Predictions, costs: Costs,
                 qs: Tensor | None = None) -> list[tuple[float, Budgeted]]:
    """Accuracy vs average cost on `test` for thresholds chosen on `val`, sweeping q (default 0.05 .. 1.95).

    Returns:
        [(q, Budgeted)] in the order of qs.
    """
    qs = torch.arange(1, 40) / 20 if qs is None else torch.as_tensor(qs, dtype=torch.float64).reshape(-1)
    return [(q, budgeted(test, budget_thresholds(val, q), costs)) for q in qs.tolist()]


def cheapest_matching(val: Predictions, costs: Costs, target: float,
                      qs: Tensor | None = None) -> tuple[float, Tensor]:
    """The q whose thresholds cost least on `val` while keeping its accuracy at `target` or above.

    Returns:
        (q, thresholds [exits]).
    """
    reach = _check_target(target)
    curve = [(q, r) for q, r in budget_curve(val, val, costs, qs) if r.accuracy >= reach]
    if not curve:
        raise InputError(f"no q reaches accuracy {target:.4f} on the validation predictions")
    q, _ = min(curve, key=lambda item: item[1].average_cost)
    return q, budget_thresholds(val, q)


_ROUNDING = 1e-6
"""How far under `target` an accuracy may fall and still reach it: a target read from a float32 tensor
(0.9082 stored as 0.90820003) would otherwise be out of reach of the very accuracy it was read from.
Far below one image in a million, so no real shortfall passes."""


def _check_target(target: float) -> float:
    """`target` as the float the searches compare with (less _ROUNDING), or one clear error."""
    # A share, not a percentage: 89.8 could never be reached, and every exit would silently switch off.
    try:
        value = math.nan if isinstance(target, (bool, str)) else float(target)  # a one-element tensor will do
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise InputError(f"target is an accuracy between 0 and 1 (0.898 for 89.8%), got {target!r}")
    return value - _ROUNDING


def _candidates(scores: Tensor, n: int = 200) -> Tensor:
    """Threshold values worth trying: quantiles of the scores (every distinct value when few)."""
    flat = scores.flatten().double()
    if flat.unique().numel() <= n:
        return flat.unique()
    return flat.quantile(torch.linspace(0, 1, n, dtype=torch.float64)).unique()


def one_threshold(val: Predictions, costs: Costs, target: float,
                  score: str = "confidence", safety: float = 0.0) -> Tensor:
    """The lowest single threshold for every exit but the last whose validation accuracy reaches `target`.

    Args:
        target: an accuracy in (0, 1], e.g. the last exit's.
        safety: ask the accuracy to reach `target` after subtracting this many standard errors of its
            paired difference from the last exit.
    Returns:
        float64 thresholds [exits].
    """
    target, safety = _check_target(target), _check_safety(safety)
    return _one_threshold(_Table(val, costs, score), target, safety)


def _check_safety(safety) -> float:
    return checks.number(safety, "safety", 0, math.inf, "a number of standard errors >= 0 (e.g. 1.5)")


def _one_threshold(table: _Table, target: float, safety: float) -> Tensor:
    for t in _candidates(table.scores[:, :-1]).tolist():  # ascending: the first that keeps the accuracy is the cheapest
        thresholds = torch.full((table.n_exits,), t, dtype=torch.float64)
        thresholds[-1] = -math.inf
        if table.lower_bound(thresholds, safety)[0] >= target:
            return thresholds
    return _all_off(table.n_exits)


def _all_off(n_exits: int) -> Tensor:
    """Thresholds that switch every exit but the last off: the full network."""
    thresholds = torch.full((n_exits,), math.inf, dtype=torch.float64)
    thresholds[-1] = -math.inf
    return thresholds


def per_exit_thresholds(val: Predictions, costs: Costs, target: float,
                        score: str = "confidence", rounds: int = 3, safety: float = 0.0) -> Tensor:
    """A threshold per exit, by coordinate descent on the average cost while validation accuracy stays >= `target`.

    The descent starts from one_threshold and from every exit switched off and keeps the cheaper end.
    Args:
        target, safety: as in one_threshold.
        rounds: passes over the exits.
    Returns:
        float64 thresholds [exits] (+inf: exit off; the last is -inf).
    """
    target = _check_target(target)
    safety, rounds = _check_safety(safety), checks.whole(rounds, "rounds")
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
    """The smallest margin of safety whose thresholds, tuned on half of `val`, hold on the other half.

    Each of `rounds` seeded random halvings tunes on one half (target: its last exit's accuracy) and
    checks on the other, both ways; a safety passes when the held-out shortfall averages <= `tolerance`.
    Args:
        search: per_exit_thresholds (default) or another search with its signature, e.g. one_threshold.
    Returns:
        the chosen safety; the largest tried when none passes.
    """
    check_predictions(val, "val")
    tolerance = checks.number(tolerance, "tolerance", 0, 1, "an accuracy between 0 and 1 (0.001 for 0.1 points)")
    rounds, seed = checks.whole(rounds, "rounds"), checks.whole(seed, "seed", low=0)
    if len(val) < 4:
        raise InputError(f"val needs at least 4 images to be halved and tuned on, got {len(val)}")
    safeties = [_check_safety(s) for s in safeties]
    if not safeties:
        raise InputError("safeties must hold at least one margin to try, e.g. (0, 1, 2)")
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
