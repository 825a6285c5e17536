"""Grad-CAM against independent computations (explicit autograd on the feature map, captum's
LayerGradCam), a constructed case with a known answer, the refusal of maps that cannot explain an
exit, and the model left as it was found."""
import resource

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import gradcam, msdnet
from helpers.gradcam import Site


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = msdnet.build("tiny")
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode BN is not the identity
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def explicit_gradcam(model, x, exit):
    """Selvaraju et al. written out on the map model.forward hands back for this exit."""
    x = x.clone()
    with torch.enable_grad():
        logits, feats = model(x, return_features=True)
        z, a = logits[exit - 1], feats[exit - 1]
        score = z.gather(1, z.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(score, a)
    w = g.mean(dim=(2, 3))
    return F.relu((w[:, :, None, None] * a.detach()).sum(1))


@pytest.mark.parametrize("exit", [1, 2, 4])
def test_maps_equal_explicit_autograd_on_the_feature_map(model, images, exit):
    want = explicit_gradcam(model, images, exit)
    got = gradcam.gradcam(model, images, exit=exit, raw=True)
    assert got.shape == want.shape == (3, 8, 8)
    assert want.abs().sum() > 0 and torch.allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("exit", [1, 3])
def test_maps_equal_captums_layer_gradcam(model, images, exit):
    from captum.attr import LayerGradCam

    target = model(images)[exit - 1].argmax(1)
    cam = LayerGradCam(lambda x: model(x, exits=exit)[exit - 1], model.classifiers[exit - 1])
    want = cam.attribute(images, target=target, attribute_to_layer_input=True, relu_attributions=True)[:, 0]
    got = gradcam.gradcam(model, images, exit=exit, raw=True)
    assert torch.allclose(got, want.detach(), atol=1e-6, rtol=1e-5)


def test_a_score_raised_by_one_region_lights_up_that_region_only():
    region = torch.zeros(4, 4)
    region[:2, 1:3] = 1  # 4 of the 16 positions
    fmap = torch.stack([region, torch.rand(4, 4)])[None].requires_grad_()  # channel 1 does not matter
    score = (fmap[:, 0] * region).sum()
    cam = gradcam.class_activation_map(score, fmap, retain_graph=True)[0]
    assert torch.equal(cam > 0, region.bool())
    assert torch.allclose(cam, region * 4 / 16)  # weight = mean gradient = 4/16, times the map
    cam_pp = gradcam.class_activation_map(score, fmap, "gradcam++")[0]
    assert torch.allclose(cam_pp, region * 4 / (2 + 4))  # alpha = 1/(2 + sum A) on the region, summed over it


def test_normalized_maps_are_image_sized_and_in_0_1(model, images):
    maps = gradcam.gradcam_all_exits(model, images)
    assert maps.shape == (3, 4, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1
    flat = maps.flatten(2)
    assert torch.all((flat.amax(-1) == 1) | (flat.amax(-1) == 0))


def test_all_exits_at_once_equal_one_exit_at_a_time(model, images):
    together = gradcam.gradcam_all_exits(model, images, raw=True)
    for k in range(1, 5):
        assert torch.allclose(together[:, k - 1], gradcam.gradcam(model, images, exit=k, raw=True), atol=1e-6)


def test_target_can_be_the_prediction_a_label_or_any_class(model, images):
    logits = model(images)[1]
    pred = logits.argmax(1)
    by_default = gradcam.compute(model, images, [2])
    assert torch.equal(by_default.targets[:, 0], pred)
    assert torch.equal(gradcam.compute(model, images, [2], target=7).targets[:, 0], torch.full((3,), 7))
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(gradcam.compute(model, images, [2], target=labels).targets[:, 0], labels)
    with pytest.raises(ValueError, match="between 0 and 9"):
        gradcam.compute(model, images, [2], target=10)
    with pytest.raises(ValueError, match="one class index per image"):
        gradcam.compute(model, images, [2], target=torch.tensor([1, 2]))
    # A CIFAR-10 class name is a class too; anything else is refused in words, not a TypeError.
    assert torch.equal(gradcam.compute(model, images, [2], target="cat").targets[:, 0], torch.full((3,), 3))
    for bad in ("unicorn", 2.5, torch.tensor([0.5, 1.0, 2.0]), True, [None]):
        with pytest.raises(ValueError, match="target must be None or 'predicted'"):
            gradcam.compute(model, images, [2], target=bad)
    # "true" is the same set everywhere: here it names the labels given beside the images.
    assert torch.equal(gradcam.compute(model, images, [2], target="true", labels=labels).targets[:, 0], labels)
    with pytest.raises(ValueError, match="target='true' needs the true labels"):
        gradcam.compute(model, images, [2], target="true")


def test_latest_site_is_the_last_map_of_that_size_the_exit_depends_on(model):
    # tiny preset: block 1 holds modules 0..2, all three with 32, 16 and 8 pixel maps. Its last module's
    # 32x32 map reaches B3 (two strided layers follow it) but not B2 (one follows), so the latest
    # 32x32 map behind B2 is module 1's; the coarsest map behind B4 is the one its classifier reads.
    assert gradcam.latest_site(model, 3, 32) == Site(1, 2, 32)
    assert gradcam.latest_site(model, 3) == Site(1, 2, 32)  # the finest is the default
    assert list(gradcam.latest_sites(model, 3)) == [8, 16, 32]  # every size, from one pass, coarsest first
    assert gradcam.latest_sites(model, 3)[32] == Site(1, 2, 32)
    assert gradcam.latest_site(model, 2) == Site(1, 1, 32)
    assert Site(1, 2, 32) in gradcam.sites(model, 3) and Site(1, 2, 32) not in gradcam.sites(model, 2)
    assert gradcam.latest_site(model, 4, 8) == Site(4, len(model.blocks[3]) - 1, 8)  # default_site(4) writes it -1
    with pytest.raises(ValueError, match="exit B1 depends on maps of \\[8, 16, 32\\] pixels, not 4"):
        gradcam.latest_site(model, 1, 4)


def test_finer_maps_of_earlier_layers_explain_an_exit_and_the_rest_are_refused(model, images):
    # tiny preset: 5 MSD layers (2, 1, 1, 1 per block); a 32x32 map needs two MSD layers to reach 8x8
    block_1_out = Site(1, len(model.blocks[0]) - 1, 32)  # sites() numbers modules from 0
    assert block_1_out not in gradcam.sites(model, 2)
    assert block_1_out in gradcam.sites(model, 3)
    fine = gradcam.gradcam(model, images, exit=3, site=Site(1, -1, 32), raw=True)
    assert fine.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="does not influence exit B2"):
        gradcam.gradcam(model, images, exit=2, site=Site(1, -1, 32))
    with pytest.raises(ValueError, match="block 3 runs after it"):
        gradcam.gradcam(model, images, exit=2, site=Site(3))
    with pytest.raises(ValueError, match="no 32x32 map"):
        gradcam.gradcam(model, images, exit=4, site=Site(4, -1, 32))
    for bad in (5, 0, 2.5, "3"):
        with pytest.raises(ValueError, match="exit must be a whole number between 1 and 4"):
            gradcam.gradcam(model, images, exit=bad)
        with pytest.raises(ValueError, match="exit must be a whole number between 1 and 4"):
            gradcam.sites(model, bad)


def test_every_listed_site_has_a_nonzero_gradient(model, images):
    """sites(model, k) lists exactly the maps exit k's score depends on: each gets a gradient that is not
    all zero, and the maps of the same block and scale that are not listed get none."""
    for exit in range(1, 5):
        listed = set(gradcam.sites(model, exit))
        with torch.enable_grad():
            maps = {}
            for step in model.walk(images.clone().requires_grad_(True), exit, intermediates=True):
                for i, outputs in enumerate(step.intermediates):
                    maps.update({Site(step.number, i, t.shape[-1]): t for t in outputs})
            grads = torch.autograd.grad(step.logits.max(1).values.sum(), list(maps.values()), allow_unused=True)
        for (site, fmap), g in zip(maps.items(), grads):
            if site in listed:
                assert g is not None and g.abs().sum() > 0, site
                assert gradcam.gradcam(model, images, exit=exit, site=site, raw=True).shape[-1] == site.size
            else:
                assert g is None or g.abs().sum() == 0, site


def test_works_under_no_grad_and_leaves_the_model_as_it_was(model, images):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        maps = gradcam.gradcam(model, images, exit=2)
        gradcam.sites(model, 2)
    assert maps.abs().sum() > 0 and model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # eval mode: BN stats untouched
    assert all(p.grad is None for p in model.parameters())


def test_a_frozen_model_gives_the_same_maps_and_inference_mode_is_refused_clearly(model, images):
    """Freezing the parameters (a common way to serve a model) must not hide the maps: the gradient
    Grad-CAM needs is the feature map's, not the weights'."""
    want = gradcam.gradcam_all_exits(model, images, raw=True)
    want_sites, want_guided = gradcam.sites(model, 3), gradcam.guided_gradcam(model, images, exit=2)
    model.requires_grad_(False)
    try:
        assert torch.equal(gradcam.gradcam_all_exits(model, images, raw=True), want)
        assert gradcam.sites(model, 3) == want_sites
        assert torch.equal(gradcam.guided_gradcam(model, images, exit=2), want_guided)
        with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.inference_mode\(\) turns off"):
            gradcam.gradcam(model, images)
    finally:
        model.requires_grad_(True)


def test_the_exit_defaults_to_the_last_and_any_integer_names_one(model, images):
    last = gradcam.gradcam(model, images, exit=4, raw=True)
    assert torch.equal(gradcam.gradcam(model, images, raw=True), last)  # the tiny model has 4 exits, not 10
    for exit in (np.int64(4), torch.tensor(4)):  # a slider's value, an argmax
        assert torch.equal(gradcam.gradcam(model, images, exit=exit, raw=True), last)
    assert torch.equal(gradcam.guided_backprop(model, images), gradcam.guided_backprop(model, images, exit=4))
    assert len(model(images, exits=np.int64(2))) == 2
    for bad in (True, np.True_, torch.tensor(True), 4.0, torch.tensor(4.0)):
        with pytest.raises(ValueError, match="must be a whole number between 1 and 4"):
            gradcam.gradcam(model, images, exit=bad)


def test_a_site_is_a_site_or_a_plain_tuple_and_anything_else_is_refused_clearly(model, images):
    want = gradcam.gradcam(model, images, exit=3, site=Site(1, -1, 32), raw=True)
    assert torch.equal(gradcam.gradcam(model, images, exit=3, site=(1, -1, 32), raw=True), want)
    assert torch.equal(gradcam.gradcam(model, images, exit=3, site=(np.int64(1), -1, 32), raw=True), want)
    for bad, shown in ((model.blocks[0], r"a module \(Sequential\)"), ("block 1", "'block 1'"), (3, "3")):
        with pytest.raises(TypeError, match=r"site must be a gradcam.Site\(block, module, size\).* got " + shown):
            gradcam.gradcam(model, images, exit=3, site=bad)
    # the first layer makes all three scales; the error lists them, not only the maps the call kept
    with pytest.raises(ValueError, match=r"no 7x7 map \(its scales: \[32, 16, 8\]\)"):
        gradcam.gradcam(model, images, exit=2, site=Site(1, -1, 7))


def test_an_error_midway_leaves_no_hooks_and_restores_the_mode(model):
    model.train()
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\]"):
        gradcam.gradcam(model, torch.rand(2, 1, 32, 32), exit=2)
    assert model.training
    model.eval()
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_memory_stays_flat_over_a_thousand_calls(model, images):
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    for _ in range(50):
        gradcam.gradcam_all_exits(model, images)
    start = rss_mb()
    for _ in range(1000):
        gradcam.gradcam_all_exits(model, images)
    assert rss_mb() - start < 20


