"""A growable Transformer encoder: ViT (image patches) or BERT-style (token ids).

The residual width ``dim`` is fixed; each layer has ``heads`` attention heads of fixed
``head_dim``, its attention width (QKV rows, proj columns) and MLP width (``mlp_per_head``
units per head) follow the head count. Width growth adds one head to every layer; depth growth
inserts a layer. New parameters are drawn from N(0, 0.1^2), or zero where ``zero_init`` makes
growth function-preserving (new proj columns / fc2 columns, and new layers' proj / fc2).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

KINDS = ("vit", "bert")
# (new parameter, dim, index) records: new[index along dim] = old values
Carry = dict[nn.Parameter, tuple[nn.Parameter, int, torch.Tensor]]


class EncoderLayer(nn.Module):
    """Pre-norm encoder layer with explicit multi-head attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_per_head: int):
        super().__init__()
        self.heads, self.head_dim, self.mlp_per_head = heads, head_dim, mlp_per_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * heads * head_dim), nn.Linear(heads * head_dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, heads * mlp_per_head), nn.Linear(heads * mlp_per_head, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))

    def norm_scale(self) -> float:
        return float(torch.cat([self.norm1.weight.detach().abs(), self.norm2.weight.detach().abs()]).mean())


def _init_new(t: torch.Tensor, zero: bool) -> None:
    with torch.no_grad():
        t.zero_() if zero else t.normal_(0.0, 0.1)


def _widen(old: nn.Linear, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None, n_out: int, n_in: int,
           zero_new: bool, carry: Carry) -> nn.Linear:
    """A larger Linear holding ``old`` at rows ``out_idx`` / columns ``in_idx``; the rest is new."""
    new = nn.Linear(n_in, n_out).to(old.weight)
    _init_new(new.weight, zero_new)
    _init_new(new.bias, zero_new)
    rows = out_idx if out_idx is not None else torch.arange(n_out)
    cols = in_idx if in_idx is not None else torch.arange(n_in)
    with torch.no_grad():
        new.weight[rows[:, None], cols[None, :]] = old.weight
        if out_idx is not None:
            new.bias[rows] = old.bias
        else:
            new.bias.copy_(old.bias)
    if out_idx is not None:
        carry[new.weight] = (old.weight, 0, rows)
        carry[new.bias] = (old.bias, 0, rows)
    else:
        carry[new.weight] = (old.weight, 1, cols)
        carry[new.bias] = (old.bias, 0, torch.arange(n_out))
    return new


class GrowingTransformer(nn.Module):
    """ViT (``kind="vit"``: ``[B, C, H, W]`` images) or BERT-style encoder (``kind="bert"``:
    ``[B, T]`` int64 token ids) -> logits ``[B, num_classes]`` (mean-pooled tokens)."""

    def __init__(self, kind: str = "vit", dim: int = 64, head_dim: int = 16, heads: int = 2, depth: int = 1,
                 mlp_per_head: int = 64, num_classes: int = 10, img_size: int = 16, patch: int = 4,
                 in_channels: int = 1, vocab_size: int = 1000, max_len: int = 128,
                 layer_heads: list[int] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "vit" and img_size % patch:
            raise ValueError(f"img_size {img_size} is not a multiple of patch {patch}")
        self.kind = kind
        self.cfg = dict(kind=kind, dim=dim, head_dim=head_dim, heads=heads, depth=depth, mlp_per_head=mlp_per_head,
                        num_classes=num_classes, img_size=img_size, patch=patch, in_channels=in_channels,
                        vocab_size=vocab_size, max_len=max_len)
        if kind == "vit":
            self.embed = nn.Conv2d(in_channels, dim, patch, patch)
            n_pos = (img_size // patch) ** 2
        else:
            self.embed = nn.Embedding(vocab_size, dim)
            n_pos = max_len
        self.pos = nn.Parameter(torch.randn(1, n_pos, dim) * 0.02)
        heads_per_layer = layer_heads or [heads] * depth
        self.layers = nn.ModuleList(EncoderLayer(dim, h, head_dim, mlp_per_head) for h in heads_per_layer)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            x = self.embed(x).flatten(2).transpose(1, 2)
        else:
            if x.dtype != torch.int64 or x.shape[1] > self.pos.shape[1]:
                raise ValueError(f"bert input must be int64 token ids [B, T<= {self.pos.shape[1]}], "
                                 f"got {x.dtype} {tuple(x.shape)}")
            x = self.embed(x)
        x = x + self.pos[:, : x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def heads(self) -> int:
        return min(layer.heads for layer in self.layers)

    def spec(self) -> str:
        return f"{'ViT' if self.kind == 'vit' else 'BERT'}-D{self.depth}-H{self.heads}"

    def arch(self) -> dict[str, Any]:
        return {"type": "transformer", **self.cfg, "layer_heads": [layer.heads for layer in self.layers]}

    def adagrow_arch(self) -> dict[str, Any]:
        """The architecture record (``adagrow.compress.archs``)."""
        return {"name": "transformer", "args": {k: v for k, v in self.arch().items() if k != "type"}}

    def param_counts(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.parameters())
        return n, n

    # ------------------------------------------------------------------ growth operations
    def add_head(self, zero_init: bool = False) -> Carry:
        """Add one head to every layer; returns where each widened parameter's old values went."""
        carry: Carry = {}
        for layer in self.layers:
            h, hd, mh = layer.heads, layer.head_dim, layer.mlp_per_head
            dim = layer.norm1.normalized_shape[0]
            s, hh, d = torch.meshgrid(torch.arange(3), torch.arange(h), torch.arange(hd), indexing="ij")
            qkv_rows = (s * (h + 1) * hd + hh * hd + d).reshape(-1)
            layer.qkv = _widen(layer.qkv, qkv_rows, None, 3 * (h + 1) * hd, dim, False, carry)
            layer.proj = _widen(layer.proj, None, torch.arange(h * hd), dim, (h + 1) * hd, zero_init, carry)
            layer.fc1 = _widen(layer.fc1, torch.arange(h * mh), None, (h + 1) * mh, dim, False, carry)
            layer.fc2 = _widen(layer.fc2, None, torch.arange(h * mh), dim, (h + 1) * mh, zero_init, carry)
            layer.heads = h + 1
        return carry

    def insert_layer(self, after: int, zero_init: bool = False) -> EncoderLayer:
        """Insert a layer after layer ``after`` (-1: first); zero_init makes it the identity."""
        ref = self.layers[max(after, 0)]
        layer = EncoderLayer(ref.norm1.normalized_shape[0], ref.heads, ref.head_dim, ref.mlp_per_head)
        layer.to(ref.qkv.weight)
        for lin in (layer.qkv, layer.proj, layer.fc1, layer.fc2):
            _init_new(lin.weight, zero_init and lin in (layer.proj, layer.fc2))
            _init_new(lin.bias, zero_init and lin in (layer.proj, layer.fc2))
        self.layers.insert(after + 1, layer)
        return layer
