"""Datasets that need no download: scikit-learn's bundled digits, and the user's own files
(CIFAR-10 python pickle batches, or ``.npz`` arrays ``x``, ``y``)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> Split:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _normalize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def digits(size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """The 1797 8x8 digits as ``[N, 1, size, size]`` float32 (normalized), split train/test.

    Returns ``x_train, y_train, x_test, y_test`` (a seeded random split).
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return _split(_normalize(x, size), y, test_fraction, seed)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError as exc:
        raise ValueError(f"CIFAR-10 batch missing: {path}") from exc
    except Exception as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch (corrupt?): {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no b'data' / b'labels')")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: CIFAR-10 data must be [N, 3072] uint8, got {data.shape}")
    return batch


def cifar10(root: str | Path, size: int | None = None) -> Split:
    """CIFAR-10 from the python pickle batches in ``root`` (``data_batch_1..5``, ``test_batch``)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"CIFAR-10 folder not found: {root}")

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [_unpickle(root / n) for n in names]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
        return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = load([f"data_batch_{i}" for i in range(1, 6)])
    x_te, y_te = load(["test_batch"])
    x = _normalize(torch.cat([x_tr, x_te]), size)
    return x[: len(x_tr)], y_tr, x[len(x_tr):], y_te


def npz(path: str | Path, size: int | None = None, test_fraction: float = 0.25, seed: int = 0) -> Split:
    """Arrays ``x`` ``[N, C, H, W]`` (or ``[N, H, W]``) and ``y`` ``[N]`` from an ``.npz`` file;
    ``x_test`` / ``y_test`` are used as the test split when present."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"npz file not found: {path}")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npz file (corrupt?): {exc}") from exc
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"{path}: needs arrays 'x' and 'y', found {sorted(arrays)}")

    def prep(x: np.ndarray, y: np.ndarray, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:, None] if x.ndim == 3 else x
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{path}: {name} must be [N, C, H, W] (or [N, H, W]) with labels [N], "
                             f"got {x.shape} and {y.shape}")
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))

    x, y = prep(arrays["x"], arrays["y"], "x/y")
    if "x_test" in arrays and "y_test" in arrays:
        xt, yt = prep(arrays["x_test"], arrays["y_test"], "x_test/y_test")
        allx = _normalize(torch.cat([x, xt]), size)
        return allx[: len(x)], y, allx[len(x):], yt
    return _split(_normalize(x, size), y, test_fraction, seed)


def load_dataset(spec: str = "digits", size: int | None = 16) -> Split:
    """``digits`` | ``cifar10:/path/to/cifar-10-batches-py`` | ``npz:/path/file.npz``."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return digits(size=size or 8)
    if kind == "cifar10" and arg:
        return cifar10(arg, size)
    if kind == "npz" and arg:
        return npz(arg, size)
    raise ValueError(f"unknown data source {spec!r}; use 'digits', 'cifar10:/path' or 'npz:/path'")