def test_maps_for_a_split_equal_the_batched_maps_and_are_cached(model, tiny_folder, tmp_path):
    from helpers import data

    split = data.load("test", source=tiny_folder)
    maps = gradcam.maps_for_split(model, split, batch_size=7, cache_dir=tmp_path)
    want = gradcam.gradcam_all_exits(model, split.images.float() / 255, raw=True)
    assert maps.shape == (len(split), 4, 8, 8) and torch.allclose(maps, want, atol=1e-6)
    true = gradcam.maps_for_split(model, split, target="true", cache_dir=tmp_path)
    assert torch.allclose(true, gradcam.gradcam_all_exits(model, split.images.float() / 255, target=split.labels, raw=True),
                          atol=1e-6)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    again = gradcam.maps_for_split(model, split, cache_dir=tmp_path)
    assert torch.equal(again, maps)
    # Any other target compute takes is taken here too, and cached apart from the others.
    cats = gradcam.maps_for_split(model, split, target="cat", batch_size=7, cache_dir=tmp_path)
    assert torch.allclose(cats, gradcam.gradcam_all_exits(model, split.images.float() / 255, target=3, raw=True), atol=1e-6)
    assert not torch.allclose(cats, maps)
    assert len(list(tmp_path.glob("*.pt"))) == 3
    with pytest.raises(ValueError, match="one class index per image"):
        gradcam.maps_for_split(model, split, target=torch.tensor([1, 2]), cache_dir=tmp_path)


@pytest.mark.parametrize("exit", [1, 3, 4])
def test_maps_equal_pytorch_grad_cams_applied_as_a_user_would(model, images, exit):
    """jacobgil's pytorch-grad-cam on a wrapper that returns exit k's logits, hooked on the map its
    classifier reads; it upsamples and scales to [0, 1] as gradcam() does."""
    from pytorch_grad_cam import GradCAM

    class OneExit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.tap = model, torch.nn.Identity()

        def forward(self, x):
            xs = self.net.standardize(x)
            for block in self.net.blocks[:exit]:
                xs = block(xs)
            return self.net.classifiers[exit - 1](self.tap(xs[-1]))

    wrapper = OneExit().eval()
    with GradCAM(model=wrapper, target_layers=[wrapper.tap]) as cam:
        theirs = torch.from_numpy(cam(input_tensor=images, targets=None))
    assert torch.allclose(gradcam.gradcam(model, images, exit=exit), theirs, atol=1e-5)


@pytest.mark.parametrize("exit", [1, 3])
def test_guided_backprop_equals_captums(model, images, exit):
    from captum.attr import GuidedBackprop

    class OneExit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x, exits=exit)[exit - 1]

    target = model(images, exits=exit)[exit - 1].argmax(1)
    with pytest.warns(UserWarning):  # captum says it sets hooks on the ReLUs
        theirs = GuidedBackprop(OneExit()).attribute(images.clone(), target=target)
    ours = gradcam.guided_backprop(model, images, exit=exit)
    assert ours.shape == images.shape and ours.abs().sum() > 0
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_map(model, images):
    g = gradcam.guided_gradcam(model, images, exit=2, target=4)
    want = gradcam.guided_backprop(model, images, exit=2, target=4) * gradcam.gradcam(model, images, exit=2, target=4)[:, None]
    assert g.shape == (3, 3, 32, 32) and torch.allclose(g, want)
    # Where the map is zero, Guided Grad-CAM is zero whatever the fine gradient says.
    cam = gradcam.gradcam(model, images, exit=2, target=4)
    assert (g.abs().sum(1)[cam == 0] == 0).all()
    # The model is left as it was: plain ReLUs, no hooks, the same answers.
    assert all(type(m).forward is torch.nn.ReLU.forward and "forward" not in vars(m)
               for m in model.modules() if isinstance(m, torch.nn.ReLU))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_layercam_weighs_each_position_by_its_positive_gradient(model, images):
    """LayerCAM written out: ReLU(sum_k ReLU(dy/dA_k) * A_k), element-wise, on the map classifier 3 reads."""
    x = images.clone()
    with torch.enable_grad():
        logits, feats = model(x, return_features=True)
        z, a = logits[2], feats[2]
        (g,) = torch.autograd.grad(z.gather(1, z.argmax(1, keepdim=True)).sum(), a)
    want = F.relu((g.clamp(min=0) * a.detach()).sum(1))
    got = gradcam.gradcam(model, images, exit=3, method="layercam", raw=True)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, gradcam.gradcam(model, images, exit=3, raw=True), atol=1e-3)  # not Grad-CAM


