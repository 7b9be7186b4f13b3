"""Datasets that need no download: scikit-learn's bundled digits, a harder seeded "cluttered
digits" task built from them, and the user's own files (CIFAR-10 binary batches, or ``.npz``
arrays ``x``, ``y``; nothing is unpickled)."""
from __future__ import annotations

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


def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def _resized(images: np.ndarray, side: int) -> np.ndarray:
    """``[N, 8, 8]`` -> ``[N, side, side]`` (bilinear)."""
    x = F.interpolate(torch.from_numpy(images)[:, None], size=(side, side), mode="bilinear", align_corners=False)
    return x[:, 0].clamp_(0, 1).numpy()


def _render(images: np.ndarray, labels: np.ndarray, n: int, size: int, difficulty: float,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases ``[n, size, size]``: one digit of ``images`` at a random place and scale,
    distractor fragments cut from other digits of the same pool, Gaussian noise."""
    base = size // 2
    sides = sorted({max(4, base + d) for d in (-2 * (size // 16), 0, 2 * (size // 16))})
    scaled = {s: _resized(images, s) for s in sides}
    frag = max(3, size // 5)
    n_frag = int(round(difficulty * 8))
    canvas = np.zeros((n, size, size), np.float32)
    pick = rng.integers(len(images), size=n)
    for i, j in enumerate(pick):
        side = sides[rng.integers(len(sides))]
        for _ in range(rng.poisson(n_frag) if n_frag else 0):  # fragments first; the digit is drawn over them
            src = scaled[side][rng.integers(len(images))]
            r, c = rng.integers(side - frag + 1, size=2)
            y0, x0 = rng.integers(size - frag + 1, size=2)
            np.maximum(canvas[i, y0:y0 + frag, x0:x0 + frag], src[r:r + frag, c:c + frag],
                       out=canvas[i, y0:y0 + frag, x0:x0 + frag])
        y0, x0 = rng.integers(size - side + 1, size=2)
        np.maximum(canvas[i, y0:y0 + side, x0:x0 + side], scaled[side][j], out=canvas[i, y0:y0 + side, x0:x0 + side])
    canvas += rng.normal(0.0, 0.3 * difficulty, canvas.shape).astype(np.float32)
    return canvas, labels[pick]


def cluttered_digits(size: int = 24, difficulty: float = 0.6, n_train: int = 4000, n_test: int = 2000,
                     source_test_fraction: float = 0.4, seed: int = 0) -> Split:
    """A harder, seeded, offline task: each ``[1, size, size]`` image holds one digit (placed at a
    random position and scale, about half the canvas) among distractor fragments cut from other
    digits, plus Gaussian noise. ``difficulty`` in [0, 1] sets the fragment count (Poisson mean
    ``8 * difficulty``) and the noise (std ``0.3 * difficulty``).

    Train and test images are rendered from *disjoint* source digits (a seeded split of the 1797
    sklearn digits, ``source_test_fraction`` for test), so the test set measures generalisation
    to unseen handwriting. Normalised with the training statistics.
    Returns ``x_train [n_train, 1, size, size], y_train, x_test, y_test`` (float32 / int64).
    """
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if size < 12:
        raise ValueError(f"cluttered digits need a canvas of at least 12 pixels, got {size}")
    if n_train < 1 or n_test < 1 or not 0 < source_test_fraction < 1:
        raise ValueError(f"need n_train, n_test >= 1 and 0 < source_test_fraction < 1 "
                         f"(got {n_train}, {n_test}, {source_test_fraction})")
    images, labels = _source_digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    n_src_test = int(len(images) * source_test_fraction)
    test_src, train_src = perm[:n_src_test], perm[n_src_test:]
    x_tr, y_tr = _render(images[train_src], labels[train_src], n_train, size, difficulty, rng)
    x_te, y_te = _render(images[test_src], labels[test_src], n_test, size, difficulty, rng)
    mean, std = float(x_tr.mean()), float(x_tr.std()) or 1.0
    as_x = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731
    return as_x(x_tr), torch.from_numpy(y_tr), as_x(x_te), torch.from_numpy(y_te)


def train_val_split(x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.15,
                    seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Carve a seeded validation split out of the *training* data: ``((x_fit, y_fit), (x_val, y_val))``.

    Growth decisions and automatic stopping read the validation split; the test set stays unseen.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(len(x) * val_fraction))
    if n_val >= len(x):
        raise ValueError(f"{len(x)} training samples are too few to carve a validation split")
    val, fit = perm[:n_val], perm[n_val:]
    return (x[fit], y[fit]), (x[val], y[val])


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (no pickle)."""
    if not path.is_file():
        raise ValueError(f"CIFAR-10 batch missing: {path} (use the binary version, cifar-10-batches-bin)")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise ValueError(f"{path}: not a CIFAR-10 binary batch ({raw.size} bytes is not a multiple of 3073)")
    rec = raw.reshape(-1, 3073)
    if rec[:, 0].max() > 9:
        raise ValueError(f"{path}: CIFAR-10 labels must be 0..9, found {int(rec[:, 0].max())}")
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0]


def cifar10(root: str | Path, size: int | None = None) -> Split:
    """CIFAR-10 from the binary batches in ``root`` (``data_batch_1.bin``..``5``, ``test_batch.bin``).

    The binary version is read with numpy; the python (pickle) version is not accepted, because
    unpickling a downloaded file can run arbitrary code.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"CIFAR-10 folder not found: {root}")

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [_cifar_batch(root / n) for n in names]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        return torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y.astype(np.int64))

    x_tr, y_tr = load([f"data_batch_{i}.bin" for i in range(1, 6)])
    x_te, y_te = load(["test_batch.bin"])
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


MAX_IMAGE_SIZE = 512  # pixels per side: the bundled digits at 4096 would take 120 GB


def load_dataset(spec: str = "digits", size: int | None = 16) -> Split:
    """``digits`` | ``cluttered[:difficulty]`` (canvas ``size``, default 24) |
    ``cifar10:/path/to/cifar-10-batches-bin`` | ``npz:/path/file.npz``. ``size`` is at most
    :data:`MAX_IMAGE_SIZE` (``ValueError`` before anything is resized)."""
    if size is not None and not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size {size} is outside 1..{MAX_IMAGE_SIZE} pixels per side")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return digits(size=size or 8)
    if kind == "cluttered":
        try:
            difficulty = float(arg) if arg else 0.6
        except ValueError:
            raise ValueError(f"cluttered difficulty must be a number in [0, 1], got {arg!r}") from None
        return cluttered_digits(size=size or 24, difficulty=difficulty)
    if kind == "cifar10" and arg:
        return cifar10(arg, size)
    if kind == "npz" and arg:
        return npz(arg, size)
    raise ValueError(f"unknown data source {spec!r}; use 'digits', 'cluttered[:difficulty]', "
                     "'cifar10:/path' or 'npz:/path'")
