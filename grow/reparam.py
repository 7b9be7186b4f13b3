"""Re-parameterizable convolution: a multi-branch train-time conv that fuses into one Conv2d.

Branch specs (each footprint is centred in the block's kernel and must fit in it):

- ``"conv{h}x{w}"``: h x w conv + BN (``conv3x3``, ``conv1x3``, ``conv5x3`` ...).
- ``"avg{k}x{k}"``: k x k average pool + BN. When in != out channels it is preceded by a
  1x1 conv-BN (DBB style) so the channel count can change.
- ``"bn"``: BN identity (in == out channels, stride 1).
- ``"conv1x1-conv{k}x{k}"``: 1x1 conv-BN, then k x k conv-BN (DBB style).

The kernel algebra is kept as pure functions ``(kernel, bias) -> (kernel, bias)``; the block
only collects its branches. ``fuse()`` returns the deploy ``nn.Conv2d`` with a buffer
``reparam_overlap`` (int64 ``[kh, kw]``, how many branches cover each kernel position).
"""
from __future__ import annotations

import copy
import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from adagrow.checks import check_int

__all__ = ["RepConv2d", "reparameterize", "overlap_map", "parse_branch"]

_CONV = re.compile(r"^conv(\d+)x(\d+)$")
_AVG = re.compile(r"^avg(\d+)x(\d+)$")
_SEQ = re.compile(r"^conv1x1-conv(\d+)x(\d+)$")


# ----------------------------------------------------------------------------- kernel algebra
def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = x * scale + shift`` per channel (running statistics)."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean * scale


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BN into a bias-free conv kernel ``[O, I/g, h, w]`` -> (kernel, bias)."""
    scale, shift = bn_affine(bn)
    return kernel * scale.reshape(-1, 1, 1, 1), shift


def identity_kernel(channels: int, groups: int, k: tuple[int, int], value: float,
                    like: torch.Tensor) -> torch.Tensor:
    """Kernel ``[C, C/g, kh, kw]`` mapping channel i to itself with ``value`` everywhere in k."""
    cg = channels // groups
    ker = torch.zeros(channels, cg, *k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    ker[idx, idx % cg] = value
    return ker


def pad_to(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad an odd kernel ``[..., h, w]`` so it is centred in ``size`` (odd)."""
    dh, dw = (size[0] - kernel.shape[-2]) // 2, (size[1] - kernel.shape[-1]) // 2
    return F.pad(kernel, (dw, dw, dh, dh))  # F.pad takes width before height


