"""The figure of the network is drawn from the model itself: for any preset its scales per block, the scales
pruned and the map each classifier reads are the ones the model's forward pass produces."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from helpers import msdnet, viz  # noqa: E402


@pytest.mark.parametrize("preset", ["cifar10-anytime", "tiny"])
def test_the_layout_is_what_the_network_computes(preset):
    model = msdnet.build(preset).eval()
    layout = viz.network_layout(model)
    assert layout == viz.network_layout(preset)
    x = torch.rand(1, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        exits = list(model.walk(x))
    assert len(layout.exits) == len(exits) == model.n_exits
    for exit, (number, scale, channels) in zip(exits, layout.exits):
        kept = [kept for block, _, kept in layout.columns if block == exit.number][-1]
        assert number == exit.number
        assert [layout.sizes[s] for s in kept] == [m.shape[-1] for m in exit.maps]  # the scales after the block
        assert layout.sizes[scale] == exit.features.shape[-1] and channels == exit.features.shape[1]
    # a scale, once pruned, never comes back, and the coarsest is never pruned
    for s in range(len(layout.sizes)):
        present = [s in kept for _, _, kept in layout.columns]
        assert present == sorted(present, reverse=True)
    assert all(len(layout.sizes) - 1 in kept for _, _, kept in layout.columns)


def test_the_paper_network_keeps_three_two_then_one_scale():
    """The paper's CIFAR setting: blocks 1-3 keep three scales, 4-7 two (16x16, 8x8), 8-10 only 8x8."""
    layout = viz.network_layout("cifar10-anytime")
    after = [[kept for block, _, kept in layout.columns if block == b][-1] for b in range(1, 11)]
    assert [len(kept) for kept in after] == [3, 3, 3, 2, 2, 2, 2, 1, 1, 1]
    assert layout.sizes == [32, 16, 8] and {scale for _, scale, _ in layout.exits} == {2}


@pytest.mark.parametrize("preset", ["cifar10-anytime", "tiny"])
def test_the_figure_draws_every_module_classifier_and_pruned_scale(preset):
    layout = viz.network_layout(preset)
    ax = viz.show_network(preset)
    labels = [t.get_text() for t in ax.texts]
    assert [f"B{k}" for k in range(1, len(layout.exits) + 1)] == [t for t in labels if t.startswith("B")]
    assert [f"block {k}" for k in range(1, len(layout.exits) + 1)] == [t for t in labels if t.startswith("block")]
    n_scales = len(layout.sizes)
    hollow = [line for line in ax.lines if line.get_markerfacecolor() == "none"]
    assert len(hollow) == sum(n_scales - len(kept) for _, _, kept in layout.columns)
    assert len(ax.lines) == n_scales * len(layout.columns)
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{s}x{s}" for s in layout.sizes]
    matplotlib.pyplot.close(ax.figure)


def test_the_figure_refuses_what_is_not_a_network():
    with pytest.raises(Exception, match="MSDNet or a preset"):
        viz.network_layout(torch.nn.Linear(2, 2))
