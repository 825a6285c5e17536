"""MSD-Net: sizes against the official implementation, shapes per scale and exit, early exit, bad input."""
import math

import pytest
import torch
from torch import nn

from helpers import msdnet
from helpers.msdnet import MSDNetConfig

# The official code (kalviny/MSDNet-PyTorch) builds 4,839,544 parameters for
# --nBlocks 10 --stepmode even --base 4 --step 2 --nChannels 16 --growthRate 6 --grFactor 1-2-4
# --bnFactor 1-2-4 --prune max --reduction 0.5 --bottleneck true on CIFAR-10.
OFFICIAL_CIFAR10_ANYTIME_PARAMS = 4_839_544


def official_param_count(cfg: MSDNetConfig) -> int:
    """Parameters of the official MSDNet, by arithmetic on its channel rules (no modules built)."""
    gr, bnf, S = cfg.gr_factor, cfg.bn_factor, len(cfg.gr_factor)

    def conv_bn(cin, cout, k):  # conv without bias + BatchNorm (weight, bias)
        return cin * cout * k * k + 2 * cout

    def path(cin, cout, bn_width):  # ConvBN: 1x1 bottleneck, 3x3 conv
        inner = min(cin, bn_width * cout) if cfg.bottleneck else cin
        return (conv_bn(cin, inner, 1) if cfg.bottleneck else 0) + conv_bn(inner, cout, 3)

    total = conv_bn(3, cfg.n_channels * gr[0], 3) + sum(
        conv_bn(cfg.n_channels * gr[i - 1], cfg.n_channels * gr[i], 3) for i in range(1, S)
    )
    steps = [cfg.base] + [cfg.step] * (cfg.n_blocks - 1)
    n_all, interval, c, layer = sum(steps), math.ceil(sum(steps) / S), cfg.n_channels, 0
    for n in steps:
        for _ in range(n):
            layer += 1
            s_in = S - math.floor(max(0, layer - 2) / interval)
            s_out = S - math.floor((layer - 1) / interval)
            off, g = S - s_out, cfg.growth_rate
            if s_in > s_out:
                total += path(c * gr[off - 1], g * gr[off] // 2, bnf[off - 1]) + path(c * gr[off], g * gr[off] // 2, bnf[off])
            else:
                total += path(c * gr[off], g * gr[off], bnf[off])
            for i in range(off + 1, S):
                total += path(c * gr[i - 1], g * gr[i] // 2, bnf[i - 1]) + path(c * gr[i], g * gr[i] // 2, bnf[i])
            c += g
            if s_in > s_out:
                c_new = math.floor(cfg.reduction * c)
                total += sum(conv_bn(c * gr[off + i], c_new * gr[off + i], 1) for i in range(s_out))
                c = c_new
        w = cfg.classifier_channels
        total += conv_bn(c * gr[-1], w, 3) + conv_bn(w, w, 3) + w * cfg.num_classes + cfg.num_classes
    assert n_all == layer
    return total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar10_anytime_has_the_official_parameter_count():
    assert official_param_count(msdnet.PRESETS["cifar10-anytime"]) == OFFICIAL_CIFAR10_ANYTIME_PARAMS
    assert n_params(msdnet.build("cifar10-anytime")) == OFFICIAL_CIFAR10_ANYTIME_PARAMS


@pytest.mark.parametrize("preset", ["seed", "tiny"])
def test_other_presets_match_the_official_channel_rules(preset):
    assert n_params(msdnet.build(preset)) == official_param_count(msdnet.PRESETS[preset])


def test_seed_preset_is_cifar10_anytime_with_32_channels():
    assert msdnet.PRESETS["seed"] == msdnet.PRESETS["cifar10-anytime"].__class__(n_channels=32)
    assert msdnet.PRESETS["cifar10-anytime"].layers_per_block == [4] + [2] * 9  # 22 layers


def scales_after_each_block(model, x):
    xs, out = x, []
    for block in model.blocks:
        xs = block(xs)
        out.append([tuple(t.shape[1:]) for t in xs])
    return out


def test_scales_and_channels_after_each_block():
    model = msdnet.build("cifar10-anytime").eval()
    with torch.no_grad():
        shapes = scales_after_each_block(model, torch.rand(2, 3, 32, 32))
    # Blocks 1-3 keep 32x32, 16x16 and 8x8; blocks 4-7 drop 32x32; blocks 8-10 keep only 8x8.
    assert [[s[1] for s in b] for b in shapes] == [[32, 16, 8]] * 3 + [[16, 8]] * 4 + [[8]] * 3
    # Finest-scale channels: 16 + 6 per layer; a transition (after layers 9 and 17) halves them.
    # Block 1: 16+4*6=40 -> (40, 80, 160). Block 4: layer 9 gives 70 -> 35, layer 10 gives 41 -> (82, 164).
    assert shapes[0] == [(40, 32, 32), (80, 16, 16), (160, 8, 8)]
    assert shapes[3] == [(82, 16, 16), (164, 8, 8)]
    coarsest = [b[-1][0] for b in shapes]
    assert coarsest == [160, 208, 256, 164, 212, 260, 308, 188, 236, 284]


def test_features_are_what_each_classifier_reads():
    model = msdnet.build("cifar10-anytime").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        assert len(logits) == len(feats) == 10
        for k in range(10):
            assert feats[k].shape == (3, [160, 208, 256, 164, 212, 260, 308, 188, 236, 284][k], 8, 8)
            assert logits[k].shape == (3, 10)
            assert torch.allclose(model.classifiers[k](feats[k]), logits[k])


def test_early_exit_runs_no_later_block():
    model = msdnet.build("cifar10-anytime").eval()
    calls = []
    for i, m in enumerate(list(model.blocks) + list(model.classifiers)):
        m.register_forward_hook(lambda mod, inp, out, i=i: calls.append(i))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        early = model(x, exits=3)
        assert sorted(calls) == [0, 1, 2, 10, 11, 12]  # blocks 1-3 and classifiers 1-3 only
        full = model(x)
    assert len(early) == 3
    for a, b in zip(early, full[:3]):
        assert torch.allclose(a, b)


def test_model_normalizes_its_input():
    model = msdnet.build("tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(msdnet.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(msdnet.CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        xs = (x - mean) / std
        for block in model.blocks:
            xs = block(xs)
        assert torch.allclose(model(x)[-1], model.classifiers[-1](xs[-1]))


def test_exit_costs_are_cumulative_and_match_the_reference():
    costs = msdnet.exit_costs(msdnet.build("cifar10-anytime"))
    assert [c.exit for c in costs] == list(range(1, 11))
    assert costs[-1].params == OFFICIAL_CIFAR10_ANYTIME_PARAMS
    assert round(costs[-1].macs / 1e6, 1) == 121.0  # about 121.0 M multiply-accumulates, counted by torch.utils.flop_counter
    assert all(a.params < b.params and a.macs < b.macs for a, b in zip(costs, costs[1:]))


def test_exit_costs_equal_a_count_by_hand():
    # Every conv costs c_in * c_out * k * k per output pixel, every linear layer in * out.
    model = msdnet.build("tiny").eval()
    macs = []
    def count(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            macs.append(mod.in_channels * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1] * out.shape[2] * out.shape[3])
        elif isinstance(mod, nn.Linear):
            macs.append(mod.in_features * mod.out_features)
    for m in model.modules():
        m.register_forward_hook(count)
    by_hand = []
    for k in (1, 2, 3, 4):
        macs.clear()
        with torch.no_grad():
            model(torch.zeros(1, 3, 32, 32), exits=k)
        by_hand.append(sum(macs))
    assert [c.macs for c in msdnet.exit_costs(model)] == by_hand


def test_classifier_costs_equal_a_count_by_hand():
    # The classifier alone: its convs and its linear layer, counted by hand on the map it reads.
    model = msdnet.build("tiny").eval()
    feats = model(torch.zeros(1, 3, 32, 32), return_features=True)[1]
    by_hand = []
    for clf, f in zip(model.classifiers, feats):
        macs = []
        hooks = [m.register_forward_hook(lambda mod, i, out: macs.append(
            mod.in_channels * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1] * out.shape[2] * out.shape[3]
            if isinstance(mod, nn.Conv2d) else mod.in_features * mod.out_features))
            for m in clf.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        with torch.no_grad():
            clf(f)
        by_hand.append(sum(macs))
        for h in hooks:
            h.remove()
    costs = msdnet.exit_costs(model)
    assert [c.classifier_macs for c in costs] == by_hand
    assert all(0 < c.classifier_macs < c.macs for c in costs)


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.rand(2, 3, 28, 28), ValueError, "32x32"),
        (torch.rand(2, 1, 32, 32), ValueError, "RGB"),
        (torch.rand(2, 4, 32, 32), ValueError, "RGB"),
        (torch.rand(3, 32, 32), ValueError, "batch dimension"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "/ 255"),
        (torch.rand(2, 3, 32, 32) * 255, ValueError, "divide 0..255 images by 255"),
        (torch.rand(2, 3, 32, 32) - 0.5, ValueError, "undo any normalization"),
        (torch.rand(2, 3, 32, 32).index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), ValueError, "NaN or infinite"),
        (torch.full((1, 3, 32, 32), float("inf")), ValueError, "NaN or infinite"),
    ],
)
def test_bad_images_get_a_clear_error(x, error, words):
    with pytest.raises(error, match=words.replace("/", r"\/")):
        msdnet.build("tiny")(x)


