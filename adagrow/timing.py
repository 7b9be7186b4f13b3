"""The one timing method of every latency adagrow prints or budgets (demo, ``adagrow bench``,
growth under a latency budget): untimed warm-up calls, then the median (and p90) of timed calls,
with PyTorch on a fixed thread count for the measurement only."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from adagrow.threads import torch_threads


def time_calls(fn: Callable[[], Any], warmup: int, runs: int,
               sync: Callable[[], Any] = lambda: None) -> list[float]:
    """Milliseconds of ``runs`` timed calls of ``fn`` after ``warmup`` untimed ones; ``sync`` waits
    for the device after each call (CUDA), so a call's time includes its kernels."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(fn: Callable[[], Any], warmup: int, runs: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """``{"median_ms", "p90_ms", "timing": {warmup, runs, threads}}`` of ``fn``, with PyTorch on
    ``threads`` threads (restored afterwards) and CUDA synchronized per call when ``device`` is
    "cuda". ONNX Runtime sessions take their thread count when they are created
    (:func:`adagrow.onnxrt.cpu_session`)."""
    with torch_threads(threads):
        times = time_calls(fn, warmup, runs, torch.cuda.synchronize if device == "cuda" else (lambda: None))
    return {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90)),
            "timing": {"warmup": warmup, "runs": runs, "threads": threads}}
