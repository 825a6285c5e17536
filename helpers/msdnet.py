"""Multi-Scale Dense Network (Huang et al., ICLR 2018), as the paper and its official code define it.

The network keeps feature maps at several scales at once (32x32, 16x16 and 8x8 on CIFAR).
Each MSD layer adds new features at every scale it keeps: at the finest scale from a regular
3x3 convolution, at a coarser scale from a strided convolution of the next-finer map *and* a
regular convolution of the same scale, both concatenated to the input (dense connectivity).
As depth grows the finest scales are pruned, and a 1x1 transition halves the channels.
A classifier after every block reads the coarsest map, so the network can stop after any
block ("anytime prediction"): exits B1..B10.

Public API::

    model = build("cifar10-anytime")          # or "seed", or an MSDNetConfig
    logits = model(x)                         # x: float [B,3,32,32] in [0,1] -> list of [B,classes]
    logits = model(x, exits=3)                # only blocks 1..3 run
    logits, feats = model(x, return_features=True)  # feats[k]: the map classifier k reads
    exit_costs(model)                         # cumulative (params, MACs) at each exit
"""
from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "PRESETS",
    "MSDNetConfig",
    "MSDNet",
    "MSDLayer",
    "ExitCost",
    "build",
    "exit_costs",
    "exit_number",
    "eval_mode",
]

# The statistics the official code normalizes CIFAR-10 with.
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


@dataclass(frozen=True)
class MSDNetConfig:
    """Hyperparameters, named as in the official code (nBlocks -> n_blocks, ...)."""

    n_blocks: int = 10
    step_mode: str = "even"  # "even": every block after the first has `step` layers; "lin_grow": step*i+1
    base: int = 4  # layers in the first block
    step: int = 2
    n_channels: int = 16  # channels of the finest scale after the first layer
    growth_rate: int = 6  # new channels per layer at the finest scale
    gr_factor: tuple[int, ...] = (1, 2, 4)  # growth (and width) multiplier per scale; its length = number of scales
    bn_factor: tuple[int, ...] = (1, 2, 4)  # bottleneck width = bn_factor * path output channels
    bottleneck: bool = True
    prune: str = "max"
    reduction: float = 0.5  # transition layers keep this share of the channels
    num_classes: int = 10
    classifier_channels: int = 128
    image_size: int = 32
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def __post_init__(self) -> None:
        if len(self.gr_factor) != len(self.bn_factor):
            raise ValueError("gr_factor and bn_factor need one entry per scale")
        if self.prune != "max":
            raise ValueError(f"prune={self.prune!r} is not supported; this implementation builds prune='max'")
        if self.step_mode not in ("even", "lin_grow"):
            raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {self.step_mode!r}")

    @property
    def n_scales(self) -> int:
        return len(self.gr_factor)

    @property
    def coarsest_size(self) -> int:
        """Side of the coarsest map, the one every classifier reads (8 for CIFAR's 32x32 and 3 scales)."""
        return self.image_size // 2 ** (self.n_scales - 1)

    @property
    def layers_per_block(self) -> list[int]:
        later = [self.step if self.step_mode == "even" else self.step * i + 1 for i in range(1, self.n_blocks)]
        return [self.base, *later]

    def to_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with weights_only=True."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MSDNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MSDNetConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, MSDNetConfig] = {
    # The paper's CIFAR anytime setting.
    "cifar10-anytime": MSDNetConfig(),
    # The blog's model: the same, twice as wide at the start.
    "seed": MSDNetConfig(n_channels=32),
    # Not from the paper: a small network (4 exits, about 0.1 M parameters) for quick demos and tests.
    "tiny": MSDNetConfig(n_blocks=4, base=2, step=1, n_channels=8, growth_rate=4, classifier_channels=32),
}