@pytest.mark.parametrize("exits", [0, 5, -1, 2.5, "3", True])
def test_exit_out_of_range_is_refused(exits):
    with pytest.raises(ValueError, match="whole number between 1 and 4"):
        msdnet.build("tiny")(torch.rand(1, 3, 32, 32), exits=exits)


def test_float64_images_give_the_float32_answer():
    model = msdnet.build("tiny").eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x)[-1], model(x.float())[-1], atol=1e-5)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="cifar10-anytime"):
        msdnet.build("resnet")


def test_config_round_trips_through_plain_types():
    cfg = msdnet.PRESETS["seed"]
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, bool, list)) for v in d.values())
    assert MSDNetConfig.from_dict(d) == cfg


def test_the_coarsest_size_comes_from_the_config_and_is_what_classifiers_read():
    from helpers import gradcam

    for name in ("tiny", "cifar10-anytime"):
        model = msdnet.build(name).eval()
        with torch.no_grad():
            _, feats = model(torch.rand(1, 3, 32, 32), return_features=True)
        assert feats[0].shape[-1] == model.config.coarsest_size == gradcam.default_site(1, model).size == 8
    # 64x64 images with four scales: the coarsest map is 64 / 2**3 = 8 too, the classifiers' size
    big = msdnet.MSDNetConfig(image_size=64, gr_factor=(1, 2, 4, 8), bn_factor=(1, 2, 4, 8))
    assert big.coarsest_size == 8


