"""Rebuild an optimizer after growth, inheriting the old state (momentum, Adam moments, step).

Surviving parameters keep their state; widened parameters get their old state copied into the
slices that hold their old values (``carry`` records); new parameters and new slices start at 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .transformer import Carry


def rebuild_optimizer(old: torch.optim.Optimizer, model: nn.Module, carry: Carry | None = None) -> torch.optim.Optimizer:
    """A new optimizer of ``old``'s class and hyper-parameters over ``model``'s parameters."""
    carry = carry or {}
    group = {k: v for k, v in old.param_groups[0].items() if k != "params"}
    new = type(old)([p for p in model.parameters() if p.requires_grad], lr=group["lr"])
    new.param_groups[0].update(group)  # every hyper-parameter as it was (momentum, betas, decay...)
    for p in new.param_groups[0]["params"]:
        if p in old.state:
            new.state[p] = old.state[p]
        elif p in carry:
            src, idx = carry[p]
            if src not in old.state:
                continue
            state = {}
            where = torch.meshgrid(*(i.to(p.device) for i in idx), indexing="ij")
            for key, val in old.state[src].items():
                if torch.is_tensor(val) and val.shape == src.shape:
                    fresh = torch.zeros_like(p)
                    fresh[where] = val
                    state[key] = fresh
                else:  # step counters and other scalars
                    state[key] = val.clone() if torch.is_tensor(val) else val
            new.state[p] = state
    return new
