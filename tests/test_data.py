"""Offline datasets: the seeded cluttered-digits task, the validation split, CIFAR-10 binary batches."""
import numpy as np
import pytest
import torch

from adagrow.data import cifar10, cluttered_digits, load_dataset, train_val_split


def test_cluttered_digits_seeded_disjoint_sources_and_difficulty() -> None:
    a = cluttered_digits(size=16, n_train=200, n_test=100, seed=1)
    b = cluttered_digits(size=16, n_train=200, n_test=100, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(cluttered_digits(size=16, n_train=200, n_test=100, seed=2)[0], a[0])  # seeded
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (200, 1, 16, 16) and x_te.shape == (100, 1, 16, 16) and x_tr.dtype == torch.float32
    assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std()) - 1) < 1e-2  # training statistics
    assert set(y_tr.tolist()) == set(range(10)) and y_te.dtype == torch.int64
    # difficulty adds clutter: more lit pixels away from the digit, more noise
    easy = cluttered_digits(size=16, difficulty=0.0, n_train=200, n_test=10)[0]
    hard = cluttered_digits(size=16, difficulty=1.0, n_train=200, n_test=10)[0]
    lit = lambda x: float((x > x.mean() + x.std()).float().mean())  # noqa: E731
    assert lit(hard) > lit(easy)
    with pytest.raises(ValueError, match="difficulty"):
        cluttered_digits(difficulty=1.5)
    with pytest.raises(ValueError, match="at least 12"):
        cluttered_digits(size=8)
    assert load_dataset("cluttered:0.3", 16)[0].shape[-1] == 16
    with pytest.raises(ValueError, match="difficulty must be a number"):
        load_dataset("cluttered:hard", 16)


def test_cluttered_digits_train_and_test_never_share_a_source_digit(monkeypatch) -> None:
    import adagrow.data as data
    images, _ = data._source_digits()
    sources, render = [], data._render
    monkeypatch.setattr(data, "_render", lambda imgs, *a: sources.append(imgs) or render(imgs, *a))
    cluttered_digits(size=16, n_train=50, n_test=20, seed=3)
    train, test = sources
    rows = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert len(train) + len(test) == len(images) and abs(len(test) / len(images) - 0.4) < 0.01
    assert not rows(train) & rows(test)  # no handwriting sample on both sides


def test_train_val_split_is_carved_from_training_data() -> None:
    x, y = torch.arange(100.0)[:, None], torch.arange(100)
    (xf, yf), (xv, yv) = train_val_split(x, y, 0.2, seed=3)
    assert len(xv) == 20 and len(xf) == 80 and not set(yf.tolist()) & set(yv.tolist())
    assert sorted(yf.tolist() + yv.tolist()) == list(range(100))
    assert torch.equal(xf[:, 0].long(), yf) and torch.equal(xv[:, 0].long(), yv)  # x and y stay paired
    assert yv.tolist() != list(range(20)) and yv.tolist() != sorted(yv.tolist())  # shuffled, not a slice
    assert not torch.equal(train_val_split(x, y, 0.2, seed=4)[1][1], yv)  # the seed matters
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(x, y, 1.0)


def test_cifar10_binary_batches_without_pickle(tmp_path) -> None:
    rng = np.random.default_rng(0)

    def batch(name: str, n: int) -> np.ndarray:
        rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        rec.tofile(tmp_path / name)
        return rec

    recs = [batch(f"data_batch_{i}.bin", 4) for i in range(1, 6)]
    test = batch("test_batch.bin", 3)
    x_tr, y_tr, x_te, y_te = cifar10(tmp_path)
    assert x_tr.shape == (20, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    assert y_tr.tolist() == np.concatenate([r[:, 0] for r in recs]).tolist() and y_te.tolist() == test[:, 0].tolist()
    # pixels: bytes 1..3072 of each record, CHW, scaled to [0, 1], normalised per channel over all images
    raw = torch.from_numpy(np.concatenate([r[:, 1:] for r in recs + [test]]).reshape(-1, 3, 32, 32) / 255.0).float()
    expected = (raw - raw.mean((0, 2, 3), keepdim=True)) / raw.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(torch.cat([x_tr, x_te]), expected, atol=1e-5, rtol=0)
    (tmp_path / "test_batch.bin").write_bytes(b"\x80\x04junk")  # e.g. a pickle: rejected by size, never loaded
    with pytest.raises(ValueError, match="not a CIFAR-10 binary batch"):
        cifar10(tmp_path)
