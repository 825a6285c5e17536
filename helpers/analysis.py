"""What the series concludes from the maps and the predictions, computed in one tested place.

    span(maps), entropy(maps)              # [N, exits]: how much of a map is lit, how spread it is
    map_correlation(maps)                  # [N, exits, exits]: per image, how alike two exits' maps are
    consistency(maps)                      # [N, exits]: each exit's map against the last exit's
    bootstrap_ci(values)                   # the mean and its 95% interval, resampling images
    judge(values)                          # a Verdict: SUPPORTED / NOT SUPPORTED / CONTRADICTED
    class_best_exits(preds)                # per class: the best exit, and whether it beats the overall best
    best_exit_null(preds)                  # do classes differ in their best exit more than random groups do?
    cascading_randomization(model, x, k)   # the sanity check of Adebayo et al. for exit k

maps are raw class activation maps [N, exits, h, w] (gradcam.maps_for_split). A map that is all
zero says nothing (no channel speaks for the class); `valid` marks the others, and the measures
below are meant to be read where it is true.

The verdict rule, stated once: a claim is a per-image quantity whose mean is the effect (say, the
span of B5 and B10 minus that of B1 and B3). Its 95% interval comes from a bootstrap over the images.
SUPPORTED when the interval lies above zero, CONTRADICTED when below, NOT SUPPORTED when it holds zero.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

from . import checks, evaluate, gradcam, msdnet
from .errors import InputError

__all__ = [
    "valid", "span", "entropy", "map_correlation", "consistency", "overthinking",
    "bootstrap_ci", "Verdict", "judge", "judge_groups", "class_best_exits", "BestExitNull", "best_exit_null", "rank_correlation", "cascading_randomization",
]


def _maps(maps) -> Tensor:
    """`maps` itself when float [N, exits, h, w], else one clear error."""
    checks.tensor(maps, "maps", "float [N, exits, h, w] (gradcam.maps_for_split)")
    if maps.dim() != 4 or not maps.is_floating_point():
        raise InputError(f"maps must be float [N, exits, h, w] (gradcam.maps_for_split), got {maps.dtype} {list(maps.shape)}")
    return maps


def valid(maps: Tensor) -> Tensor:
    """[N, exits] bool: the maps that are not all zero."""
    return _maps(maps).flatten(2).amax(-1) > 0


def span(maps: Tensor, level: float = 0.5) -> Tensor:
    """[N, exits]: the share of a map's cells at `level` of its maximum or more (the blog's "attention
    span": how much of the image the exit looks at). level: a share of the maximum in (0, 1]."""
    level = checks.number(level, "level", 0, 1, "a share of the map's maximum between 0 and 1 (0.5 for half)")
    flat = _maps(maps).flatten(2)
    peak = flat.amax(-1, keepdim=True).clamp(min=1e-12)
    return (flat >= level * peak).double().mean(-1)


def entropy(maps: Tensor) -> Tensor:
    """[N, exits]: the entropy of a map read as a distribution over its cells, divided by its largest
    possible value (log of the number of cells): 1 for a flat map, 0 for a single lit cell."""
    flat = _maps(maps).flatten(2).double()
    p = flat / flat.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(p * p.clamp(min=1e-12).log()).sum(-1) / torch.log(torch.tensor(float(flat.shape[-1]), dtype=torch.float64))


def _standardized(maps: Tensor) -> Tensor:
    flat = maps.flatten(2).double()
    z = flat - flat.mean(-1, keepdim=True)
    return z / z.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def map_correlation(maps: Tensor) -> Tensor:
    """[N, exits, exits]: per image, the Pearson correlation between the maps of every two exits
    (0 where a map is constant, all-zero maps included)."""
    z = _standardized(_maps(maps))
    return torch.einsum("nip,njp->nij", z, z)


def consistency(maps: Tensor, reference: int = -1) -> Tensor:
    """[N, exits]: per image, the correlation of each exit's map with the reference exit's (the last by
    default): attention consistency, as early-exit explanation work measures it."""
    n_exits = _maps(maps).shape[1]
    reference = checks.whole(reference, "reference", low=-n_exits, high=n_exits - 1)
    z = _standardized(maps)
    return torch.einsum("nip,np->ni", z, z[:, reference])


def overthinking(preds: evaluate.Predictions) -> Tensor:
    """[N, exits] bool: exit k is right and the last exit wrong (Kaya et al., "Shallow-Deep Networks",
    2019): the network knew, and thought itself out of it."""
    evaluate.check_predictions(preds)
    return preds.correct & ~preds.correct[:, -1:]


# ----------------------------------------------------------------------------- the verdict rule


def _values(values, name: str = "values") -> Tensor:
    """`values` as float64 [N], or one clear error (a list, a 2-d tensor, booleans)."""
    checks.tensor(values, name, "one number per image, [N]")
    if values.dim() != 1 or values.dtype == torch.bool or values.is_complex():
        raise InputError(f"{name} must be one number per image, [N], got {values.dtype} {list(values.shape)}")
    return values.double()


