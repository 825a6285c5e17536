"""The measures behind the series' verdicts, on constructed maps and predictions with known answers."""
import math

import pytest
import torch

from helpers import analysis, evaluate, gradcam, msdnet


def maps_from(*cells_lit: list[tuple[int, int]]) -> torch.Tensor:
    """One image, one exit per argument: an 8x8 map with value 1 at the listed cells."""
    out = torch.zeros(1, len(cells_lit), 8, 8)
    for e, cells in enumerate(cells_lit):
        for y, x in cells:
            out[0, e, y, x] = 1.0
    return out


def test_span_entropy_and_validity_have_their_known_values():
    four = [(0, 0), (0, 1), (1, 0), (1, 1)]
    maps = maps_from(four, [(3, 3)], [])
    maps[0, 1, 5, 5] = 0.4  # under half the peak: not part of the span, but in the entropy
    assert analysis.span(maps)[0, :2].tolist() == [4 / 64, 1 / 64]
    assert analysis.valid(maps).tolist() == [[True, True, False]]
    flat = torch.ones(1, 1, 8, 8)
    assert analysis.entropy(flat).item() == pytest.approx(1.0) and analysis.span(flat).item() == 1.0
    assert analysis.entropy(maps_from([(2, 2)])).item() == pytest.approx(0.0)
    assert analysis.entropy(maps_from(four)).item() == pytest.approx(math.log(4) / math.log(64))


def test_map_correlation_and_consistency():
    a = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.cat([a, 2 * a + 1, -a, a], 1)  # same shape, a positive rescaling, a negative one, the same
    corr = analysis.map_correlation(maps)
    assert torch.allclose(corr[:, 0, 1], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(corr[:, 0, 2], -torch.ones(3, dtype=torch.float64))
    assert torch.allclose(analysis.consistency(maps), corr[:, :, -1])
    assert torch.allclose(analysis.consistency(maps)[:, -1], torch.ones(3, dtype=torch.float64))


def test_overthinking_is_right_early_and_wrong_at_the_last_exit():
    # image 0: right, right, wrong; image 1: wrong, right, right; image 2: right, wrong, wrong
    right, wrong = [3.0, 0.0], [0.0, 3.0]
    logits = torch.tensor([[right, right, wrong], [wrong, right, right], [right, wrong, wrong]])
    preds = evaluate.Predictions(logits, torch.zeros(3, dtype=torch.long))
    assert analysis.overthinking(preds).tolist() == [[True, True, False], [False, False, False], [True, False, False]]


def test_bootstrap_interval_matches_the_normal_approximation_for_a_mean():
    v = torch.tensor([0.0, 1.0]).repeat(5000)  # mean 0.5, standard error 0.005
    mean, low, high = analysis.bootstrap_ci(v, n_boot=2000, seed=0)
    assert mean == 0.5 and low == pytest.approx(0.5 - 1.96 * 0.005, abs=0.001) and high == pytest.approx(0.5 + 1.96 * 0.005, abs=0.001)
    assert analysis.bootstrap_ci(torch.full((10,), 3.0)) == (3.0, 3.0, 3.0)
    assert analysis.bootstrap_ci(v, seed=1) == analysis.bootstrap_ci(v, seed=1)  # seeded


def test_the_verdict_rule():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, generator=g)
    assert analysis.judge(noise + 0.5).word == "SUPPORTED"
    assert analysis.judge(noise - 0.5).word == "CONTRADICTED"
    assert analysis.judge(noise - noise.mean()).word == "NOT SUPPORTED"
    v = analysis.judge(noise + 0.5)
    assert v.low < v.effect < v.high and str(v).startswith("SUPPORTED (+0.")


