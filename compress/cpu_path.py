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
Measured on this project's 2-core AVX-512 (BF16) CPU the kernel is fast only with bfloat16
activations (float32 activations take a slow path, ~10x slower than a float ``F.linear``), so
the layers run it on bfloat16 inputs (:data:`INT4_DTYPES`), and on float32 inputs only rounded to
bfloat16 first, when the layer's ``bf16_activations`` is on (``use_bf16_activations``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adagrow.packed import column_groups, unpack_codes

INT4_DTYPES = (torch.bfloat16,)
KERNEL_GROUPS = (256, 128, 64, 32)


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


__all__ = ["INT4_DTYPES", "Int4Pack", "int4_linear", "kernel_group", "pack_int4"]
