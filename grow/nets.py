"""Small re-parameterizable CNNs built from RepConv2d (the growth families come later)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .reparam import RepConv2d

DEFAULT_BRANCHES = ("conv5x5", "conv3x3", "conv1x1", "conv1x3", "conv3x1", "avg3x3", "bn",
                    "conv1x1-conv3x3")


class RepCNN(nn.Module):
    """Stem (3x3 RepConv2d), stages of RepConv2d + ReLU, global average pool, Linear classifier.

    Args:
        in_channels, num_classes: data shape. widths: channels per stage (stage i > 0 starts
        with stride 2). depth: blocks per stage. kernel_size: the blocks' deploy kernel.
        branches: branch specs of every block (``bn`` is dropped where it does not apply).
    Input ``[B, in_channels, H, W]`` -> logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64),
                 depth: int = 2, kernel_size: int = 5, stem_width: int = 16,
                 branches: tuple[str, ...] = DEFAULT_BRANCHES):
        super().__init__()
        self._kwargs = dict(in_channels=in_channels, num_classes=num_classes, widths=list(widths),
                            depth=depth, kernel_size=kernel_size, stem_width=stem_width,
                            branches=list(branches))
        layers: list[nn.Module] = [RepConv2d(in_channels, stem_width, 3, branches=("conv3x3",)), nn.ReLU()]
        cin = stem_width
        for i, width in enumerate(widths):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                specs = [b for b in branches if b != "bn" or (cin == width and stride == 1)]
                layers += [RepConv2d(cin, width, kernel_size, stride, branches=specs), nn.ReLU()]
                cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))

    def adagrow_arch(self) -> dict[str, Any]:
        """How :func:`adagrow.compress.load_quantized` rebuilds this architecture."""
        return {"builder": "adagrow.grow.nets:RepCNN", "kwargs": dict(self._kwargs)}
