"""Put a quantized Hugging Face model on adagrow's W4A16 kernel for ``generate()``.

:func:`use_kernels` takes a model quantized by :func:`adagrow.compress.quantize` (its
:class:`QuantLinear` layers) or a compressed-tensors folder loaded by transformers (whose Linear
layers hold ``weight_packed`` or the dequantized ``weight``, and ``weight_scale``; those are
repacked into :class:`QuantLinear` once, exactly), and casts everything else to fp16 / bf16. A 4-bit
``QuantLinear`` then runs ``torch.ops.adagrow.w4a16_matmul_sz`` on fp16 / bf16 inputs wherever Triton
runs (CUDA, or the CPU interpreter under ``TRITON_INTERPRET=1``); elsewhere the PyTorch reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adagrow.kernels.w4a16 import kernel_supports
from adagrow.packed import pack_codes, padded_k

from .layer import set_module
from .qmodules import QuantLayer, QuantLinear
from .server_formats import unpack_dense

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class KernelReport:
    """What :func:`use_kernels` did: layers repacked from a loaded folder, 4-bit layers that run
    the kernel, quantized layers that cannot (other bit widths / group sizes) and why."""

    repacked: list[str]
    on_kernel: list[str]
    not_on_kernel: dict[str, str]


def _grid(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(codes [N, K], scales [N, n_groups], zeros [N, n_groups])`` (unsigned 4-bit codes and zero
    points, float) of a compressed-tensors Linear: still packed (``weight_packed``, transformers'
    compressed mode) or decompressed (``weight`` beside ``weight_scale``); None when not 4-bit."""
    scale: torch.Tensor = getattr(linear, "weight_scale")
    s = scale.detach().float()
    n, n_groups = s.shape
    zp = getattr(linear, "weight_zero_point", None)
    packed = getattr(linear, "weight_packed", None)
    if isinstance(packed, torch.Tensor):
        k = int(getattr(linear, "weight_shape")[1])
        if packed.shape != (n, -(-k * 4 // 32)):
            return None
        codes = unpack_dense(packed.detach().cpu(), 4, k).float()
        z = (torch.full_like(s, 8.0) if zp is None
             else unpack_dense(zp.detach().t().contiguous().cpu(), 4, n).t().float())
        return codes, s, z
    w = linear.weight.detach().float()
    z = torch.full_like(s, 8.0) if zp is None else zp.detach().float().reshape(n, n_groups) + 8
    rep = w.shape[1] // n_groups
    return torch.round(w / s.repeat_interleave(rep, 1)) + z.repeat_interleave(rep, 1), s, z


def repack_linear(linear: nn.Linear, name: str = "layer") -> QuantLinear | None:
    """A 4-bit :class:`QuantLinear` computing exactly what a compressed-tensors Linear loaded by
    transformers computes (weight ``(q - z) * s``, scales ``weight_scale [N, n_groups]``, optional
    ``weight_zero_point``), or None when its weight is not on a 4-bit grid of fp16 scales."""
    grid = _grid(linear)
    if grid is None:
        return None
    codes, s, z = grid
    n, k = codes.shape
    n_groups = s.shape[1]
    if k % n_groups:
        return None
    gs, s16 = (-1 if n_groups == 1 else k // n_groups), s.to(torch.float16)
    ze = z.repeat_interleave(k // n_groups, 1)
    ok = bool(((codes >= 0) & (codes <= 15)).all()) and torch.equal(s16.float(), s)
    if ok and isinstance(getattr(linear, "weight", None), torch.Tensor):  # decompressed: exactly on the grid
        ok = torch.equal((codes - ze) * s.repeat_interleave(k // n_groups, 1), linear.weight.detach().float())
    if not ok:
        return None
    meta = {"kind": "linear", "out_features": n, "k": k, "bits": 4, "group_size": gs,
            "sym": getattr(linear, "weight_zero_point", None) is None, "order": "none", "n_groups": n_groups,
            "scale_dtype": "float16", "bias": linear.bias is not None}
    q = QuantLinear(meta)
    buf = dict(q.named_buffers())
    k_pad = padded_k(k, gs)
    pad = torch.cat([codes, ze[:, -1:].expand(n, k_pad - k)], 1) if k_pad > k else codes
    buf["qweight"].copy_(pack_codes(pad.to(torch.int64), 4))
    buf["scales"].copy_(s16.t())
    buf["zeros"].copy_(z.t().to(torch.float16))
    if linear.bias is not None:
        buf["bias"].copy_(linear.bias.detach())
    return q.to(s.device)


def repack_compressed(model: nn.Module) -> list[str]:
    """Replace, in place, every Linear of a compressed-tensors folder loaded by transformers whose
    weight is on a 4-bit grid by the equivalent :class:`QuantLinear` (:func:`repack_linear`).
    Returns the names of the layers replaced."""
    repacked = []
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and isinstance(getattr(mod, "weight_scale", None), torch.Tensor):
            q = repack_linear(mod, name)
            if q is not None:
                set_module(model, name, q)
                repacked.append(name)
    return repacked


def use_kernels(model: nn.Module, dtype: torch.dtype = torch.float16) -> KernelReport:
    """Make ``model`` (in place) run its 4-bit Linear layers on the W4A16 kernel.

    Repacks compressed-tensors-loaded Linear layers into :class:`QuantLinear`, then casts every
    other parameter and buffer to ``dtype`` (fp16 / bf16: the kernel's activation dtypes); the
    packed weights and their fp16 scales are left as they are.
    """
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"the W4A16 kernel takes float16 or bfloat16 activations, got {dtype}")
    repacked = repack_compressed(model)
    for mod in model.modules():
        if isinstance(mod, QuantLayer):
            if mod.bias is not None:
                mod.bias.data = mod.bias.data.to(dtype)
            continue
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    on, off = [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            if mod.bits != 4:
                off[name] = f"{mod.bits}-bit (the kernel is 4-bit)"
            elif not kernel_supports(mod.group_size):
                off[name] = f"group size {mod.group_size} (the kernel takes -1 or a multiple of 8)"
            else:
                on.append(name)
    return KernelReport(repacked, on, off)


__all__ = ["use_kernels", "repack_linear", "repack_compressed", "KernelReport", "KERNEL_DTYPES"]
