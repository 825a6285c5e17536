"""Deletion and insertion: the pixels go in the map's order, and the curves start and end where they must."""
import pytest
import torch

from helpers import faithfulness, msdnet


class Recorder(torch.nn.Module):
    """Stands in for the model: remembers every batch it sees and answers with a fixed softmax."""

    n_exits, config = 10, msdnet.MSDNetConfig()

    def __init__(self, mean):
        super().__init__()
        self.mean = mean
        self.seen = []
        self.eval()

    def forward(self, x, exits):
        self.seen.append(x.clone())
        logits = torch.zeros(len(x), 10)
        logits[:, 3] = x.mean(dim=(1, 2, 3)) * 10  # class 3's probability grows with brightness
        return [logits] * exits


def test_pixels_are_removed_and_inserted_most_important_first():
    images = torch.ones(1, 3, 4, 4)
    saliency = torch.arange(16.0).reshape(1, 4, 4)  # the last pixel is the most important
    fake = Recorder(torch.zeros(1, 3, 1, 1))
    curves = faithfulness.deletion_insertion(fake, images, saliency, exit=2, targets=torch.tensor([3]), steps=4)
    deletion_at_quarter, insertion_at_quarter = fake.seen[2], fake.seen[3]
    removed = deletion_at_quarter[0, 0] == 0
    assert removed.flatten().tolist() == [False] * 12 + [True] * 4
    assert torch.equal(insertion_at_quarter[0, 0] == 1, removed)
    assert curves.deletion.shape == curves.insertion.shape == (1, 5)
    assert (curves.deletion[0, 1:] <= curves.deletion[0, :-1]).all()  # darker and darker: class 3 fades
    assert (curves.insertion[0, 1:] >= curves.insertion[0, :-1]).all()


def test_curves_run_from_the_image_to_the_mean_image_on_the_real_model():
    model = msdnet.build("tiny").eval()
    images = torch.rand(3, 3, 32, 32)
    targets = torch.tensor([0, 4, 9])
    curves = faithfulness.deletion_insertion(model, images, torch.rand(3, 32, 32), exit=3, targets=targets, steps=4)
    prob = lambda x: model(x, exits=3)[2].softmax(-1).gather(1, targets[:, None]).squeeze(1)
    mean_image = model.mean.expand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(curves.deletion[:, 0], prob(images), atol=1e-6)
        assert torch.allclose(curves.deletion[:, -1], prob(mean_image), atol=1e-6)
        assert torch.allclose(curves.insertion[:, 0], prob(mean_image), atol=1e-6)
        assert torch.allclose(curves.insertion[:, -1], prob(images), atol=1e-6)
    d_auc, i_auc = curves.auc()
    assert d_auc.shape == (3,) and ((0 <= d_auc) & (d_auc <= 1)).all()


def test_a_saliency_of_the_wrong_shape_is_refused():
    model = msdnet.build("tiny").eval()
    with pytest.raises(ValueError, match="saliency must be"):
        faithfulness.deletion_insertion(model, torch.rand(2, 3, 32, 32), torch.rand(2, 8, 8), 1, torch.tensor([0, 1]))


def test_imputation_solves_the_neighbour_equations():
    """Known answers: a linear ramp is harmonic for these weights, so its removed pixels come back exactly;
    and every imputed pixel equals the weighted mean of its neighbours."""
    ramp = torch.linspace(0.1, 0.9, 8)[None, :].expand(8, 8)
    image = torch.stack([ramp, ramp.T, torch.full((8, 8), 0.5)])
    removed = torch.zeros(8, 8, dtype=torch.bool)
    removed[2:6, 3:7] = True
    filled = faithfulness.noisy_linear_impute(image, removed, noise=0.0)
    assert torch.allclose(filled, image, atol=1e-6)
    noise_image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    filled = faithfulness.noisy_linear_impute(noise_image, removed, noise=0.0).double()
    assert torch.equal(filled[:, ~removed], noise_image[:, ~removed].double())  # kept pixels untouched
    y, x = 3, 4  # an inner removed pixel: all eight neighbours exist
    mean = sum(wt * filled[:, y + dy, x + dx] for dy, dx, wt in faithfulness._NEIGHBOURS)
    assert torch.allclose(filled[:, y, x], mean, atol=1e-6)