def sequential_1x1_kxk(k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, b2: torch.Tensor,
                       groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a 1x1 conv (k1 ``[M, I/g, 1, 1]``, b1) followed by a k x k conv (k2 ``[O, M/g, h, w]``).

    Exact when the intermediate is padded with ``b1`` (not zeros), as ``_SeqBranch`` does.
    """
    m_g, o_g = k1.shape[0] // groups, k2.shape[0] // groups
    ks, bs = [], []
    for g in range(groups):
        k1g = k1[g * m_g:(g + 1) * m_g].permute(1, 0, 2, 3)  # [I/g, M/g, 1, 1]
        k2g = k2[g * o_g:(g + 1) * o_g]
        ks.append(F.conv2d(k2g, k1g))
        bs.append((k2g * b1[g * m_g:(g + 1) * m_g].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
    return torch.cat(ks), torch.cat(bs) + b2


# ----------------------------------------------------------------------------- branches
def parse_branch(spec: str) -> tuple[str, tuple[int, int]]:
    """Return ``(kind, footprint)`` for a branch spec; kind in conv | avg | bn | seq."""
    if spec == "bn":
        return "bn", (1, 1)
    for kind, pat in (("conv", _CONV), ("avg", _AVG), ("seq", _SEQ)):
        m = pat.match(spec)
        if m:
            h, w = int(m.group(1)), int(m.group(2))
            if kind == "avg" and h != w:
                raise ValueError(f"branch {spec!r}: average-pool branches are square (avg{{k}}x{{k}})")
            if h % 2 == 0 or w % 2 == 0 or h < 1 or w < 1:
                raise ValueError(f"branch {spec!r}: footprint {h}x{w} must be odd to be centred")
            return kind, (h, w)
    raise ValueError(
        f"unknown branch spec {spec!r}; expected 'conv{{h}}x{{w}}', 'avg{{k}}x{{k}}', 'bn' "
        "or 'conv1x1-conv{k}x{k}'"
    )


class _ConvBN(nn.Sequential):
    """h x w conv (no bias) + BN, padded to keep the block's output size."""

    def __init__(self, cin: int, cout: int, k: tuple[int, int], stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, (k[0] // 2, k[1] // 2), groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def fused(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        k, b = fold_bn(self.conv.weight, self.bn)
        return pad_to(k, size), b


class _AvgBN(nn.Module):
    """k x k average pool (count_include_pad) + BN, for in == out channels."""

    def __init__(self, channels: int, k: int, stride: int, groups: int):
        super().__init__()
        self.k, self.groups = k, groups
        self.pool = nn.AvgPool2d(k, stride, k // 2, count_include_pad=True)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.pool(x))

    def fused(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        ker = identity_kernel(self.bn.num_features, self.groups, (self.k, self.k),
                              1.0 / self.k**2, self.bn.running_mean)
        k, b = fold_bn(ker, self.bn)
        return pad_to(k, size), b


class _IdentityBN(nn.Module):
    """BN on the identity (in == out channels, stride 1)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    def fused(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        ker = identity_kernel(self.bn.num_features, self.groups, (1, 1), 1.0, self.bn.running_mean)
        k, b = fold_bn(ker, self.bn)
        return pad_to(k, size), b


class _SeqBranch(nn.Module):
    """1x1 conv-BN, then an h x w stage (conv-BN or avg pool-BN) without its own padding.

    The intermediate is padded with the first BN's bias, so the branch equals one h x w conv
    with zero padding on the block input and fuses exactly.
    """

    def __init__(self, cin: int, cout: int, k: tuple[int, int], stride: int, groups: int, pool: bool):
        super().__init__()
        mid = cout if pool else cin
        self.k, self.groups, self.pool = k, groups, pool
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        if pool:
            self.stage = nn.AvgPool2d(k, stride, 0, count_include_pad=True)
        else:
            self.stage = nn.Conv2d(mid, cout, k, stride, 0, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        ph, pw = self.k[0] // 2, self.k[1] // 2
        if ph or pw:  # border = what the 1x1 stage gives a zero input (running-stat BN shift)
            v = bn_affine(self.bn1)[1].reshape(1, -1, 1, 1)
            y = F.pad(y - v, (pw, pw, ph, ph)) + v
        return self.bn2(self.stage(y))

    def fused(self, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        k1, b1 = fold_bn(self.conv1.weight, self.bn1)
        if self.pool:
            k2 = identity_kernel(self.bn2.num_features, self.groups, self.k, 1.0 / (self.k[0] * self.k[1]), k1)
        else:
            k2 = self.stage.weight
        k2, b2 = fold_bn(k2, self.bn2)
        k, b = sequential_1x1_kxk(k1, b1, k2, b2, self.groups)
        return pad_to(k, size), b


def overlap_map(specs: list[str] | tuple[str, ...], kernel_size: tuple[int, int]) -> torch.Tensor:
    """``overlap[ky, kx]`` = number of branches whose centred footprint covers (ky, kx) (int64)."""
    kh, kw = kernel_size
    ov = torch.zeros(kh, kw, dtype=torch.int64)
    for spec in specs:
        h, w = parse_branch(spec)[1]
        dh, dw = (kh - h) // 2, (kw - w) // 2
        ov[dh:dh + h, dw:dw + w] += 1
    return ov


# ----------------------------------------------------------------------------- the block
class RepConv2d(nn.Module):
    """Train-time multi-branch conv; branch outputs are summed (no activation).

    Args:
        in_channels, out_channels: channel counts (divisible by ``groups``).
        kernel_size: the deploy kernel (odd int or (h, w)); padding keeps it centred ("same").
        stride: 1 or 2. groups: grouped / depthwise convs.
        branches: branch specs (see module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, groups: int = 1, branches: tuple[str, ...] | list[str] | None = None):
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(ks) != 2 or ks[0] % 2 == 0 or ks[1] % 2 == 0 or min(ks) < 1:
            raise ValueError(f"RepConv2d kernel_size {kernel_size} must be odd (centred branches)")
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            check_int(value, f"RepConv2d {key}", 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        if stride not in (1, 2):
            raise ValueError(f"RepConv2d supports stride 1 or 2, got {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = ks, stride, groups
        self.padding = (ks[0] // 2, ks[1] // 2)
        if isinstance(branches, str):
            raise ValueError(f"branches must be a list of branch specs, not the string {branches!r} "
                             f"(did you mean [{branches!r}]?)")
        specs = list(branches) if branches is not None else [f"conv{ks[0]}x{ks[1]}"]
        if not specs:
            raise ValueError("RepConv2d needs at least one branch (branches=() would compute nothing)")
        self._specs: list[str] = []
        self.branch_modules = nn.ModuleList()
        for spec in specs:
            self.add_branch(spec)

    @property
    def branches(self) -> list[str]:
        """The branch specs, in the order they were added."""
        return list(self._specs)

    def _make_branch(self, spec: str, grow_kernel: bool = False) -> nn.Module:
        kind, (h, w) = parse_branch(spec)
        if grow_kernel:  # branches keep their own padding, so a larger deploy kernel changes nothing
            self.kernel_size = (max(self.kernel_size[0], h), max(self.kernel_size[1], w))
            self.padding = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        if h > self.kernel_size[0] or w > self.kernel_size[1]:
            raise ValueError(f"branch {spec!r} ({h}x{w}) does not fit in kernel "
                             f"{self.kernel_size[0]}x{self.kernel_size[1]}")
        cin, cout, s, g = self.in_channels, self.out_channels, self.stride, self.groups
        if kind == "conv":
            return _ConvBN(cin, cout, (h, w), s, g)
        if kind == "seq":
            return _SeqBranch(cin, cout, (h, w), s, g, pool=False)
        if kind == "avg":
            return _AvgBN(cin, h, s, g) if cin == cout else _SeqBranch(cin, cout, (h, w), s, g, pool=True)
        if cin != cout or s != 1:
            raise ValueError(f"branch 'bn' needs in == out channels and stride 1 "
                             f"(got {cin}->{cout}, stride {s})")
        return _IdentityBN(cin, g)

    def add_branch(self, spec: str, zero_init: bool = False, grow_kernel: bool = False) -> nn.Module:
        """Add a branch to a live block; ``zero_init`` sets its last BN's gamma to 0 (adds 0);
        ``grow_kernel`` enlarges the deploy kernel to fit a larger footprint (e.g. 3x3 -> 5x5)."""
        branch = self._make_branch(spec, grow_kernel)
        ref = next(self.parameters(), None)
        if ref is not None:
            branch.to(device=ref.device, dtype=ref.dtype)
        branch.train(self.training)
        last_bn = [m for m in branch.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        if zero_init:
            nn.init.zeros_(last_bn.weight)
        self.branch_modules.append(branch)
        self._specs.append(spec)
        return branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch_modules[0](x)
        for branch in self.branch_modules[1:]:
            out = out + branch(x)
        return out

    def overlap(self) -> torch.Tensor:
        """``[kh, kw]`` int64 map of how many branches cover each kernel position."""
        return overlap_map(self._specs, self.kernel_size)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The deploy conv (with bias and a ``reparam_overlap`` buffer). Needs eval mode."""
        if self.training:
            raise RuntimeError("RepConv2d.fuse() needs eval mode: BN batch statistics cannot be "
                               "fused; call .eval() first")
        kernel = bias = None
        for branch in self.branch_modules:
            k, b = branch.fused(self.kernel_size)
            kernel, bias = (k, b) if kernel is None else (kernel + k, bias + b)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, groups=self.groups, bias=True)
        conv.to(device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        conv.register_buffer("reparam_overlap", self.overlap().to(kernel.device))
        return conv

    reparameterize = fuse

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, branches={self._specs}")


def reparameterize(model: nn.Module) -> nn.Module:
    """Deep-copy ``model`` (in eval mode) and replace every RepConv2d with its fused conv."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"reparameterize() takes a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise RuntimeError("reparameterize() needs the model in eval mode (BN running statistics); "
                           "call model.eval() first")
    if isinstance(model, RepConv2d):
        return model.fuse()
    deploy = copy.deepcopy(model)
    if hasattr(model, "adagrow_arch"):  # the architecture record describes the train-time form
        deploy.adagrow_arch = functools.partial(copy.deepcopy, model.adagrow_arch())
    for name, module in list(deploy.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RepConv2d):
                setattr(module, child_name, child.fuse())
    deploy.adagrow_deploy = True
    return deploy
