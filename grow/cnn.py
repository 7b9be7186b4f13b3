"""Growable CNN families built from RepConv2d (docs/design.md §8).

A model starts "empty": a stem and the downsampling layers only. Stage 0 runs at the stem's
resolution; every later stage starts with a stride-2 downsampling layer. Depth growth inserts
family layers into a stage; width growth adds re-parameterizable branches to RepConv2d convs.

Families and their layer: ``vgg`` (3x3 conv-BN-ReLU), ``resnet`` (basic block), ``bottleneck``
(1x1-3x3-1x1, 4x reduction), ``mobilenetv3`` (1x1 expand 4x, depthwise 3x3, SE, SiLU, 1x1 project).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .reparam import RepConv2d

FAMILIES = ("vgg", "resnet", "bottleneck", "mobilenetv3")
DEFAULT_WIDTHS = {"vgg": (64, 96, 128), "resnet": (64, 96, 128), "bottleneck": (64, 96, 128),
                  "mobilenetv3": (32, 64, 96)}
SPEC_NAMES = {"vgg": "VGG", "resnet": "ResNet", "bottleneck": "Bottleneck", "mobilenetv3": "MobileNetV3"}


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> RepConv2d:
    return RepConv2d(cin, cout, k, stride, groups, branches=(f"conv{k}x{k}",))


class ConvLayer(nn.Sequential):
    """RepConv2d + activation (VGG layers, stems and downsampling layers)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, act: str = "relu"):
        super().__init__(_conv(cin, cout, 3, stride), nn.SiLU() if act == "silu" else nn.ReLU())


