"""The one timing method of the demo and the bench (adagrow.bench.measure)."""
from __future__ import annotations

import torch


def test_measure_restores_threads_and_reports_its_method() -> None:
    from adagrow.bench import measure
    before = torch.get_num_threads()
    seen = []
    got = measure(lambda: seen.append(torch.get_num_threads()), warmup=2, runs=5, threads=1)
    assert seen == [1] * 7 and torch.get_num_threads() == before
    assert got["timing"] == {"warmup": 2, "runs": 5, "threads": 1} and 0 <= got["median_ms"] <= got["p90_ms"]
