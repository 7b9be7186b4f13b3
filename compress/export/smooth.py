"""SmoothQuant-style migration of activation outliers into Linear weights (exact in float).

For a Linear ``y = x W^T + b`` with per-input-channel factors ``s``: ``y = (x / s) (W s)^T + b``.
With ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` (Xiao et al., 2023) the channels where a
Transformer's activations have outliers are divided down and the weight columns scaled up, so
one per-tensor activation scale fits every channel and the per-channel weight grid absorbs the
rest. Linears fed by the same tensor (query / key / value) share one ``s`` so their inputs stay
one tensor. In the exported graph ``x / s`` is one ``Mul`` in front of the quantized MatMuls.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layer import set_module


class SmoothedLinear(nn.Module):
    """``linear(x * inv_scale)`` where ``linear`` holds ``W * s`` (``inv_scale = 1 / s``, ``[K]``)."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        with torch.no_grad():
            linear.weight.mul_(scale.to(linear.weight)[None, :])
        self.register_buffer("inv_scale", (1.0 / scale).to(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


@torch.no_grad()
def smooth_linears(model: nn.Module, run_calibration, alpha: float = 0.5) -> dict[str, float]:
    """Insert :class:`SmoothedLinear` for every ``nn.Linear`` of ``model`` (in place).

    ``run_calibration()`` runs the model on the calibration data. Returns ``{layer: max s / min s}``
    (how strongly each layer's channels were rebalanced).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    amax: dict[str, torch.Tensor] = {}
    group_of: dict[str, str] = {}
    last: dict[str, object] = {"input": None, "name": None}

    def hook(name: str):
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            x = inp[0]
            cur = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], cur) if name in amax else cur
            if name not in group_of:  # consecutive Linears on the very same tensor share s
                group_of[name] = last["name"] if x is last["input"] else name
            last["input"], last["name"] = x, group_of[name]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        run_calibration()
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, list[str]] = {}
    for name in linears:
        if name in amax:
            groups.setdefault(group_of[name], []).append(name)
    spread = {}
    for members in groups.values():
        wmax = torch.stack([linears[n].weight.detach().abs().amax(0).float() for n in members]).amax(0)
        s = amax[members[0]].clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1 - alpha)
        s = s.clamp(1e-5, 1e5)
        for n in members:
            set_module(model, n, SmoothedLinear(linears[n], s))
            spread[n] = float(s.max() / s.min())
    return spread
