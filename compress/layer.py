"""A Linear / Conv2d seen as weight matrices in canonical K order (docs/design.md §2).

Conv ``W[C_out, C_in/g, kh, kw]`` becomes ``[C_out, kh*kw*C_in/g]`` with columns ``(ky, kx, cin)``;
conv group ``g`` owns output rows ``g*C_out/g ...`` and has its own Hessian over the same K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adagrow.checks import all_finite


@dataclass(frozen=True)
class LayerGeometry:
    kind: str                      # "linear" | "conv"
    out_features: int              # N (= C_out)
    k: int                         # columns per row (K)
    groups: int = 1                # conv groups: one Hessian each
    in_channels: int = 0
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def cin_per_group(self) -> int:
        return self.in_channels // self.groups if self.kind == "conv" else self.k

    @property
    def rows_per_group(self) -> int:
        return self.out_features // self.groups

    def meta(self) -> dict:
        """The geometry fields a quantized layer's checkpoint metadata records (JSON-ready)."""
        out = {"kind": self.kind, "out_features": self.out_features, "k": self.k}
        if self.kind == "conv":
            out.update(groups=self.groups, in_channels=self.in_channels, kernel_size=list(self.kernel_size),
                       stride=list(self.stride), padding=list(self.padding), dilation=list(self.dilation))
        return out


def geometry(layer: nn.Module, name: str = "layer") -> LayerGeometry:
    """Describe a supported layer, or raise a clear error for anything else."""
    if isinstance(layer, nn.Linear):
        return LayerGeometry("linear", layer.out_features, layer.in_features)
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={layer.padding_mode!r} is not supported "
                             "(only 'zeros'; the quantized conv and the kernels pad with zeros)")
        if isinstance(layer.padding, str):
            raise ValueError(f"{name}: string padding {layer.padding!r} is not supported; use integers")
        kh, kw = layer.kernel_size
        return LayerGeometry("conv", layer.out_channels, kh * kw * layer.in_channels // layer.groups,
                             layer.groups, layer.in_channels, (kh, kw), tuple(layer.stride),
                             tuple(layer.padding), tuple(layer.dilation))
    raise TypeError(f"{name}: unsupported layer type {type(layer).__name__}; "
                    "adagrow quantizes nn.Linear and nn.Conv2d")


def check_parameters(layer: nn.Module, name: str = "layer") -> None:
    """Raise ``ValueError`` naming the layer if its weight or bias holds NaN or inf (quantizing
    it would store a NaN model)."""
    for what in ("weight", "bias"):
        t = getattr(layer, what, None)
        if t is not None and not all_finite(t):
            n_bad = int((~torch.isfinite(t)).sum())
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise ValueError(f"{name}: {what} contains {kind} ({n_bad} of {t.numel()} values non-finite); the "
                             "float model is broken (check its training or the checkpoint it came from)")


def weight_matrix(weight: torch.Tensor, geo: LayerGeometry) -> torch.Tensor:
    """``[N, K]`` view of a layer weight in canonical column order."""
    if geo.kind == "linear":
        return weight.reshape(geo.out_features, geo.k)
    return weight.permute(0, 2, 3, 1).reshape(geo.out_features, geo.k)


def matrix_to_weight(mat: torch.Tensor, geo: LayerGeometry) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: ``[N, K]`` -> the layer's weight shape."""
    if geo.kind == "linear":
        return mat.reshape(geo.out_features, geo.k)
    kh, kw = geo.kernel_size
    return mat.reshape(geo.out_features, kh, kw, geo.cin_per_group).permute(0, 3, 1, 2).contiguous()


def input_columns(inp: torch.Tensor, geo: LayerGeometry, name: str = "layer") -> torch.Tensor:
    """The layer input as ``[groups, K, n]`` columns in canonical order (n = rows / patches)."""
    if geo.kind == "linear":
        if inp.shape[-1] != geo.k:
            raise ValueError(f"{name}: input has {inp.shape[-1]} features, the layer expects {geo.k}")
        return inp.reshape(-1, geo.k).t().unsqueeze(0)
    if inp.dim() == 3:
        inp = inp.unsqueeze(0)
    if inp.dim() != 4 or inp.shape[1] != geo.in_channels:
        raise ValueError(f"{name}: conv input must be [B, {geo.in_channels}, H, W], got {tuple(inp.shape)}")
    cols = F.unfold(inp, geo.kernel_size, geo.dilation, geo.padding, geo.stride)  # [B, C*kh*kw, L]
    b, _, n = cols.shape
    kk = geo.kernel_size[0] * geo.kernel_size[1]
    cols = cols.reshape(b, geo.groups, geo.cin_per_group, kk, n).permute(1, 3, 2, 0, 4)
    return cols.reshape(geo.groups, geo.k, b * n)


def reference_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      geo: LayerGeometry) -> torch.Tensor:
    """``F.linear`` / ``F.conv2d`` with the geometry's parameters."""
    if geo.kind == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
