"""Datasets that need no download: scikit-learn's bundled handwritten digits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def digits(size: int = 16, test_fraction: float = 0.25, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 8x8 digits as ``[N, 1, size, size]`` float32 (normalized), split train/test.

    Returns ``x_train, y_train, x_test, y_test``; the split is stratified-free but seeded.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
