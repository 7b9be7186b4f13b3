"""Uniform affine quantization grid: ``w_hat = (q - z) * s`` with ``q`` in ``[0, 2^bits)``.

Symmetric grids put ``z = 2^(bits-1)``. The default, ``"signed"``, uses all ``2^bits`` codes: the
weight of largest magnitude ``e`` (its sign kept) lands on code 0, ``s = e / -2^(bits-1)``, so the
scale is negative when that weight is positive (llama.cpp Q4_0's rule; every consumer computes
``(q - z) * s`` and loads it unchanged). ``"restricted"`` keeps codes in ``z +- (2^(bits-1) - 1)``
with ``s = max|w| / (2^(bits-1) - 1) > 0`` (what int8 Q/DQ graphs for TensorRT need).
Asymmetric grids span ``[min(w, 0), max(w, 0)]``. Scales are rounded to their storage dtype
(fp16 / bf16) before any code is computed, so the packed weights dequantize to exactly what the
quantizer used.
"""
from __future__ import annotations

import torch

MIN_SCALE = 1e-6  # keeps fp16 scales off zero for all-zero (dead) rows
SYM_GRIDS = ("signed", "restricted")


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return bits


def check_sym_grid(sym_grid: str) -> str:
    if sym_grid not in SYM_GRIDS:
        raise ValueError(f"sym_grid must be one of {SYM_GRIDS}, got {sym_grid!r}")
    return sym_grid


def _params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype,
            sym_grid: str = "signed") -> tuple[torch.Tensor, torch.Tensor]:
    maxq, half = 2**bits - 1, 2 ** (bits - 1)
    if not sym:
        scale = ((xmax - xmin) / maxq).clamp_min(MIN_SCALE).to(scale_dtype).float()
        return scale, torch.round(-xmin / scale).clamp(0, maxq)
    if sym_grid == "restricted":
        scale = (torch.maximum(-xmin, xmax) / (half - 1)).clamp_min(MIN_SCALE).to(scale_dtype).float()
    else:  # signed: the largest-magnitude weight on code 0 (a tie takes the negative one: positive scale)
        extreme = torch.where(-xmin >= xmax, xmin, xmax)
        magnitude = (extreme.abs() / half).clamp_min(MIN_SCALE).to(scale_dtype).float()
        scale = torch.where(extreme > 0, -magnitude, magnitude)
    return scale, torch.full_like(scale, half)


def check_scales(scales: torch.Tensor, w: torch.Tensor, scale_dtype: torch.dtype, name: str = "layer") -> None:
    """Refuse scales that overflowed their storage dtype (inf after rounding to fp16): never stored.

    ``scales`` are the rounded scales (float32), ``w`` the weights they were computed from.
    """
    if not bool(torch.isfinite(scales).all()):
        limit = torch.finfo(scale_dtype).max
        raise ValueError(f"{name}: weights up to |w| = {float(w.abs().max()):.3g} need quantization scales "
                         f"above the {str(scale_dtype)[6:]} maximum {limit:.6g}; quantize with "
                         "scale_dtype='bfloat16' or leave this layer in float (skip it)")


def grid_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False,
                scale_dtype: torch.dtype = torch.float16, grid: int = 100,
                maxshrink: float = 0.8, sym_grid: str = "signed") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)``, each ``[rows]`` float32, for the weights ``w`` ``[rows, cols]``.

    ``sym_grid`` (symmetric grids only): ``"signed"`` or ``"restricted"`` (module docstring).
    ``mse=True`` searches the clipping ratio ``p`` in ``[1 - maxshrink, 1]`` (``grid`` steps) that
    minimises the squared rounding error of each row.
    """
    w = w.float()
    xmin = w.amin(1).clamp_max(0)
    xmax = w.amax(1).clamp_min(0)
    check_sym_grid(sym_grid)
    scale, zero = _params(xmin, xmax, bits, sym, scale_dtype, sym_grid)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(grid):
        p = 1 - i * maxshrink / grid
        s, z = _params(p * xmin, p * xmax, bits, sym, scale_dtype, sym_grid)
        err = (dequantize_codes(quantize_codes(w, s[:, None], z[:, None], bits), s[:, None], z[:, None]) - w)
        err = err.pow(2).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / s) + z, 0, 2^bits - 1)`` (same float dtype as ``w``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale
