"""The W4A16 packed weight format (docs/design.md §5), at the bottom of the layering: it imports nothing
from adagrow, and both ``adagrow.kernels`` and ``adagrow.compress`` build on it.

Codes along K are packed into int32 words of the transposed ``[K, N]`` matrix:
``bits <= 4``: 8 nibbles per word, ``qweight`` is ``int32[K_pad/8, N]`` (lowest nibble = lowest k);
``bits 5..8``: 4 bytes per word, ``int32[K_pad/4, N]``. Dequantized weight ``(q - z) * s`` with
``scales``/``zeros`` ``[n_groups, N]``; each column's group comes from :func:`column_groups`.
The W4A16 kernels read scales and zeros as one 4-byte element per (group, column): the pairs of
:func:`pack_scale_zero`, an in-memory repack (files keep ``scales`` and ``zeros``).
"""
from __future__ import annotations

import math

import torch


def padded_k(k: int, group_size: int | str) -> int:
    """K padded with zero columns to a multiple of the group size (if contiguous) and of 8."""
    step = group_size if isinstance(group_size, int) and group_size > 0 else 8
    return math.ceil(k / step) * step


def column_groups(k_pad: int, group_size: int | str, cin_per_group: int = 1,
                  position_group: torch.Tensor | None = None) -> torch.Tensor:
    """``int64[k_pad]``: group index of every (padded) column; padding joins the last group."""
    cols = torch.arange(k_pad)
    if group_size == -1:
        return torch.zeros(k_pad, dtype=torch.int64)
    if isinstance(group_size, int):
        return cols // group_size
    pos = (cols // cin_per_group).clamp_max(position_group.numel() - 1)
    return position_group.long()[pos]


def codes_per_word(bits: int) -> int:
    return 8 if bits <= 4 else 4


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K_pad]`` (K_pad a multiple of the codes per word) -> int32 ``[K_pad/c, N]``."""
    per = codes_per_word(bits)
    width = 32 // per
    n, k = codes.shape
    if k % per:
        raise ValueError(f"K={k} is not a multiple of {per} codes per int32 word")
    c = codes.to(torch.int64).t().reshape(k // per, per, n)
    shifts = (torch.arange(per, dtype=torch.int64) * width).reshape(1, per, 1)
    words = (c << shifts).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[K_pad/c, N]`` -> int32 codes ``[N, K_pad]``."""
    per = codes_per_word(bits)
    width = 32 // per
    shifts = (torch.arange(per, dtype=torch.int32, device=qweight.device) * width).reshape(1, per, 1)
    c = (qweight.unsqueeze(1) >> shifts) & (2**width - 1)
    return c.reshape(-1, qweight.shape[-1]).t().contiguous()


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      k: int, group_size: int | str, cin_per_group: int = 1,
                      position_group: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 weight matrix ``[N, K]`` in canonical column order from the packed tensors."""
    codes = unpack_codes(qweight, bits).float()
    gid = column_groups(codes.shape[1], group_size, cin_per_group,
                        None if position_group is None else position_group.cpu()).to(codes.device)
    s = scales.float().t()[:, gid]
    z = zeros.float().t()[:, gid]
    return ((codes - z) * s)[:, :k]


def pack_scale_zero(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The kernels' layout of ``scales`` / ``zeros`` ``[n_groups, N]`` (fp16 or bf16, the same
    dtype): ``[n_groups, N, 2]`` with ``[..., 0] = s`` and ``[..., 1] = z``, so a (group, column)
    pair is one 4-byte element (low half s on little-endian devices). Exact: the values are
    copied, not combined."""
    if scales.dtype != zeros.dtype or scales.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"pack_scale_zero: scales/zeros must share a float16/bfloat16 dtype, "
                        f"got {scales.dtype}/{zeros.dtype}")
    if scales.shape != zeros.shape or scales.dim() != 2:
        raise ValueError(f"pack_scale_zero: scales and zeros must be the same 2-D shape, "
                         f"got {tuple(scales.shape)} / {tuple(zeros.shape)}")
    return torch.stack([scales, zeros], dim=-1)


def unpack_scale_zero(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_scale_zero`: ``(scales, zeros)`` ``[n_groups, N]``."""
    return sz[..., 0], sz[..., 1]