def _scales_after_layer(layer: int, total_layers: int, n_scales: int) -> tuple[int, int]:
    """(scales in, scales out) of 1-based layer `layer` under prune='max', as in the official code:
    the finest scale is dropped every ceil(total/n_scales) layers."""
    interval = math.ceil(total_layers / n_scales)
    scales_in = n_scales - max(0, layer - 2) // interval
    scales_out = n_scales - (layer - 1) // interval
    return scales_in, scales_out


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class ConvPath(nn.Sequential):
    """1x1 bottleneck (at most bn_width * c_out channels), then a 3x3 conv, strided or regular."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int) -> None:
        layers: list[nn.Module] = []
        c_inner = c_in
        if bottleneck:
            c_inner = min(c_in, bn_width * c_out)
            layers.append(ConvBNReLU(c_in, c_inner, kernel=1))
        layers.append(ConvBNReLU(c_inner, c_out, kernel=3, stride=stride))
        super().__init__(*layers)


class ScaleUnit(nn.Module):
    """The output of one MSD layer at one scale: [x_s, strided(x_{s-1}), regular(x_s)] concatenated.
    At the finest scale kept there is no finer map, so no strided path."""

    def __init__(self, regular: ConvPath, strided: ConvPath | None) -> None:
        super().__init__()
        self.strided = strided
        self.regular = regular

    def forward(self, same: Tensor, finer: Tensor | None = None) -> Tensor:
        parts = [same]
        if self.strided is not None:
            parts.append(self.strided(finer))
        parts.append(self.regular(same))
        return torch.cat(parts, dim=1)


class MSDLayer(nn.Module):
    """One MSD layer: takes `scales_in` maps (finest first), returns `scales_out` maps.

    When a scale is pruned (scales_in = scales_out + 1) the finest input is used only through
    the strided path of the next coarser scale, then dropped.
    """

    def __init__(self, c_in: int, growth: int, cfg: MSDNetConfig, scales_in: int, scales_out: int) -> None:
        super().__init__()
        self.scales_in, self.scales_out = scales_in, scales_out
        first = cfg.n_scales - scales_out  # absolute index of the finest scale produced
        pruning = scales_in > scales_out
        gr, bn = cfg.gr_factor, cfg.bn_factor
        self.units = nn.ModuleList()
        for s in range(first, cfg.n_scales):
            c_out = growth * gr[s]
            if s == first and not pruning:
                self.units.append(ScaleUnit(ConvPath(c_in * gr[s], c_out, 1, cfg.bottleneck, bn[s]), None))
            else:  # half of the new channels from each path
                regular = ConvPath(c_in * gr[s], c_out // 2, 1, cfg.bottleneck, bn[s])
                strided = ConvPath(c_in * gr[s - 1], c_out // 2, 2, cfg.bottleneck, bn[s - 1])
                self.units.append(ScaleUnit(regular, strided))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) != self.scales_in:
            raise ValueError(f"MSDLayer expects {self.scales_in} scales, got {len(xs)}")
        shift = self.scales_in - self.scales_out  # 1 when the finest input is being pruned
        out = []
        for i, unit in enumerate(self.units):
            j = i + shift  # index of this output's own scale among the inputs
            out.append(unit(xs[j], xs[j - 1] if unit.strided is not None else None))
        return out


class FirstLayer(nn.Module):
    """3x3 conv at full resolution, then each coarser scale a strided 3x3 conv of the previous one."""

    def __init__(self, cfg: MSDNetConfig) -> None:
        super().__init__()
        widths = [cfg.n_channels * g for g in cfg.gr_factor]
        self.convs = nn.ModuleList(
            [ConvBNReLU(3, widths[0], stride=1)]
            + [ConvBNReLU(widths[i - 1], widths[i], stride=2) for i in range(1, len(widths))]
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class Transition(nn.Module):
    """1x1 conv per kept scale, shrinking every scale's channels by the same factor."""

    def __init__(self, widths_in: list[int], widths_out: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList([ConvBNReLU(a, b, kernel=1) for a, b in zip(widths_in, widths_out)])

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class Classifier(nn.Module):
    """The head of one exit: two strided 3x3 convs on the coarsest map, average pool, linear."""

    def __init__(self, c_in: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(c_in, width, stride=2), ConvBNReLU(width, width, stride=2), nn.AvgPool2d(2)
        )
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x).flatten(1))


