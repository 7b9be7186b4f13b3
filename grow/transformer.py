"""A growable Transformer encoder: ViT (image patches) or BERT-style (token ids).

Each layer has ``heads`` attention heads of fixed ``head_dim``; its attention width (QKV rows,
proj columns) and MLP width (``mlp_per_head`` units per head) follow the head count. Width
growth adds one head to every layer and (optionally, as the thesis does) widens the residual
stream ``dim``; depth growth inserts a layer. New parameters are drawn from N(0, 0.1^2), or zero
where ``zero_init`` makes growth function-preserving (new proj / fc2 columns and rows, new
layers' proj / fc2).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

KINDS = ("vit", "bert")
# new parameter -> (old parameter, index per dimension): new[meshgrid(index)] holds the old values
Carry = dict[nn.Parameter, tuple[nn.Parameter, tuple[torch.Tensor, ...]]]


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


def _init_new(t: torch.Tensor, fill: str) -> None:
    """``fill``: ``zero`` | ``one`` | ``normal`` (N(0, 0.1^2), the thesis' init for new parameters)."""
    with torch.no_grad():
        if fill == "normal":
            t.normal_(0.0, 0.1)
        else:
            t.fill_(1.0 if fill == "one" else 0.0)


def _regrow(module: nn.Module, name: str, shape: tuple[int, ...], index: tuple[torch.Tensor | None, ...],
            fill: str, carry: Carry) -> None:
    """Replace ``module.<name>`` by a parameter of ``shape`` that holds the old values at ``index``
    (per dimension; None = all of the old extent) and ``fill`` elsewhere; records the carry."""
    old = getattr(module, name)
    idx = tuple(torch.arange(n) if i is None else i for i, n in zip(index, old.shape))
    new = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device))
    _init_new(new, fill)
    with torch.no_grad():
        new[torch.meshgrid(*idx, indexing="ij")] = old
    carry[new] = (old, idx)
    setattr(module, name, new)


def _grow_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None, n_out: int, n_in: int,
                 fill: str, carry: Carry) -> None:
    """Widen ``lin`` in place to ``n_in -> n_out``, old weights at ``rows`` x ``cols``."""
    _regrow(lin, "weight", (n_out, n_in), (rows, cols), fill, carry)
    _regrow(lin, "bias", (n_out,), (rows,), fill, carry)
    lin.in_features, lin.out_features = n_in, n_out


def _grow_norm(norm: nn.LayerNorm, dim: int, carry: Carry) -> None:
    _regrow(norm, "weight", (dim,), (None,), "one", carry)
    _regrow(norm, "bias", (dim,), (None,), "zero", carry)
    norm.normalized_shape = (dim,)


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
        """The architecture record (``adagrow.archs``)."""
        return {"name": "transformer", "args": {k: v for k, v in self.arch().items() if k != "type"}}

    def param_counts(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.parameters())
        return n, n

    # ------------------------------------------------------------------ growth operations
    @property
    def dim(self) -> int:
        """The residual width."""
        return self.norm.normalized_shape[0]

    def add_head(self, zero_init: bool = False, widen: int = 0) -> Carry:
        """Add one head to every layer (its QKV rows, proj columns and ``mlp_per_head`` MLP units)
        and widen the residual stream by ``widen`` features (the thesis grows both together).

        New parameters ~ N(0, 0.1^2). ``zero_init`` zeroes the new proj / fc2 columns, and with
        ``widen`` the new embedding rows, positions, proj / fc2 rows and head columns, so the new
        residual features start at 0. Without ``widen`` this preserves the function exactly; with
        it the LayerNorms also average over the (zero) new features, which rescales the old ones.
        Returns where each regrown parameter's old values went (for the optimizer state).
        """
        if widen < 0:
            raise ValueError(f"widen must be >= 0 features, got {widen}")
        carry: Carry = {}
        d = self.dim
        big, keep = d + widen, torch.arange(d)
        fill = "zero" if zero_init else "normal"
        for layer in self.layers:
            h, hd, mh = layer.heads, layer.head_dim, layer.mlp_per_head
            s, hh, j = torch.meshgrid(torch.arange(3), torch.arange(h), torch.arange(hd), indexing="ij")
            qkv_rows = (s * (h + 1) * hd + hh * hd + j).reshape(-1)
            _grow_linear(layer.qkv, qkv_rows, keep, 3 * (h + 1) * hd, big, "normal", carry)
            _grow_linear(layer.proj, keep, torch.arange(h * hd), big, (h + 1) * hd, fill, carry)
            _grow_linear(layer.fc1, torch.arange(h * mh), keep, (h + 1) * mh, big, "normal", carry)
            _grow_linear(layer.fc2, keep, torch.arange(h * mh), big, (h + 1) * mh, fill, carry)
            if widen:
                _grow_norm(layer.norm1, big, carry)
                _grow_norm(layer.norm2, big, carry)
            layer.heads = h + 1
        if widen:
            if self.kind == "vit":
                c, p = self.embed.in_channels, self.embed.kernel_size
                _regrow(self.embed, "weight", (big, c, *p), (keep, None, None, None), fill, carry)
                _regrow(self.embed, "bias", (big,), (keep,), fill, carry)
                self.embed.out_channels = big
            else:
                _regrow(self.embed, "weight", (self.embed.num_embeddings, big), (None, keep), fill, carry)
                self.embed.embedding_dim = big
            _regrow(self, "pos", (1, self.pos.shape[1], big), (None, None, keep), fill, carry)
            _grow_norm(self.norm, big, carry)
            _regrow(self.head, "weight", (self.head.out_features, big), (None, keep), fill, carry)
            self.head.in_features = big
            self.cfg["dim"] = big
        return carry

    def insert_layer(self, after: int, zero_init: bool = False) -> EncoderLayer:
        """Insert a layer after layer ``after`` (-1: first); new parameters ~ N(0, 0.1^2);
        ``zero_init`` zeroes its proj and fc2, so the layer is the identity."""
        ref = self.layers[max(after, 0)]
        layer = EncoderLayer(self.dim, ref.heads, ref.head_dim, ref.mlp_per_head)
        layer.to(ref.qkv.weight)
        for lin in (layer.qkv, layer.proj, layer.fc1, layer.fc2):
            fill = "zero" if zero_init and lin in (layer.proj, layer.fc2) else "normal"
            _init_new(lin.weight, fill)
            _init_new(lin.bias, fill)
        self.layers.insert(after + 1, layer)
        return layer