def _boot_args(n_boot, level, seed) -> tuple[int, float, int]:
    """n_boot >= 1, level a share in (0, 1) and seed >= 0, or one clear error (level=95 is a percent)."""
    level = checks.number(level, "level", 0, 1, "a share between 0 and 1 (0.95 for a 95% interval)")
    if level in (0, 1):
        raise InputError(f"level must be a share strictly between 0 and 1 (0.95 for a 95% interval), got {level:g}")
    return checks.whole(n_boot, "n_boot"), level, checks.whole(seed, "seed", low=0)


def _check_finite(v: Tensor) -> None:
    # A NaN would make every resampled mean NaN, and the verdict a silent NOT SUPPORTED.
    bad = (~torch.isfinite(v)).sum().item()
    if bad:
        raise InputError(f"{bad} of {v.numel()} values are NaN or infinite; drop them first "
                         "(e.g. values[torch.isfinite(values)], or keep the images where analysis.valid(maps) is true)")


def bootstrap_ci(values: Tensor, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` [N] and its percentile-bootstrap interval, resampling the
    N values (images) with replacement, seeded.

    Args:
        values: float [N], N >= 2. n_boot: resamples, >= 1. level: the interval's share, in (0, 1). seed: >= 0.
    """
    n_boot, level, seed = _boot_args(n_boot, level, seed)
    v = _values(values)
    _check_finite(v)
    if v.numel() < 2:
        raise InputError(f"a bootstrap needs at least 2 values, got {v.numel()}")
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([v[torch.randint(0, len(v), (min(200, n_boot - i), len(v)), generator=g)].mean(1)
                       for i in range(0, n_boot, 200)])  # in chunks: 2,000 x 10,000 indices at once is 160 MB
    tail = (1 - level) / 2
    low, high = means.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return v.mean().item(), low, high


class Verdict(NamedTuple):
    """The verdict rule's answer: word (SUPPORTED above zero, CONTRADICTED below, else NOT SUPPORTED),
    the effect (a mean over images) and its bootstrap interval [low, high]."""

    word: str  # SUPPORTED, NOT SUPPORTED or CONTRADICTED
    effect: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.word} ({self.effect:+.3f}, 95% interval [{self.low:+.3f}, {self.high:+.3f}])"


def judge_groups(values: Tensor, group: Tensor, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Verdict:
    """The rule for two groups of images: the effect is mean(values[group]) - mean(values[~group]),
    its interval a bootstrap that resamples each group on its own (their sizes kept).

    Args:
        values: float [N]. group: bool [N], True for the first group. n_boot, level, seed: as in bootstrap_ci.
    """
    n_boot, level, seed = _boot_args(n_boot, level, seed)
    v = _values(values)
    checks.tensor(group, "group", f"bool [{len(v)}]")
    if group.dtype != torch.bool or group.shape != v.shape:
        # an integer 0/1 group would index the values (values[group] picks images 0 and 1), not split them
        raise InputError(f"group must be bool [{len(v)}], one per value (True: the first group), got {group.dtype} "
                         f"{list(group.shape)}; for 0/1 labels pass group == 1")
    a, b = v[group], v[~group]
    _check_finite(v)
    if len(a) < 2 or len(b) < 2:
        raise InputError(f"each group needs at least 2 images, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    boot = torch.stack([a[torch.randint(0, len(a), (len(a),), generator=g)].mean()
                        - b[torch.randint(0, len(b), (len(b),), generator=g)].mean() for _ in range(n_boot)])
    tail = (1 - level) / 2
    low, high = boot.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return _verdict((a.mean() - b.mean()).item(), low, high)


def judge(values: Tensor, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Verdict:
    """The rule: the mean of per-image `values` (the claimed effect, positive if the claim holds) with
    its bootstrap interval; SUPPORTED above zero, CONTRADICTED below, else NOT SUPPORTED.

    Args:
        values: float [N], N >= 2. n_boot, level, seed: as in bootstrap_ci (level 0.95, not 95).
    """
    return _verdict(*bootstrap_ci(values, n_boot, level, seed))


def _verdict(effect: float, low: float, high: float) -> Verdict:
    word = "SUPPORTED" if low > 0 else "CONTRADICTED" if high < 0 else "NOT SUPPORTED"
    return Verdict(word, effect, low, high)


class ClassBest(NamedTuple):
    """class_best_exits' answer.

    Fields:
        best: int64 [classes], the exit number (1..exits) with the highest accuracy on each class's images.
        overall: the exit number with the highest accuracy on all images.
        verdicts: per class, a Verdict on accuracy(best) - accuracy(overall) on that class (None: under 2 images).
    """

    best: Tensor
    overall: int
    verdicts: list


def class_best_exits(preds: evaluate.Predictions, **kw) -> ClassBest:
    """Per class, the best exit, judged against the best exit overall on that class's images.

    Choosing the best of ten exits on the same images flatters it, so only a SUPPORTED difference counts.
    Args:
        kw: passed to judge (n_boot, level, seed).
    """
    evaluate.check_predictions(preds)
    correct = preds.correct.double()
    overall = int(correct.mean(0).argmax())
    best, verdicts = [], []
    for c in range(preds.logits.shape[-1]):
        mine = correct[preds.labels == c]
        b = int(mine.mean(0).argmax())
        best.append(b + 1)
        verdicts.append(judge(mine[:, b] - mine[:, overall], **kw) if len(mine) > 1 else None)
    return ClassBest(torch.tensor(best), overall + 1, verdicts)


class BestExitNull(NamedTuple):
    """How much choosing the best exit per class gains (gain), what random groups of the same sizes gain
    by the same selection (null_mean), and the share of random groupings that gain as much (p_value)."""

    gain: float  # mean over classes of accuracy(class's best exit) - accuracy(overall best exit), on the class
    null_mean: float  # the same gain, averaged over random groups of the same sizes
    p_value: float  # share of random groupings whose gain is at least `gain` (with the +1 correction)


def best_exit_null(preds: evaluate.Predictions, n_perm: int = 1000, seed: int = 0) -> BestExitNull:
    """A permutation test of "the best exit differs between classes". Picking each class's best of ten
    exits gains something over the overall best exit even when classes do not matter at all, from noise
    alone. The null: shuffle the class labels over the images (groups of the same sizes, no class in
    them) and measure the same gain. Only a gain well above the null's says the classes differ.
    n_perm: random groupings, >= 1; seed >= 0."""
    evaluate.check_predictions(preds)
    n_perm, seed = checks.whole(n_perm, "n_perm"), checks.whole(seed, "seed", low=0)
    correct = preds.correct.double()                      # [N, exits]
    n_classes = preds.logits.shape[-1]
    overall = int(correct.mean(0).argmax())               # the same for every grouping of the images

    def gain(labels: Tensor) -> float:
        onehot = torch.nn.functional.one_hot(labels, n_classes).double()  # [N, classes]
        counts = onehot.sum(0)
        table = onehot.T @ correct / counts.clamp(min=1)[:, None]  # [classes, exits]: accuracy per class and exit
        return (table.amax(1) - table[:, overall])[counts > 0].mean().item()

    observed = gain(preds.labels)
    g = torch.Generator().manual_seed(seed)
    null = torch.tensor([gain(preds.labels[torch.randperm(len(preds.labels), generator=g)]) for _ in range(n_perm)])
    p = (1 + (null >= observed - 1e-12).sum().item()) / (1 + n_perm)
    return BestExitNull(observed, null.mean().item(), p)


# ----------------------------------------------------------------------------- the sanity check


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rank correlation between the rows of a and b [N, P] (ties share their average rank)."""
    checks.tensor(a, "a", "[N, P]")
    checks.tensor(b, "b", "[N, P]")
    if a.dim() != 2 or a.shape != b.shape:
        raise InputError(f"a and b must be [N, P] of the same shape, got {list(a.shape)} and {list(b.shape)}")
    return (_standardized(_average_ranks(a)[:, None]) * _standardized(_average_ranks(b)[:, None])).sum(-1)[:, 0]


def _average_ranks(x: Tensor) -> Tensor:
    x = x.flatten(1).double()
    ranks = torch.empty_like(x)
    for i, row in enumerate(x):
        values, order = row.sort()
        _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
        first = counts.cumsum(0) - counts
        ranks[i, order] = (first + (counts - 1) / 2).double()[inverse]
    return ranks


def cascading_randomization(model: msdnet.MSDNet, x: Tensor, exit: int, seed: int = 0) -> list[tuple[str, Tensor]]:
    """Adebayo et al.'s sanity check for exit `exit`: re-initialize its weights from the top down.

    Classifier `exit`, then block `exit`, `exit`-1, ..., 1 are re-drawn cumulatively on a copy of the
    model; after each step the new map is compared, per image, with the trained model's.
    Args:
        x: float images [N, 3, H, W] in [0, 1].
        seed: seeds the re-drawn weights (the caller's random state is left alone).
    Returns:
        [("up to <what was re-drawn>", rank correlations [N])], classifier first.
    """
    exit = msdnet.exit_number(exit, model.n_exits)
    seed = checks.whole(seed, "seed", low=0)
    original = gradcam.gradcam(model, x, exit=exit).flatten(1)
    with msdnet.eval_mode(model), torch.no_grad():
        target = model(x, exits=exit)[exit - 1].argmax(1)  # explain the trained model's answer throughout
    randomized = copy.deepcopy(model).eval()
    out = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, module in reversed(randomized.path_to(exit)):
            for m in module.modules():
                if hasattr(m, "reset_parameters"):  # convolutions, batch norms (statistics too), the linear layer
                    m.reset_parameters()
            maps = gradcam.gradcam(randomized, x, exit=exit, target=target).flatten(1)
            out.append((f"up to {name}", rank_correlation(original, maps)))
    return out
