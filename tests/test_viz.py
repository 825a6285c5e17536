"""The pictures' inputs: a batch where one image is wanted, lists of other lengths, an opacity in percent."""
import numpy as np
import pytest
import torch

from helpers import viz


def test_overlay_blends_a_map_over_its_image_with_known_values():
    image, cam = torch.full((3, 4, 4), 0.5), torch.zeros(4, 4)
    want = 0.5 * 0.5 + 0.5 * np.array(viz.colormaps["jet"](0.0)[:3])
    assert np.allclose(viz.overlay(image, cam, 0.5), want)


@pytest.mark.parametrize("run, error, message", [
    (lambda: viz.to_hwc(torch.rand(2, 3, 8, 8)), ValueError, r"one image \[3, H, W\] \(for a batch, pass x\[i\]\), got \[2, 3, 8, 8\]"),
    (lambda: viz.to_hwc(np.zeros((3, 8, 8))), TypeError, "image must be a torch.Tensor"),
    (lambda: viz.overlay(torch.rand(3, 8, 8), torch.rand(8, 8), alpha=50), ValueError, "alpha must be an opacity between 0 and 1, got 50"),
    (lambda: viz.overlay(torch.rand(3, 8, 8), torch.rand(1, 8, 8)), ValueError, r"cam must be one map \[H, W\]"),
    (lambda: viz.prediction_bars([0.5, 0.6], ["cat"], [True, None], 1), ValueError, "one entry per exit, got 2, 1 and 2"),
    (lambda: viz.exit_strip(torch.rand(3, 8, 8), torch.rand(2, 8, 8), [True, False], 3), ValueError,
     "chosen must be a whole number between 1 and 2, got 3"),
    (lambda: viz.enlarged(torch.rand(3, 8, 8), None, 0.5, 0), ValueError, "scale must be a whole number >= 1, got 0"),
])
def test_bad_inputs_get_one_line_each(run, error, message):
    with pytest.raises(error, match=message) as e:
        run()
    assert "\n" not in str(e.value)
