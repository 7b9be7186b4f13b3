"""Training-FLOPs accounting for growth runs (compute-matched comparisons, docs/growth.md).

One training step of a model costs about 3 forward passes (forward, plus backward for the
activations and for the weights) and a multiply-accumulate is 2 FLOPs, so
``train FLOPs per step = 3 * 2 * forward MACs(batch)``. The forward MACs are those of the
train-time model as it is at that step (every re-parameterizable branch counted, growth stages
included): Conv2d and Linear layers, plus the attention products (``q k^T`` and ``att v``) of
Transformer layers. Norms, activations and the optimizer update are left out (a few percent).
"""
from __future__ import annotations

import torch
from torch import nn

from .cnn import flops as layer_macs
from .transformer import EncoderLayer

TRAIN_FACTOR = 3 * 2  # (forward + 2x backward) passes x 2 FLOPs per multiply-accumulate


def forward_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``example`` (batch included) through ``model``."""
    attention = 0

    def hook(layer: EncoderLayer, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal attention
        b, t, _ = inp[0].shape
        attention += 2 * b * layer.heads * t * t * layer.head_dim  # q k^T and att v

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, EncoderLayer)]
    try:
        macs = layer_macs(model, example)
    finally:
        for h in hooks:
            h.remove()
    return macs + attention


class FlopCounter:
    """Cumulative training FLOPs of a run whose model may change (call :meth:`reset` after growth).

    ``example``: one input sample ``[1, ...]``; a step over a batch of ``n`` costs
    ``TRAIN_FACTOR * n * forward_macs(model, example)``.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor):
        if example.shape[0] != 1:
            raise ValueError(f"FlopCounter needs a single-sample example [1, ...], got {tuple(example.shape)}")
        self.model, self.example = model, example
        self.total = 0
        self.per_sample = 0
        self.reset()

    def reset(self) -> None:
        """Re-measure the model (after it grew)."""
        was_training = self.model.training
        self.model.eval()  # no BN statistics update while counting
        self.per_sample = TRAIN_FACTOR * forward_macs(self.model, self.example)
        self.model.train(was_training)

    def step(self, batch: int, forward_only: bool = False) -> int:
        """Account one optimizer step over ``batch`` samples (``forward_only``: an evaluation pass,
        a third of a step); returns the running total."""
        self.total += self.per_sample * batch // (3 if forward_only else 1)
        return self.total


def train_flops(model: nn.Module, example: torch.Tensor, samples: int) -> int:
    """Training FLOPs of ``samples`` sample-steps (e.g. epochs x dataset size) of a fixed model."""
    return FlopCounter(model, example).per_sample * samples