class BasicBlock(nn.Module):
    """ResNet basic block: conv-ReLU-conv, identity add, ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = _conv(c, c, 3), _conv(c, c, 3)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.conv2.branch_modules[0].bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3, 1x1 expand, identity add, ReLU."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        mid = max(c // reduction, 8)
        self.conv1, self.conv2, self.conv3 = _conv(c, mid, 1), _conv(mid, mid, 3), _conv(mid, c, 1)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.conv3.branch_modules[0].bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(x + self.conv3(y))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, max(c // reduction, 8), 1), nn.Conv2d(max(c // reduction, 8), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """MobileNetV3-style block: 1x1 expand, depthwise 3x3, SE, SiLU, 1x1 project, identity add."""

    def __init__(self, c: int, expand: int = 4):
        super().__init__()
        e = c * expand
        self.expand, self.dw, self.project = _conv(c, e, 1), _conv(e, e, 3, groups=e), _conv(e, c, 1)
        self.se = SqueezeExcite(e)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.project.branch_modules[0].bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.dw(nn.functional.silu(self.expand(x))))
        return x + self.project(self.se(y))


def make_layer(family: str, c: int) -> nn.Module:
    """A new growable layer of ``family`` at width ``c`` (the family's own initialisation)."""
    if family == "vgg":
        return ConvLayer(c, c)
    if family == "resnet":
        return BasicBlock(c)
    if family == "bottleneck":
        return Bottleneck(c)
    if family == "mobilenetv3":
        return InvertedResidual(c)
    raise ValueError(f"unknown CNN family {family!r}; expected one of {FAMILIES}")


def importance(module: nn.Module, exclude: set[int] = frozenset()) -> float | None:
    """Mean |gamma| over the BatchNorms inside ``module``, skipping every submodule whose ``id`` is
    in ``exclude`` (just-inserted layers and branches, whose gamma is still its initial value).
    None when no BatchNorm is left."""
    gammas, stack = [], [module]
    while stack:
        m = stack.pop()
        if id(m) in exclude:
            continue
        if isinstance(m, nn.BatchNorm2d):
            gammas.append(m.weight.detach().abs().flatten())
        stack.extend(m.children())
    return float(torch.cat(gammas).mean()) if gammas else None


def _preserving_init(layer: nn.Module) -> None:
    """Make a new layer add nothing (residual: last BN gamma = 0) or pass its input through
    (plain VGG layer: Dirac kernel, BN scaled to undo its eval-mode normalisation; exact because
    the input is non-negative after the previous ReLU)."""
    if hasattr(layer, "last_bn"):
        nn.init.zeros_(layer.last_bn().weight)
        return
    branch = layer[0].branch_modules[0]
    with torch.no_grad():
        nn.init.dirac_(branch.conv.weight)
        bn = branch.bn
        bn.weight.copy_((bn.running_var + bn.eps).sqrt())
        bn.bias.copy_(bn.running_mean)


class GrowingCNN(nn.Module):
    """A growable CNN. ``depths[i]`` family layers in stage i (after its downsampling layer).

    Input ``[B, in_channels, H, W]`` -> logits ``[B, num_classes]``.
    """

    def __init__(self, family: str = "vgg", widths: tuple[int, ...] | None = None, in_channels: int = 1,
                 num_classes: int = 10, depths: tuple[int, ...] | None = None):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown CNN family {family!r}; expected one of {FAMILIES}")
        widths = tuple(widths or DEFAULT_WIDTHS[family])
        if len(widths) not in (3, 4):
            raise ValueError(f"widths must give 3 or 4 stages (2 or 3 downsamplings), got {widths}")
        depths = tuple(depths or (0,) * len(widths))
        if len(depths) != len(widths) or min(depths) < 0:
            raise ValueError(f"depths {depths} must give a non-negative layer count per stage {widths}")
        self.family, self.widths = family, widths
        self.in_channels, self.num_classes = in_channels, num_classes
        act = "silu" if family == "mobilenetv3" else "relu"
        self.stem = ConvLayer(in_channels, widths[0], act=act)
        self.stages = nn.ModuleList()
        for i, w in enumerate(widths):
            stage = nn.ModuleList([ConvLayer(widths[i - 1], w, stride=2, act=act)] if i else [])
            stage.extend(make_layer(family, w) for _ in range(depths[i]))
            self.stages.append(stage)
        self.head = nn.Linear(widths[-1], num_classes)

    @property
    def depths(self) -> list[int]:
        return [len(s) - (1 if i else 0) for i, s in enumerate(self.stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
        return self.head(x.mean((2, 3)))

    def spec(self) -> str:
        """Architecture spec such as ``"VGG-2-3-2"`` (family layers per stage)."""
        return "-".join([SPEC_NAMES[self.family], *map(str, self.depths)])

    def arch(self) -> dict[str, Any]:
        """Everything needed to rebuild the structure: depths, and every RepConv2d's branches."""
        return {"type": "cnn", "family": self.family, "widths": list(self.widths), "in_channels": self.in_channels,
                "num_classes": self.num_classes, "depths": self.depths,
                "convs": {n: {"kernel_size": list(m.kernel_size), "branches": m.branches}
                          for n, m in self.named_modules() if isinstance(m, RepConv2d)}}

    def adagrow_arch(self) -> dict[str, Any]:
        """The architecture record (``adagrow.archs``): the family names it."""
        return {"name": self.family, "args": {k: v for k, v in self.arch().items() if k not in ("type", "family")}}

    # ------------------------------------------------------------------ growth operations
    def insert_layer(self, stage: int, position: int, preserve: bool = False) -> nn.Module:
        """Insert a family layer at ``position`` of ``stage`` (0 = first; in a later stage position
        0 is before its downsampling layer, so use >= 1). ``preserve``: residual layers get their
        last BN's gamma = 0 (they add exactly zero), plain VGG layers an identity kernel, so the
        eval-mode output is unchanged; otherwise the family's own init (the thesis)."""
        if not 0 <= stage < len(self.stages) or not (1 if stage else 0) <= position <= len(self.stages[stage]):
            raise ValueError(f"cannot insert at stage {stage} position {position} of {self.spec()}")
        layer = make_layer(self.family, self.widths[stage])
        ref = next(self.parameters())
        layer.to(device=ref.device, dtype=ref.dtype).train(self.training)
        if preserve:
            _preserving_init(layer)
        self.stages[stage].insert(position, layer)
        return layer

    def rep_convs(self) -> dict[str, RepConv2d]:
        return {n: m for n, m in self.named_modules() if isinstance(m, RepConv2d)}

    def param_counts(self) -> tuple[int, int]:
        """(deploy params: every RepConv2d fused, train-time params)."""
        train = sum(p.numel() for p in self.parameters())
        fused = 0
        for conv in self.rep_convs().values():
            kh, kw = conv.kernel_size
            fused += conv.out_channels * conv.in_channels // conv.groups * kh * kw + conv.out_channels
            train -= sum(p.numel() for p in conv.parameters())
        return train + fused, sum(p.numel() for p in self.parameters())


def branch_space(conv: RepConv2d, max_kernel: int | None = None) -> list[str]:
    """Branch specs a conv may gain. ``max_kernel=None`` keeps the deploy kernel: only footprints
    that fit in it (they fuse at no deploy cost); an int lets a kxk conv grow its kernel up to
    ``max_kernel`` x ``max_kernel`` (1x1 convs stay 1x1)."""
    kh, kw = conv.kernel_size
    if (kh, kw) == (1, 1):
        specs = ["conv1x1"]
    else:
        lim = (kh, kw) if max_kernel is None else (max(kh, max_kernel), max(kw, max_kernel))
        specs = [s for s in ("conv1x1", "conv3x3", "conv1x3", "conv3x1", "conv3x5", "conv5x3", "conv5x5", "avg3x3")
                 if all(int(v) <= m for v, m in zip(s[-3:].split("x"), lim))]
    if conv.in_channels == conv.out_channels and conv.stride == 1:
        specs.append("bn")
    return specs


def flops(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of Conv2d / Linear layers for one forward of ``example`` (batch included)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    return total
