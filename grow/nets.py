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
        """How :func:`adagrow.compress.load_quantized` rebuilds this architecture (a record
        checked by ``adagrow.archs``)."""
        return {"name": "repcnn", "args": dict(self._kwargs)}


class _ViTBlock(nn.Module):
    """Pre-norm transformer block with explicit (export-friendly) multi-head attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small ViT: conv patch embedding, learned positions, pre-norm blocks, mean-pooled head.

    Input ``[B, in_channels, img_size, img_size]`` -> logits ``[B, num_classes]``.
    """

    def __init__(self, img_size: int = 16, patch: int = 4, in_channels: int = 1, num_classes: int = 10,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if img_size % patch or dim % heads:
            raise ValueError(f"img_size {img_size} must be a multiple of patch {patch}, dim {dim} of heads {heads}")
        self._kwargs = dict(img_size=img_size, patch=patch, in_channels=in_channels, num_classes=num_classes,
                            dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))

    def adagrow_arch(self) -> dict[str, Any]:
        return {"name": "tinyvit", "args": dict(self._kwargs)}
