"""Deployment budgets for growth: deploy parameters, MACs, or batch-1 latency measured on the
target backend after reparameterization.

Backends: ``torch`` times the deploy PyTorch model (eager, every RepConv2d fused); ``ort-cpu``
exports it to ONNX (fp32, the TorchScript exporter: no adagrow.compress dependency) and times an ONNX Runtime CPU
session. Latency is the median of ``runs`` timed batch-1 calls on ``threads`` threads.
:func:`paired_latency_ms` times several models call by call in turn, so that on a machine whose
load changes they are compared under the same load (:func:`within_latency_of`).
"""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adagrow.threads import torch_threads
from adagrow.timing import measure

from .cnn import flops
from .reparam import reparameterize

BACKENDS = ("torch", "ort-cpu")
WARMUP = 10  # untimed calls before a latency measurement


@dataclass
class DeployBudget:
    """Upper limits on the deploy model (None = no limit on that quantity).

    ``params``: deploy parameters (the train-time model may hold ``train_factor`` x as many);
    ``macs``: Conv2d/Linear multiply-accumulates at batch 1; ``latency_ms``: median batch-1
    latency on ``backend`` with ``threads`` threads. ``latency_of``: instead of a fixed number, the
    latency of this deploy-form reference model: every check times the candidate and the reference
    in one :func:`paired_latency_ms` pass, and the candidate fits while its latency is at most
    (1 + ``latency_tolerance``) x the reference's from that pass (on a machine whose load changes, a
    fixed ``latency_ms`` timed earlier compares latencies measured under different loads).
    """

    params: int | None = None
    macs: int | None = None
    latency_ms: float | None = None
    latency_of: nn.Module | None = None
    latency_tolerance: float = 0.0
    backend: str = "torch"
    threads: int = 1
    runs: int = 50
    train_factor: float = 1.5

    def validate(self) -> None:
        if self.params is None and self.macs is None and self.latency_ms is None and self.latency_of is None:
            raise ValueError("a DeployBudget needs at least one of params, macs, latency_ms, latency_of")
        if self.latency_ms is not None and self.latency_of is not None:
            raise ValueError("give a latency budget either as latency_ms or as latency_of (a reference model), not both")
        if self.latency_tolerance < 0:
            raise ValueError(f"latency_tolerance must be >= 0, got {self.latency_tolerance}")
        for name in ("params", "macs", "latency_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v <= 0):
                raise ValueError(f"budget {name} must be positive, got {v!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"budget backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.threads < 1 or self.runs < 1:
            raise ValueError(f"threads and runs must be >= 1, got {self.threads}, {self.runs}")


def _runner(deploy: nn.Module, x: torch.Tensor, backend: str, threads: int, stack: ExitStack) -> Callable[[], Any]:
    """A zero-argument batch-1 call of ``deploy`` on ``backend``; files it needs live in ``stack``."""
    if backend == "torch":
        def call() -> Any:
            with torch.no_grad():
                return deploy(x)
        return call
    if backend == "ort-cpu":
        from adagrow.onnxrt import cpu_session  # the fp32 graph as adagrow.compress.export writes it, timed alone
        path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "deploy.onnx"
        with torch.no_grad():
            torch.onnx.export(deploy, (x,), str(path), dynamo=False, input_names=["input"])
        sess = cpu_session(path, threads, spinning=False)
        feed = {"input": x.numpy()}
        return lambda: sess.run(None, feed)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def deploy_latency_ms(deploy: nn.Module, example: torch.Tensor, backend: str = "torch", threads: int = 1,
                      runs: int = 50) -> float:
    """Median batch-1 latency (ms) of a deploy-form model on ``backend`` (see module docstring)."""
    with ExitStack() as stack:
        return measure(_runner(deploy, example[:1], backend, threads, stack), WARMUP, runs, threads)["median_ms"]


def paired_latency_ms(models: Mapping[str, nn.Module], example: torch.Tensor, backend: str = "torch",
                      threads: int = 1, runs: int = 50,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median batch-1 latency (ms) of each deploy-form model, all timed in one pass: ``runs`` rounds,
    each timing one call of every model in a shuffled order (seeded; so no model always runs first or
    always after the same one, whose cache footprint it would inherit), after ``WARMUP`` untimed calls
    of each. A load that changes during the pass slows every
    model alike, so the medians compare like with like (one :func:`deploy_latency_ms` per model times
    each at a different moment). ``clock``: seconds (``time.perf_counter``; tests inject one)."""
    if not models:
        raise ValueError("paired_latency_ms needs at least one model")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with ExitStack() as stack, torch_threads(threads):
        calls = {n: _runner(models[n], example[:1], backend, threads, stack) for n in names}
        for n in names:
            for _ in range(WARMUP):
                calls[n]()
        order = random.Random(0)
        for _ in range(runs):
            for n in order.sample(names, len(names)):
                t0 = clock()
                calls[n]()
                times[n].append((clock() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}


def fits_latency(ratio: float, tolerance: float) -> bool:
    """Whether a latency ``ratio`` to the budget's reference (from one :func:`paired_latency_ms`
    pass) is within the budget: at most ``1 + tolerance``."""
    return ratio <= 1 + tolerance


def within_latency_of(latency_ms: Mapping[str, float], reference: str, tolerance: float) -> dict[str, float]:
    """Each model's latency over the ``reference`` model's, from one :func:`paired_latency_ms` pass,
    for the models within ``(1 + tolerance)`` x the reference (the reference itself included)."""
    if reference not in latency_ms:
        raise ValueError(f"reference {reference!r} is not among the timed models {sorted(latency_ms)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    ratios = {n: t / latency_ms[reference] for n, t in latency_ms.items()}
    return {n: r for n, r in ratios.items() if fits_latency(r, tolerance)}


def deploy_cost(model: nn.Module, example: torch.Tensor | None = None,
                budget: DeployBudget | None = None) -> dict[str, float]:
    """Deploy parameters, train-time parameters and, given an ``example`` input batch, MACs at
    batch 1 and (if ``budget`` limits it) latency of ``model`` after reparameterization. The
    model is left as it was."""
    was_training = model.training
    deploy = reparameterize(model.eval())
    model.train(was_training)
    cost = {"params": sum(p.numel() for p in deploy.parameters()),
            "params_train": sum(p.numel() for p in model.parameters())}
    if example is None:
        return cost
    cost["macs"] = flops(deploy, example[:1])
    if budget is not None and budget.latency_ms is not None:
        cost["latency_ms"] = deploy_latency_ms(deploy, example, budget.backend, budget.threads, budget.runs)
    if budget is not None and budget.latency_of is not None:
        ms = paired_latency_ms({"deploy": deploy, "reference": budget.latency_of}, example, budget.backend,
                               budget.threads, budget.runs)
        cost["latency_ms"], cost["latency_ratio"] = ms["deploy"], ms["deploy"] / ms["reference"]
    return cost


def over_budget(cost: dict[str, float], budget: DeployBudget) -> list[str]:
    """The quantities of ``cost`` that break ``budget`` (empty: it fits)."""
    over = [k for k in ("params", "macs", "latency_ms") if getattr(budget, k) is not None and cost[k] > getattr(budget, k)]
    if budget.latency_of is not None and not fits_latency(cost["latency_ratio"], budget.latency_tolerance):
        over.append("latency_ratio")
    if budget.params is not None and cost["params_train"] > budget.train_factor * budget.params:
        over.append("params_train")
    return over
