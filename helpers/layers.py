"""The building blocks of MSD-Net: a conv path, the MSD layer, the first layer, transitions, classifiers.

Every module takes and returns a list of maps, one per scale kept, finest first (the first layer
takes the image). `msdnet.MSDNet` stacks them into blocks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .msdnet import MSDNetConfig

__all__ = ["ConvBNReLU", "ConvPath", "ScaleUnit", "MSDLayer", "FirstLayer", "Transition", "Classifier"]


class ConvBNReLU(nn.Sequential):
    """Convolution (no bias), batch norm, ReLU: the unit every path of the network is made of."""

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
