"""The fast PyTorch CPU path of the quantized layers (see docs/demo.md, "CPU fast path").

PyTorch ships a CPU int4 weight-only matmul (``aten._weight_int4pack_mm_for_cpu``, the kernel
torchao's int4 weight-only layout runs on CPU). Its format differs from ours (docs/design.md §5):

- codes are packed by ``aten._convert_weight_to_int4pack_for_cpu`` from an ``int32 [N, K]``
  matrix of 0..15 codes; it needs ``N % 16 == 0``;
- one ``(scale, zero)`` pair per ``qGroupSize`` columns, ``qGroupSize`` in 32/64/128/256 and
  dividing ``K``, stored as ``[K / qGroupSize, N, 2]`` in the activation dtype;
- it dequantizes ``(q - 8) * scale + zero`` with a *float* zero, where we store an integer zero
  point ``z`` and dequantize ``(q - z) * s``. Both are the same weight with
  ``zero = (8 - z) * s``.

Our groups (a multiple of 32, or per-channel) are expressed with the largest kernel group size
that divides both our group and ``K``, repeating each of our scales over its kernel groups.

The kernel is fast only on bfloat16 activations (on float32 ones it takes a scalar path, ~20x
slower than a float ``F.linear`` at one row and ~150x at 32 rows, on AVX-512 and AVX2 alike), so
float32 inputs are rounded to bfloat16 for it. With the weights streamed from memory (a decoder's
decode step) it beats a float32 ``F.linear`` by 2-10x up to ~8 rows on AVX-512 and AVX2; from
~16 rows on an AVX2 CPU it loses. Float32 calls with more rows run the dequantized weight,
prepacked once for oneDNN's float32 matmul (:func:`pack_float`), which beats ``F.linear`` on the
same weight by 10-20% at 32 rows. Float32 convs with kernels larger than 3x3 or groups run their
dequantized weight prepacked for oneDNN's convolution too (:func:`pack_conv`). Whether an output
is rounded through bfloat16 depends only on the row count and the layer's switches, never on the
CPU; oneDNN or not changes only the summation order of a float32 product (docs/demo.md, "CPU fast
path").
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adagrow.packed import column_groups, unpack_codes

from .layer import LayerGeometry

INT4_DTYPES = (torch.bfloat16,)
KERNEL_GROUPS = (256, 128, 64, 32)
INT4_MAX_ROWS = 8  # float32 calls with at most this many rows take the int4 kernel by default
ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class Int4Pack:
    """Weights repacked for ``aten._weight_int4pack_mm_for_cpu``."""

    packed: torch.Tensor            # the kernel's uint8 packing of int32 [N, K] codes
    scales_and_zeros: torch.Tensor  # [K / group, N, 2], activation dtype
    group: int                      # the kernel's qGroupSize


def kernel_group(k: int, n: int, bits: int, group_size: int | str) -> int | None:
    """The kernel group size that reproduces our grouping for a ``k x n`` layer, or None when the
    kernel cannot run it (not 4-bit, position/tier groups, N not a multiple of 16, no fit)."""
    if bits != 4 or not isinstance(group_size, int) or n % 16:
        return None
    ours = k if group_size == -1 else group_size
    return next((g for g in KERNEL_GROUPS if ours % g == 0 and k % g == 0), None)


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
              group_size: int, group: int, dtype: torch.dtype) -> Int4Pack:
    """Repack our 4-bit tensors (``qweight int32[K_pad/8, N]``, ``scales/zeros [n_groups, N]``)
    for the CPU kernel with kernel group ``group`` (from :func:`kernel_group`)."""
    codes = unpack_codes(qweight, 4)[:, :k].contiguous()  # int32 [N, K], 0..15
    gid = column_groups(k, group_size)[::group]  # our group of each kernel group's first column
    s = scales.float()[gid]
    zero = (8.0 - zeros.float()[gid]) * s       # (q - z) * s == (q - 8) * s + (8 - z) * s
    sz = torch.stack([s, zero], -1).to(dtype).contiguous()
    return Int4Pack(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), sz, group)


def int4_linear(x: torch.Tensor, pack: Int4Pack, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` on the int4 kernel; ``x`` is ``[..., K]``."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), pack.packed,
                                                   pack.group, pack.scales_and_zeros)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


@dataclass(frozen=True)
class FloatPack:
    """A float32 weight ``[N, K]``, prepacked for oneDNN's matmul where PyTorch has oneDNN on an
    x86 CPU (``onednn``), else as it is."""

    weight: torch.Tensor
    onednn: bool


def pack_float(weight: torch.Tensor) -> FloatPack:
    """``weight`` (float32 ``[N, K]``) in the layout :func:`float_linear` runs fastest. The
    prepacked tensor is opaque (no storage): it cannot be copied or saved, only run."""
    weight = weight.contiguous()
    if ONEDNN and weight.dtype == torch.float32:
        return FloatPack(torch.ops.mkldnn._reorder_linear_weight(weight, None), True)
    return FloatPack(weight, False)


def float_linear(x: torch.Tensor, pack: FloatPack, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` in float32: oneDNN's matmul on the prepacked weight, else ``F.linear``.
    Both are float32 products; they differ from each other only in summation order."""
    if pack.onednn:
        return torch.ops.mkldnn._linear_pointwise(x, pack.weight, bias, "none", [], "")
    return F.linear(x, pack.weight, bias)


def prepacks_conv(geo: LayerGeometry) -> bool:
    """Whether a float32 conv runs on a oneDNN-prepacked weight: kernels larger than 3x3, or
    grouped, the convs PyTorch's own float32 ``F.conv2d`` hands to oneDNN at any input size (and
    reorders the weight for on every call). Small dense kernels stay on ``F.conv2d``, which runs
    them on its im2col path at small inputs, faster there than a oneDNN call (a 1->16 3x3 conv on
    16x16: 6 us against 29 us)."""
    return ONEDNN and (geo.groups > 1 or min(geo.kernel_size) > 3)


def pack_conv(weight: torch.Tensor, geo: LayerGeometry, input_size: tuple[int, ...]) -> FloatPack:
    """A conv's float32 ``weight`` in the layout :func:`float_conv2d` runs fastest (see
    :func:`prepacks_conv`) for inputs of shape ``input_size`` ``[B, C, H, W]`` (other shapes run
    correctly, possibly slower). Without the shape oneDNN may pick a layout that is slow for the
    real input: a 32->48 5x5 stride-2 conv on 1x32x16x16 took 1962 us on it, 64 us packed for
    the shape, 107 us on ``F.conv2d``."""
    weight = weight.contiguous()
    if weight.dtype == torch.float32 and prepacks_conv(geo):
        return FloatPack(torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(geo.padding), list(geo.stride), list(geo.dilation), geo.groups, list(input_size)), True)
    return FloatPack(weight, False)


def float_conv2d(x: torch.Tensor, pack: FloatPack, bias: torch.Tensor | None, geo: LayerGeometry) -> torch.Tensor:
    """The conv of ``geo`` in float32: oneDNN's convolution on the prepacked weight, else
    ``F.conv2d``."""
    if pack.onednn:
        return torch.ops.mkldnn._convolution_pointwise(x, pack.weight, bias, list(geo.padding), list(geo.stride),
                                                       list(geo.dilation), geo.groups, "none", [], "")
    return F.conv2d(x, pack.weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)


__all__ = ["INT4_DTYPES", "INT4_MAX_ROWS", "FloatPack", "Int4Pack", "float_conv2d", "float_linear", "int4_linear",
           "kernel_group", "pack_conv", "pack_float", "pack_int4", "prepacks_conv"]