def test_imputation_noise_is_seeded_and_everything_removed_is_refused():
    image, removed = torch.rand(3, 6, 6), torch.rand(6, 6) > 0.5
    a = faithfulness.noisy_linear_impute(image, removed, generator=torch.Generator().manual_seed(1))
    b = faithfulness.noisy_linear_impute(image, removed, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, faithfulness.noisy_linear_impute(image, removed, noise=0.0))
    with pytest.raises(ValueError, match="every pixel is removed"):
        faithfulness.noisy_linear_impute(image, torch.ones(6, 6, dtype=torch.bool))


def test_road_removes_the_most_or_least_relevant_pixels_first():
    images = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    saliency = torch.arange(16.0).reshape(1, 4, 4)  # the last pixels are the most relevant
    fake = Recorder(torch.zeros(1, 3, 1, 1))
    result = faithfulness.road(fake, images, saliency, exit=1, targets=torch.tensor([3]), percentiles=(25,), noise=0.0)
    morf, lerf = fake.seen  # 25%: four pixels each
    changed = lambda x: (x[0] != images[0]).any(0).flatten()
    assert changed(morf).tolist() == [False] * 12 + [True] * 4
    assert changed(lerf).tolist() == [True] * 4 + [False] * 12
    assert result.morf.shape == result.lerf.shape == (1, 1) and result.score().shape == (1,)


def test_targets_must_be_one_per_image_or_one_for_all():
    model = msdnet.build("tiny").eval()
    images, saliency = torch.rand(4, 3, 32, 32), torch.rand(4, 32, 32)
    for measure in (faithfulness.deletion_insertion, faithfulness.road):
        kw = {"percentiles": (50,)} if measure is faithfulness.road else {"steps": 2}
        with pytest.raises(ValueError, match=r"one class per image \(4\), or one class for all, got 3"):
            measure(model, images, saliency, 2, torch.tensor([1, 2, 3]), **kw)
        with pytest.raises(ValueError, match="between 0 and 9"):
            measure(model, images, saliency, 2, 10, **kw)
        one_for_all = measure(model, images, saliency, 2, 3, **kw)
        each = measure(model, images, saliency, 2, torch.full((4,), 3), **kw)
        assert all(torch.equal(a, b) for a, b in zip(one_for_all, each))


@pytest.mark.parametrize("percentiles, message", [
    ((0.5,), r"percents, not fractions: \[0.5\] would remove at most 1% of the pixels; pass \[50.0\]"),
    ((0.1, 0.5, 0.9), r"pass \[10.0, 50.0, 90.0\]"),
    ((-10, 50), r"strictly between 0 and 100, .* got \[-10.0, 50.0\]"),
    ((50, 100), "strictly between 0 and 100"),
    ((), "strictly between 0 and 100"),
])
def test_road_percentiles_as_fractions_or_out_of_range_are_refused_in_one_line(percentiles, message):
    fake = Recorder(torch.zeros(1, 3, 1, 1))
    images, saliency = torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4)
    with pytest.raises(ValueError, match=message) as e:
        faithfulness.road(fake, images, saliency, exit=1, targets=3, percentiles=percentiles)
    assert "\n" not in str(e.value) and fake.seen == []  # refused before any work
    one = faithfulness.road(fake, images, saliency, exit=1, targets=3, percentiles=(1,), noise=0.0)  # 1%: allowed
    assert one.percentiles.tolist() == [1.0]


def test_bad_steps_noise_and_saliency_are_refused_in_one_line():
    fake = Recorder(torch.zeros(1, 3, 1, 1))
    images, saliency = torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4)
    for kw, error, message in [({"steps": -1}, ValueError, "steps must be a whole number >= 1, got -1"),
                               ({"steps": 0}, ValueError, "steps must be a whole number >= 1, got 0"),
                               ({"steps": 2.5}, TypeError, "steps must be a whole number >= 1, got 2.5")]:
        with pytest.raises(error, match=message):
            faithfulness.deletion_insertion(fake, images, saliency, 1, 3, **kw)
    with pytest.raises(TypeError, match="saliency must be a torch.Tensor"):
        faithfulness.deletion_insertion(fake, images, saliency.numpy(), 1, 3)
    with pytest.raises(ValueError, match=r"noise must be a standard deviation between 0 and 1 \(0.01: 1% of the range\), got -0.1"):
        faithfulness.road(fake, images, saliency, 1, 3, noise=-0.1)
