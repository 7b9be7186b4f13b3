"""Column orders for OBS (docs/design.md §3): none, act, reparam (overlap tiers, saliency inside), and
the per-column quantities they rank by."""
from __future__ import annotations

import torch

ORDERS = ("none", "act", "reparam", "reparam-dynamic")


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def column_overlap(overlap: torch.Tensor | None, k: int, cin_per_group: int) -> torch.Tensor:
    """``int64[K]``: the overlap count of every column (all ones without a map)."""
    if overlap is None:
        return torch.ones(k, dtype=torch.int64)
    return overlap.reshape(-1).long().cpu().repeat_interleave(cin_per_group)


def saliency(err2: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``s_j = sum_rows (q(w_ij) - w_ij)^2 / [H^-1]_jj`` from each column's summed
    squared rounding error ``[K]``."""
    return err2 / hinv_diag


def tiered_order(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorted by ``primary`` descending, ties by ``secondary`` descending (stable)."""
    by_secondary = torch.argsort(secondary, descending=True, stable=True)
    return by_secondary[torch.argsort(primary[by_secondary], descending=True, stable=True)]


def static_order(order: str, h_diag: torch.Tensor, col_overlap: torch.Tensor,
                 sal: torch.Tensor) -> torch.Tensor:
    """The permutation (new position -> canonical column) for a static order."""
    if order == "none":
        return torch.arange(h_diag.numel())
    if order == "act":
        return torch.argsort(h_diag, descending=True, stable=True)
    return tiered_order(col_overlap.to(sal.dtype), sal)