def test_every_registered_method_has_a_title_and_reaches_the_explorer():
    from helpers import explorer  # noqa: F401  (the explorer builds its buttons from the registry)

    assert [m.title for m in gradcam.METHODS.values()] == ["Grad-CAM", "Grad-CAM++", "LayerCAM"]
    with pytest.raises(ValueError, match="method must be one of"):
        gradcam.compute(msdnet.build("tiny").eval(), torch.rand(1, 3, 32, 32), [1], method="scorecam")


def test_uint8_images_get_the_models_own_message(model):
    x = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    for run in (lambda: gradcam.gradcam(model, x, exit=2), lambda: gradcam.guided_backprop(model, x, exit=2),
                lambda: gradcam.gradcam_all_exits(model, x)):
        with pytest.raises(TypeError, match=r"convert uint8 images with x.float\(\) / 255"):
            run()


def test_a_numpy_array_gets_one_line_saying_how_to_convert_it(model, images):
    array = images.numpy()
    for run in (lambda: gradcam.gradcam(model, array, exit=2), lambda: gradcam.gradcam_all_exits(model, array),
                lambda: gradcam.guided_gradcam(model, array, exit=2), lambda: gradcam.guided_backprop(model, array)):
        with pytest.raises(TypeError, match=r"Grad-CAM takes a torch.Tensor of float images \[B, 3, H, W\] in \[0, 1\], "
                                            r"got ndarray; convert it with torch.from_numpy\(x\)") as e:
            run()
        assert "\n" not in str(e.value)