def test_walk_yields_each_exit_and_goes_on_from_the_maps_it_is_handed_back():
    model = msdnet.build("tiny").eval()
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        numbers, kept = [], []
        for exit in model.walk(x):
            numbers.append(exit.number)
            kept.append(exit.logits)
            exit.maps = [t[1:] for t in exit.maps]  # drop the first image before the next block
    assert numbers == [1, 2, 3, 4]
    # Exit k saw k - 1 narrowings: the full run's logits for images k-1.. (each image is independent).
    for k, logits in enumerate(kept, start=1):
        torch.testing.assert_close(logits, full[k - 1][k - 1 :])
    with torch.no_grad():
        assert [e.number for e in model.walk(x, upto=2)] == [1, 2]


def test_path_to_names_the_modules_an_exit_depends_on_in_order():
    model = msdnet.build("tiny")
    names = [name for name, _ in model.path_to(3)]
    assert names == ["block 1", "block 2", "block 3", "classifier 3"]
    (_, last), = model.path_to(3)[-1:]
    assert last is dict(model.named_children())["classifiers"][2]
    with pytest.raises(ValueError, match="between 1 and 4"):
        model.path_to(5)


def test_eval_mode_gives_the_model_back_module_by_module():
    model = msdnet.build("tiny")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Training, with the batch-norm layers frozen in eval mode (a common fine-tuning set-up).
    model.train()
    for bn in bns:
        bn.eval()
    with msdnet.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not any(bn.training for bn in bns)
    # In eval mode with one batch-norm layer left in training mode: its statistics must not move.
    model.eval()
    bns[0].train()
    before = bns[0].running_mean.clone()
    with msdnet.eval_mode(model), torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    assert bns[0].training and not model.training


def test_the_value_check_runs_on_the_cpu_and_compiles_without_a_graph_break():
    model = msdnet.build("tiny").eval()
    with pytest.raises(ValueError, match=r"images in \[0, 1\]"):
        model(torch.full((1, 3, 32, 32), 255.0))
    explanation = torch._dynamo.explain(lambda x: model.standardize(x))(torch.rand(2, 3, 32, 32))
    assert explanation.graph_break_count == 0
