"""The one timing method of the demo, the bench and growth under a latency budget (adagrow.timing)."""
from __future__ import annotations

import torch


def test_measure_restores_threads_and_reports_its_method() -> None:
    from adagrow.timing import measure
    before = torch.get_num_threads()
    seen = []
    got = measure(lambda: seen.append(torch.get_num_threads()), warmup=2, runs=5, threads=1)
    assert seen == [1] * 7 and torch.get_num_threads() == before
    assert got["timing"] == {"warmup": 2, "runs": 5, "threads": 1} and 0 <= got["median_ms"] <= got["p90_ms"]


def test_time_calls_rejects_zero_runs_and_counts_every_call() -> None:
    import pytest

    from adagrow.timing import time_calls
    calls = []
    times = time_calls(lambda: calls.append(1), warmup=3, runs=4)
    assert len(calls) == 7 and len(times) == 4 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        time_calls(lambda: None, warmup=0, runs=0)


def test_budget_latency_uses_the_same_method_on_both_backends(monkeypatch) -> None:
    """grow.budget times PyTorch and ONNX Runtime through adagrow.timing.measure (same warm-up,
    runs and threads), so a budget and the suite measure the same way."""
    from torch import nn

    import adagrow.grow.budget as budget
    seen = []
    real = budget.measure

    def spy(fn, warmup, runs, threads, device="cpu"):
        seen.append((warmup, runs, threads))
        return real(fn, warmup, runs, threads, device)

    monkeypatch.setattr(budget, "measure", spy)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    for backend in budget.BACKENDS:
        assert budget.deploy_latency_ms(model, x, backend, threads=1, runs=3) > 0
    assert seen == [(budget.WARMUP, 3, 1)] * len(budget.BACKENDS)
