"""Deployment budgets for growth: deploy parameters, MACs, or batch-1 latency measured on the
target backend after reparameterization.

Backends: ``torch`` times the deploy PyTorch model (eager, every RepConv2d fused); ``ort-cpu``
exports it to ONNX (fp32, the TorchScript exporter: no adagrow.compress dependency) and times an ONNX Runtime CPU
session. Latency is the median of ``runs`` timed batch-1 calls on ``threads`` threads.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
    latency on ``backend`` with ``threads`` threads.
    """

    params: int | None = None
    macs: int | None = None
    latency_ms: float | None = None
    backend: str = "torch"
    threads: int = 1
    runs: int = 50
    train_factor: float = 1.5

    def validate(self) -> None:
        if self.params is None and self.macs is None and self.latency_ms is None:
            raise ValueError("a DeployBudget needs at least one of params, macs, latency_ms")
        for name in ("params", "macs", "latency_ms"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or v <= 0):
                raise ValueError(f"budget {name} must be positive, got {v!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"budget backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.threads < 1 or self.runs < 1:
            raise ValueError(f"threads and runs must be >= 1, got {self.threads}, {self.runs}")


def deploy_latency_ms(deploy: nn.Module, example: torch.Tensor, backend: str = "torch", threads: int = 1,
                      runs: int = 50) -> float:
    """Median batch-1 latency (ms) of a deploy-form model on ``backend`` (see module docstring)."""
    x = example[:1]
    if backend == "torch":
        with torch.no_grad():
            return measure(lambda: deploy(x), WARMUP, runs, threads)["median_ms"]
    if backend == "ort-cpu":
        from adagrow.onnxrt import cpu_session  # the fp32 graph as adagrow.compress.export writes it, timed alone
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "deploy.onnx"
            with torch.no_grad():
                torch.onnx.export(deploy, (x,), str(path), dynamo=False, input_names=["input"])
            sess = cpu_session(path, threads, spinning=False)
            feed = {"input": x.numpy()}
            return measure(lambda: sess.run(None, feed), WARMUP, runs, threads)["median_ms"]
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


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
    return cost


def over_budget(cost: dict[str, float], budget: DeployBudget) -> list[str]:
    """The quantities of ``cost`` that break ``budget`` (empty: it fits)."""
    over = [k for k in ("params", "macs", "latency_ms") if getattr(budget, k) is not None and cost[k] > getattr(budget, k)]
    if budget.params is not None and cost["params_train"] > budget.train_factor * budget.params:
        over.append("params_train")
    return over
