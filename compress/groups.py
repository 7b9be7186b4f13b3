"""Which quantization group (scale row) each column of a layer's weight matrix belongs to.

Columns are in canonical K order (docs/design.md §2): Linear input features, or conv ``(ky, kx, cin)``.
``group_size``: ``-1`` (one group per output channel), a positive multiple of 8 (contiguous K
ranges), ``"position"`` (conv: one group per kernel position) or ``"tier"`` (conv: one group per
overlap tier, positions with the same overlap count, most-covered tier first).
"""
from __future__ import annotations

import torch

from .grid import grid_params

GROUP_MODES = ("position", "tier")


def check_group_size(group_size: int | str, is_conv: bool) -> int | str:
    if isinstance(group_size, str):
        if group_size not in GROUP_MODES:
            raise ValueError(f"group_size {group_size!r} is not -1, a positive multiple of 8, "
                             f"'position' or 'tier'")
        if not is_conv:
            raise ValueError(f"group_size={group_size!r} groups kernel positions and needs a Conv2d; "
                             "use -1 or a multiple of 8 for Linear layers")
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or \
            not (group_size == -1 or (group_size > 0 and group_size % 8 == 0)):
        raise ValueError(f"group_size must be -1, a positive multiple of 8, 'position' or 'tier'; "
                         f"got {group_size!r}")
    return group_size




def position_groups(overlap: torch.Tensor, group_size: str) -> torch.Tensor:
    """``int32[kh*kw]``: scale row of each kernel position, for ``"position"`` or ``"tier"``."""
    flat = overlap.reshape(-1)
    if group_size == "position":
        return torch.arange(flat.numel(), dtype=torch.int32)
    tiers = torch.unique(flat).flip(0)  # most overlap first
    return (flat[:, None] == tiers[None, :]).int().argmax(1).to(torch.int32)




def group_params(w: torch.Tensor, gid: torch.Tensor, n_groups: int, bits: int, sym: bool,
                 mse: bool, scale_dtype: torch.dtype, sym_grid: str = "signed") -> tuple[torch.Tensor, torch.Tensor]:
    """Static ``(scales, zeros)`` ``[rows, n_groups]`` from each group's columns of ``w`` ``[rows, K]``."""
    scales = torch.empty(w.shape[0], n_groups)
    zeros = torch.empty(w.shape[0], n_groups)
    for g in range(n_groups):
        cols = gid[: w.shape[1]] == g
        if cols.any():
            scales[:, g], zeros[:, g] = grid_params(w[:, cols], bits, sym, mse, scale_dtype,
                                                       sym_grid=sym_grid)
        else:  # a group made only of padding: any valid grid dequantizes its zeros to zero
            scales[:, g], zeros[:, g] = grid_params(w.new_zeros(w.shape[0], 1), bits, sym, False, scale_dtype,
                                                       sym_grid=sym_grid)
    return scales, zeros