def test_a_class_whose_best_exit_really_differs_is_told_from_noise():
    """Three classes, two exits. Class 0 (400 images): exit 1 right on all, exit 2 on 280: a real
    difference. Class 1 (400): both right on the same 360, and exit 1 on one more: best by a hair, which
    the rule must not call a difference. Class 2 (800): only exit 2 is right, which makes it best overall."""
    def logit(c: int) -> list[float]:
        return [5.0 if j == c else 0.0 for j in range(3)]

    rows, labels = [], []
    for i in range(400):
        rows.append([logit(0), logit(0 if i < 280 else 2)]); labels.append(0)
    for i in range(400):
        rows.append([logit(1 if i < 361 else 0), logit(1 if i < 360 else 0)]); labels.append(1)
    for i in range(800):
        rows.append([logit(0), logit(2)]); labels.append(2)
    preds = evaluate.Predictions(torch.tensor(rows), torch.tensor(labels))
    result = analysis.class_best_exits(preds)
    assert result.overall == 2 and result.best.tolist() == [1, 1, 2]  # exit numbers: B1, B1, B2
    assert result.verdicts[0].word == "SUPPORTED" and result.verdicts[0].effect == pytest.approx(0.3)
    assert result.verdicts[1].word == "NOT SUPPORTED" and result.verdicts[1].effect == pytest.approx(1 / 400)
    assert result.verdicts[2].effect == 0.0


def test_the_best_exit_null_tells_real_class_differences_from_selection_noise():
    """Two exits, two classes of 500. Real: exit 1 is right on all of class 0 and half of class 1, exit 2
    the other way round: each class's best exit gains 0.5 over the overall best, far above any random
    grouping (p at its floor 1/(n+1)). Noise: both exits right at random with the same rate, the
    classes play no part: the gain is what random groups give (p not small)."""
    def preds_from(right: torch.Tensor, labels: torch.Tensor) -> evaluate.Predictions:
        # right [N, exits] bool -> logits whose argmax is the label where right, another class where wrong
        wrong_class = 1 - labels
        cls = torch.where(right, labels[:, None], wrong_class[:, None])
        return evaluate.Predictions(torch.nn.functional.one_hot(cls, 2).float() * 5, labels)

    labels = torch.cat([torch.zeros(500), torch.ones(500)]).long()
    half = torch.arange(1000) % 2 == 0
    right = torch.stack([(labels == 0) | half, (labels == 1) | half], 1)
    real = analysis.best_exit_null(preds_from(right, labels), n_perm=200)
    assert real.gain == pytest.approx(0.25)  # class 0: exit 1 = 1.0 vs overall best exit 1 -> 0; class 1: 1.0 - 0.5
    assert real.p_value == pytest.approx(1 / 201) and real.null_mean < 0.05

    g = torch.Generator().manual_seed(1)
    noise = analysis.best_exit_null(preds_from(torch.rand(1000, 2, generator=g) < 0.8, labels), n_perm=200)
    assert noise.p_value > 0.05
    assert noise.gain == pytest.approx(noise.null_mean, abs=0.03)


def test_rank_correlation_handles_monotone_maps_and_ties():
    a = torch.tensor([[0.0, 0.0, 1.0, 2.0, 5.0]])
    assert analysis.rank_correlation(a, a.exp()).item() == pytest.approx(1.0)
    assert analysis.rank_correlation(a, -a).item() == pytest.approx(-1.0)
    # Ties share their average rank: [1.5, 1.5, 3, 4, 5] against [1, 2, 3, 4, 5].
    want = torch.corrcoef(torch.tensor([[1.5, 1.5, 3, 4, 5], [1.0, 2, 3, 4, 5]]))[0, 1].item()
    assert analysis.rank_correlation(a, torch.arange(5.0)[None]).item() == pytest.approx(want)


def test_cascading_randomization_goes_from_the_top_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps = analysis.cascading_randomization(model, x, exit=3)
    assert [name for name, _ in steps] == ["up to classifier 3", "up to block 3", "up to block 2", "up to block 1"]
    assert all(r.shape == (4,) and ((-1 <= r) & (r <= 1 + 1e-9)).all() for _, r in steps)
    assert steps[-1][1].mean() < 0.9  # with every weight re-drawn, the maps are others
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = analysis.cascading_randomization(model, x, exit=3)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(steps, again))  # seeded
    with pytest.raises(ValueError, match="exit must be a whole number"):
        analysis.cascading_randomization(model, x, exit=7)


def test_two_groups_are_judged_by_their_difference_in_means():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(500, generator=g) + 1.0, torch.randn(300, generator=g)])
    group = torch.arange(800) < 500
    v = analysis.judge_groups(values, group)
    assert v.word == "SUPPORTED" and v.effect == pytest.approx(values[:500].mean() - values[500:].mean())
    assert v.low < v.effect < v.high and v.high - v.low == pytest.approx(2 * 1.96 * (1 / 500 + 1 / 300) ** 0.5, rel=0.15)
    assert analysis.judge_groups(values, ~group).word == "CONTRADICTED"
    with pytest.raises(ValueError, match="at least 2 images"):
        analysis.judge_groups(values, torch.arange(800) < 1)


def test_a_nan_gets_no_verdict():
    values = torch.tensor([0.1, 0.2, float("nan"), 0.3])
    with pytest.raises(ValueError, match="1 of 4 values are NaN or infinite"):
        analysis.judge(values)
    with pytest.raises(ValueError, match="NaN or infinite"):
        analysis.judge_groups(values, torch.tensor([True, True, False, False]))


def test_a_0_1_integer_group_is_refused_not_used_as_indices():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(500, generator=g) + 1.0, torch.randn(300, generator=g)])
    as_ints = (torch.arange(800) < 500).long()  # values[as_ints] would pick images 0 and 1, 800 times
    with pytest.raises(ValueError, match=r"group must be bool \[800\], .* got torch.int64 \[800\]; .* group == 1") as e:
        analysis.judge_groups(values, as_ints)
    assert "\n" not in str(e.value)
    assert analysis.judge_groups(values, as_ints == 1).word == "SUPPORTED"
    with pytest.raises(ValueError, match=r"group must be bool \[800\]"):
        analysis.judge_groups(values, as_ints[:10] == 1)


@pytest.mark.parametrize("kw, error, message", [
    ({"level": 95}, ValueError, r"level must be a share between 0 and 1 \(0.95 for a 95% interval\), got 95"),
    ({"level": 1.0}, ValueError, "strictly between 0 and 1"),
    ({"n_boot": 0}, ValueError, "n_boot must be a whole number >= 1, got 0"),
    ({"n_boot": 100.0}, TypeError, "n_boot must be a whole number >= 1, got 100.0"),
    ({"seed": -1}, ValueError, "seed must be a whole number >= 0, got -1"),
])
def test_judge_refuses_a_percent_level_and_no_resamples_in_one_line(kw, error, message):
    values = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for run in (lambda: analysis.judge(values, **kw), lambda: analysis.bootstrap_ci(values, **kw),
                lambda: analysis.judge_groups(values, torch.arange(50) < 25, **kw)):
        with pytest.raises(error, match=message):
            run()


def test_judge_refuses_a_list_or_a_table_in_one_line():
    with pytest.raises(TypeError, match=r"values must be a torch.Tensor, one number per image, \[N\], got list; "
                                        r"convert it with torch.as_tensor"):
        analysis.judge([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"values must be one number per image, \[N\], got torch.float32 \[2, 3\]"):
        analysis.judge(torch.rand(2, 3))
    assert analysis.judge(torch.tensor([0.9, 1.1, 1.0, 1.05]), n_boot=50).word == "SUPPORTED"


def test_maps_of_another_shape_and_a_span_level_in_percent_are_refused():
    with pytest.raises(ValueError, match=r"maps must be float \[N, exits, h, w\] .* got torch.float32 \[3, 8, 8\]"):
        analysis.span(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="level must be a share of the map's maximum between 0 and 1"):
        analysis.span(torch.rand(1, 2, 8, 8), level=50)
    with pytest.raises(ValueError, match="reference must be a whole number between -2 and 1, got 2"):
        analysis.consistency(torch.rand(1, 2, 8, 8), reference=2)