class MSDNet(nn.Module):
    """MSD-Net with one classifier per block. Inputs are images in [0, 1]; the model normalizes them."""

    def __init__(self, cfg: MSDNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        self.blocks = nn.ModuleList()
        self.classifiers = nn.ModuleList()
        total = sum(cfg.layers_per_block)
        c = cfg.n_channels  # channels at the finest scale; scale s has c * gr_factor[s]
        layer = 0
        for b, n_layers in enumerate(cfg.layers_per_block):
            modules: list[nn.Module] = [FirstLayer(cfg)] if b == 0 else []
            for _ in range(n_layers):
                layer += 1
                s_in, s_out = _scales_after_layer(layer, total, cfg.n_scales)
                modules.append(MSDLayer(c, cfg.growth_rate, cfg, s_in, s_out))
                c += cfg.growth_rate
                if s_in > s_out and cfg.reduction > 0:
                    kept = cfg.gr_factor[cfg.n_scales - s_out :]
                    c_new = math.floor(cfg.reduction * c)
                    modules.append(Transition([c * g for g in kept], [c_new * g for g in kept]))
                    c = c_new
            self.blocks.append(nn.Sequential(*modules))
            self.classifiers.append(Classifier(c * cfg.gr_factor[-1], cfg.classifier_channels, cfg.num_classes))
        self._init_weights()

    @property
    def n_exits(self) -> int:
        return len(self.blocks)

    def _init_weights(self) -> None:
        # As the official code: He-normal (fan-out) convs, BN at identity, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def check_input(self, x: Tensor) -> None:
        size = self.config.image_size
        if not isinstance(x, Tensor):
            raise TypeError(f"MSDNet expects a torch.Tensor of images, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"MSDNet expects float images in [0, 1], got dtype {x.dtype}; "
                "convert uint8 images with x.float() / 255 (or torchvision.transforms.ToTensor())"
            )
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"MSDNet expects images shaped [batch, 3, {size}, {size}] (RGB, {size}x{size}), got {list(x.shape)}; "
                f"add a batch dimension with x[None], convert grayscale or RGBA to RGB, "
                f"and resize to {size}x{size} (e.g. torchvision.transforms.Resize(({size}, {size})))"
            )
        # One reduction, cheap beside the network: NaN fails both comparisons, so it is caught too.
        # The small margin lets resampling overshoot (bilinear, antialias) through.
        if x.numel() and not ((x >= -0.01) & (x <= 1.01)).all():
            finite = x[torch.isfinite(x)]
            if finite.numel() < x.numel():
                raise ValueError(
                    f"MSDNet got {x.numel() - finite.numel()} NaN or infinite pixel values; "
                    "check the images (and whatever computed them) before calling the model"
                )
            raise ValueError(
                f"MSDNet expects images in [0, 1], got values from {finite.min().item():.3g} to {finite.max().item():.3g}; "
                "divide 0..255 images by 255, and undo any normalization (the model normalizes by itself)"
            )

    def normalize(self, x: Tensor) -> Tensor:
        """Checked images [B, 3, H, W] in [0, 1] -> the first layer's input: in the model's dtype,
        standardized with the dataset's mean and std. Every way into the network starts here."""
        self.check_input(x)
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward(
        self, x: Tensor, exits: int | None = None, return_features: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Logits of exits B1..B`exits` (all by default). Blocks after the last exit asked for never run.

        With return_features, also the coarsest-scale map each classifier reads.
        """
        n = self.n_exits if exits is None else exit_number(exits, self.n_exits, "exits")
        xs = self.normalize(x)
        logits, feats = [], []
        for k in range(n):
            xs = self.run_block(k, xs)
            feats.append(xs[-1])
            logits.append(self.classifiers[k](xs[-1]))
        return (logits, feats) if return_features else logits

    def run_block(self, k: int, xs, on_module=None) -> list[Tensor]:
        """Block k (0-based) on the maps xs (the normalized image for k = 0, else the previous block's
        maps, finest first); returns its maps. on_module(i, maps), if given, sees the output of each of
        the block's modules in turn (Grad-CAM keeps the maps it explains). Every way through the network
        (forward, Grad-CAM, real early exit) runs its blocks here."""
        block = self.blocks[k]
        if on_module is None:
            return block(xs)
        for i, module in enumerate(block):
            xs = module(xs)
            on_module(i, xs)
        return xs


def build(preset: str | MSDNetConfig = "cifar10-anytime", **overrides) -> MSDNet:
    """An MSD-Net from a preset name (see PRESETS) or a config; keyword arguments override fields."""
    if isinstance(preset, MSDNetConfig):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or pass an MSDNetConfig")
    return MSDNet(replace(cfg, **overrides) if overrides else cfg)


class ExitCost(NamedTuple):
    """What reaching exit `exit` (1-based) costs: the parameters and the multiply-accumulates per image
    of the blocks and classifiers up to it, and of its own classifier alone (what skipping it saves)."""

    exit: int  # 1-based, B1..B10
    params: int  # parameters needed to compute this exit (blocks and classifiers up to it)
    macs: int  # multiply-accumulates per image to reach this exit, earlier classifiers included
    classifier_macs: int = 0  # this exit's classifier alone (part of macs): what skipping the exit saves


def exit_number(value, n_exits: int, name: str = "exit") -> int:
    """`value` as an exit number 1..n_exits (B1..Bn). Any integer will do: Python's, NumPy's, or a
    one-element integer tensor (a slider's or an argmax's value); bools, floats and the rest are refused."""
    refused = isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool)
    try:
        n = None if refused else operator.index(value)  # NumPy's bools have no __index__: refused here
    except TypeError:
        n = None
    if n is None or not 1 <= n <= n_exits:
        raise ValueError(f"{name} must be a whole number between 1 and {n_exits} (B1..B{n_exits}), got {value!r}")
    return n


@contextmanager
def eval_mode(model: nn.Module):
    """Borrow `model` in eval mode (batch-norm statistics used, not updated) and give it back in the mode
    it came in, however the block is left. Every function that borrows a caller's model uses it."""
    if not model.training:  # already: nothing to switch (and no walk over the modules, which costs per call)
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()


def exit_costs(model: MSDNet) -> list[ExitCost]:
    """Cumulative parameters and multiply-accumulates at each exit, counted by torch.utils.flop_counter
    (convolutions and linear layers; it counts 2 FLOPs per multiply-accumulate)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.image_size
    param = next(model.parameters())
    x = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    costs, params = [], 0
    with eval_mode(model), torch.no_grad():
        feats = model(x, return_features=True)[1]  # the map each classifier reads
        for k in range(1, model.n_exits + 1):
            counter, alone = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with counter:
                model(x, exits=k)
            with alone:
                model.classifiers[k - 1](feats[k - 1])
            params += sum(p.numel() for m in (model.blocks[k - 1], model.classifiers[k - 1]) for p in m.parameters())
            costs.append(ExitCost(k, params, counter.get_total_flops() // 2, alone.get_total_flops() // 2))
    return costs
