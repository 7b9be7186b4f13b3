"""A plain supervised training loop (SGD + cosine LR) and evaluation for classifiers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10, lr: float = 0.1,
        batch_size: int = 64, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train ``model`` in place on tensors ``x`` ``[N, ...]`` and labels ``y`` ``[N]``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    for _ in tqdm(range(epochs), desc="train", disable=not progress):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1]."""
    return _top1(model.eval(), x, y, batch_size)


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` in the mode it is in."""
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(x)


@torch.no_grad()
def batch_stat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Mean cross-entropy with BatchNorm normalising by each batch's statistics (train mode), for a
    model whose running statistics are not settled yet (a just-grown layer's still sit near their
    init). Updates those running statistics: use it on a copy."""
    model.train()
    total = sum(float(F.cross_entropy(model(xb), yb, reduction="sum"))
                for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return total / len(x)


@torch.no_grad()
def batch_stat_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> float:
    """Top-1 accuracy in [0, 1] with BatchNorm normalising by each batch's statistics (train mode),
    as the training batches' own predictions are made; updates the running statistics: use it on a
    copy."""
    return _top1(model.train(), x, y, batch_size)