def test_maps_for_a_split_of_floats_in_0_1_are_those_of_its_uint8_copy(model, tiny_folder, tmp_path):
    from helpers import data

    split = data.load("test", source=tiny_folder)
    want = gradcam.maps_for_split(model, split, cache=False)
    floats = data.Split(split.images.float() / 255, split.labels)
    assert torch.allclose(gradcam.maps_for_split(model, floats, cache=False), want, atol=1e-6)  # not divided twice
    with pytest.raises(ValueError, match="float between 0 and 2"):
        gradcam.maps_for_split(model, data.Split(split.images.float(), split.labels), cache=False)
    for size in (0, -3):
        with pytest.raises(ValueError, match=f"batch_size must be a whole number >= 1, got {size}"):
            gradcam.maps_for_split(model, split, batch_size=size, cache=False)
    with pytest.raises(ValueError, match=r"one integer label per image, \[20\], got torch.int64 \[19\]"):
        gradcam.maps_for_split(model, data.Split(split.images, split.labels[:19]), cache=False)


def test_a_stored_map_file_of_another_shape_is_recomputed_with_one_warning(model, tiny_folder, tmp_path):
    import warnings

    from helpers import data

    split = data.load("test", source=tiny_folder)
    want = gradcam.maps_for_split(model, split, cache_dir=tmp_path)
    (path,) = tmp_path.glob("gradcam-*.pt")
    for other in ({"maps": torch.zeros(len(split), 2, 8, 8)}, {"logits": torch.zeros(3)}):
        torch.save(other, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = gradcam.maps_for_split(model, split, cache_dir=tmp_path)
        assert torch.equal(got, want)
        (said,) = [str(w.message) for w in caught]
        assert said.startswith(f"the cache file {path} holds something else (") and "\n" not in said


def test_mismatched_sites_and_exits_are_refused_in_one_line(model, images):
    with pytest.raises(ValueError, match="give one site per exit: 2 exits, got 1 sites"):
        gradcam.compute(model, images, [1, 2], site=[Site(1, -1, 8)])
    with pytest.raises(TypeError, match="exits must be a list of exit numbers"):
        gradcam.compute(model, images, 3)
    with pytest.raises(ValueError, match=r"size must be a whole number >= 1, got 0"):
        gradcam.normalize(torch.rand(2, 8, 8), 0)
