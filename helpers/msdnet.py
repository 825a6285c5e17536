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

    for exit in model.walk(x, upto=5):        # the one way through the network: exit.number 1..5,
        exit.maps, exit.features, exit.logits #   the block's maps, the coarsest one, its classifier's logits
    model.path_to(5)                          # [(name, module)] that exit B5 depends on
"""
from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from .layers import Classifier, FirstLayer, MSDLayer, Transition

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "PRESETS",
    "MSDNetConfig",
    "MSDNet",
    "FirstLayer",
    "MSDLayer",
    "Exit",
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
        """How many scales the first layer makes (3 on CIFAR: 32x32, 16x16, 8x8)."""
        return len(self.gr_factor)

    @property
    def coarsest_size(self) -> int:
        """Side of the coarsest map, the one every classifier reads (8 for CIFAR's 32x32 and 3 scales)."""
        return self.image_size // 2 ** (self.n_scales - 1)

    @property
    def layers_per_block(self) -> list[int]:
        """MSD layers in each block, block 1 first (4, 2, 2, ... for the CIFAR presets)."""
        later = [self.step if self.step_mode == "even" else self.step * i + 1 for i in range(1, self.n_blocks)]
        return [self.base, *later]

    def to_dict(self) -> dict:
        """Plain types only, so a checkpoint holding it loads with weights_only=True."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MSDNetConfig":
        """The config saved by to_dict; unknown fields are refused."""
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


class MSDNet(nn.Module):
    """MSD-Net with one classifier per block. Inputs are images in [0, 1]; the model standardizes them."""

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
        """How many exits (blocks, each with its classifier) the network has."""
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
        """Raise one clear error unless `x` is a float tensor [B, 3, H, W] of images in [0, 1].

        The value range is read only for tensors on the CPU and outside torch.compile: on a GPU that
        reading would stall the forward pass until the device catches up.
        """
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
        if x.device.type != "cpu" or torch.compiler.is_compiling() or not x.numel():
            return
        # NaN fails both comparisons, so one reduction catches it too; the margin lets resampling overshoot through.
        if not ((x >= -0.01) & (x <= 1.01)).all():
            finite = x[torch.isfinite(x)]
            if finite.numel() < x.numel():
                raise ValueError(
                    f"MSDNet got {x.numel() - finite.numel()} NaN or infinite pixel values; "
                    "check the images (and whatever computed them) before calling the model"
                )
            raise ValueError(
                f"MSDNet expects images in [0, 1], got values from {finite.min().item():.3g} to {finite.max().item():.3g}; "
                "divide 0..255 images by 255, and undo any normalization (the model standardizes by itself)"
            )

    def standardize(self, x: Tensor) -> Tensor:
        """Check images and standardize them with the dataset's mean and std.

        Args:
            x: float images [B, 3, H, W] in [0, 1].
        Returns:
            [B, 3, H, W] in the model's dtype: the input of block 1.
        """
        self.check_input(x)
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def advance(self, block: int, maps: Tensor | list[Tensor]) -> list[Tensor]:
        """Run block `block` (1..n_exits).

        Args:
            block: the block's number, as the exit after it is numbered.
            maps: the standardized images [B, 3, H, W] for block 1, else the previous block's maps (finest first).
        Returns:
            the block's maps, one per scale it keeps, finest first.
        """
        return self.blocks[block - 1](maps)

    def classify(self, exit: int, maps: list[Tensor]) -> Tensor:
        """Classifier `exit` (1..n_exits) on the maps after block `exit`: logits [B, classes].
        A classifier reads only the coarsest map, maps[-1]."""
        return self.classifiers[exit - 1](maps[-1])

    def walk(self, x: Tensor, upto: int | None = None, intermediates: bool = False) -> Iterator["Exit"]:
        """Walk the network exit by exit; blocks after `upto` never run.

        The caller may narrow `exit.maps` (drop images) before asking for the next exit: the walk goes
        on from what it holds.

        Args:
            x: float images [B, 3, H, W] in [0, 1].
            upto: the last exit to reach (default: all).
            intermediates: keep every module's output maps of each block in `exit.intermediates`.
        Yields:
            Exit(number 1..upto) with its maps, features and (computed on demand) logits.
        """
        n = self.n_exits if upto is None else exit_number(upto, self.n_exits, "upto")
        maps: Tensor | list[Tensor] = self.standardize(x)
        for number in range(1, n + 1):
            kept = None
            if intermediates:
                kept = []
                for module in self.blocks[number - 1]:
                    maps = module(maps)
                    kept.append(maps)
            else:
                maps = self.advance(number, maps)
            exit = Exit(self, number, maps, kept)
            yield exit
            maps = exit.maps

    def forward(
        self, x: Tensor, exits: int | None = None, return_features: bool = False
    ) -> list[Tensor] | tuple[list[Tensor], list[Tensor]]:
        """Logits of exits B1..B`exits` (all by default); blocks after the last exit asked for never run.

        Args:
            x: float images [B, 3, H, W] in [0, 1].
            exits: how many exits to compute, 1..n_exits.
            return_features: also return the coarsest map each classifier reads.
        Returns:
            a list of `exits` logits [B, classes] (and of features [B, C_k, 8, 8]).
        """
        logits, feats = [], []
        for exit in self.walk(x, exits):
            feats.append(exit.features)
            logits.append(exit.logits)
        return (logits, feats) if return_features else logits

    def block_length(self, block: int) -> int:
        """How many modules (first layer, MSD layers, transitions) block `block` (1..n_exits) runs in turn."""
        return len(self.blocks[exit_number(block, self.n_exits, "block") - 1])

    def module_at(self, block: int, module: int) -> nn.Module:
        """The module at position `module` (from 0; -1: the last) of block `block` (1..n_exits)."""
        return self.blocks[exit_number(block, self.n_exits, "block") - 1][module]

    def path_to(self, exit: int) -> list[tuple[str, nn.Module]]:
        """The modules exit `exit` depends on, from the input to its classifier.

        Returns:
            [("block 1", module), ..., ("block k", module), ("classifier k", module)].
        """
        k = exit_number(exit, self.n_exits)
        return [(f"block {b}", self.blocks[b - 1]) for b in range(1, k + 1)] + [(f"classifier {k}", self.classifiers[k - 1])]


class Exit:
    """One step of MSDNet.walk: the state of the network after block `number`."""

    def __init__(self, model: MSDNet, number: int, maps: list[Tensor], intermediates: list | None) -> None:
        self.model, self.number = model, number
        self.intermediates = intermediates  # per module of the block: its output maps (walk(intermediates=True))
        self._maps, self._logits = maps, None

    @property
    def maps(self) -> list[Tensor]:
        """The block's maps, finest first; assign a narrower batch to go on with fewer images."""
        return self._maps

    @maps.setter
    def maps(self, value: list[Tensor]) -> None:
        self._maps, self._logits = value, None

    @property
    def features(self) -> Tensor:
        """The coarsest map [B, C, 8, 8]: what classifier `number` reads."""
        return self._maps[-1]

    @property
    def logits(self) -> Tensor:
        """Classifier `number`'s logits [B, classes], computed on first use."""
        if self._logits is None:
            self._logits = self.model.classify(self.number, self._maps)
        return self._logits


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
    """Borrow `model` in eval mode and give it back exactly as it came, module by module.

    Inside, batch-norm layers use their running statistics and never update them, whatever
    mode each module was in; on leaving, however the block is left, each module's mode is restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def exit_costs(model: MSDNet) -> list[ExitCost]:
    """Cumulative parameters and multiply-accumulates at each exit, counted by torch.utils.flop_counter.

    Convolutions and linear layers are counted; flop_counter counts 2 FLOPs per multiply-accumulate.
    Returns:
        one ExitCost per exit, B1 first.
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.image_size
    param = next(model.parameters())
    x = torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype)
    costs, params = [], 0
    with eval_mode(model), torch.no_grad():
        for exit in model.walk(x):
            k = exit.number
            counter, alone = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with counter:
                model(x, exits=k)
            with alone:
                model.classify(k, exit.maps)
            params += sum(p.numel() for _, m in model.path_to(k)[-2:] for p in m.parameters())
            costs.append(ExitCost(k, params, counter.get_total_flops() // 2, alone.get_total_flops() // 2))
    return costs
