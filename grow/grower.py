"""The growth loop (DESIGN §8): train, grow on a schedule, stop, fine-tune.

Every ``interval`` epochs a growth step picks depth or width by the ratio (CNN: two depth growths
per width growth; Transformer: two width growths per depth growth), finds the location
(greedy by BN/LayerNorm scale, or random / sequential), applies it, and rebuilds the optimizer
with the old state. Growth stops by an architecture spec, a parameter budget or automatically;
the remaining epochs fine-tune. Under ``torchrun`` every rank applies rank 0's decision and
rank 0's new parameters, and the DDP wrapper is rebuilt after each growth.
"""
from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cnn import SPEC_NAMES, GrowingCNN, branch_space, importance
from .optim import rebuild_optimizer
from .train import accuracy
from .transformer import GrowingTransformer

LOCATIONS = ("greedy", "random", "sequential")


@dataclass
class GrowthConfig:
    """How and when to grow.

    ``stop``: an architecture spec (``"VGG-2-3-2"``, ``"ViT-D4-H6"``), a deploy-parameter budget
    (int P: deploy params <= P and train-time params <= 1.5 P), or ``"auto"`` (EMA of validation
    accuracy; stop once the gain since the previous growth stays under ``auto_threshold`` more than
    ``auto_tolerance`` times).
    """

    stop: str | int = "auto"
    interval: int | None = None          # epochs between growths (CNN 3, Transformer 5)
    location: str = "greedy"
    branch_sampling: str = "with"        # "with" replacement (thesis) or "without" (greedy)
    width_fraction: float = 0.7
    max_kernel: int = 5
    zero_init: bool = False
    auto_threshold: float = 0.03
    auto_tolerance: int = 1
    ema: float = 0.5
    seed: int = 0

    def validate(self, model: nn.Module) -> None:
        if self.location not in LOCATIONS:
            raise ValueError(f"location must be one of {LOCATIONS}, got {self.location!r}")
        if self.branch_sampling not in ("with", "without"):
            raise ValueError(f"branch_sampling must be 'with' or 'without', got {self.branch_sampling!r}")
        if not 0 < self.width_fraction <= 1:
            raise ValueError(f"width_fraction must be in (0, 1], got {self.width_fraction}")
        if isinstance(self.stop, bool) or not isinstance(self.stop, (str, int)):
            raise ValueError(f"stop must be a spec string, an int budget or 'auto', got {self.stop!r}")
        if isinstance(self.stop, int):
            deploy, train = model.param_counts()
            if self.stop <= 0 or deploy > self.stop or train > 1.5 * self.stop:
                raise ValueError(f"parameter budget {self.stop} is below the starting model "
                                 f"(deploy {deploy}, train-time {train})")
        elif self.stop != "auto":
            parse_spec(self.stop, model)


def parse_spec(spec: str, model: nn.Module) -> tuple[int, ...]:
    """Targets from a spec: CNN layers per stage, or Transformer (depth, heads)."""
    if isinstance(model, GrowingCNN):
        m = re.fullmatch(rf"{SPEC_NAMES[model.family]}((?:-\d+)+)", spec)
        target = tuple(int(v) for v in m.group(1).split("-")[1:]) if m else ()
        if not m or len(target) != len(model.widths):
            raise ValueError(f"spec {spec!r} does not fit a {model.family} model with {len(model.widths)} stages "
                             f"(expected e.g. {SPEC_NAMES[model.family]}-{'-'.join(['2'] * len(model.widths))})")
        if any(t < d for t, d in zip(target, model.depths)):
            raise ValueError(f"spec {spec!r} is smaller than the model ({model.spec()})")
        return target
    m = re.fullmatch(r"(ViT|BERT)-D(\d+)-H(\d+)", spec)
    if not m or (m.group(1) == "ViT") != (model.kind == "vit"):
        raise ValueError(f"spec {spec!r} is not a {'ViT' if model.kind == 'vit' else 'BERT'}-D<depth>-H<heads> spec")
    target = int(m.group(2)), int(m.group(3))
    if target[0] < model.depth or target[1] < model.heads:
        raise ValueError(f"spec {spec!r} is smaller than the model ({model.spec()})")
    return target


class Grower:
    """Decides and applies growth steps. Decisions are plain dicts (broadcastable under DDP)."""

    def __init__(self, model: nn.Module, config: GrowthConfig):
        config.validate(model)
        self.config = config
        self.is_cnn = isinstance(model, GrowingCNN)
        self.pattern = ("depth", "depth", "width") if self.is_cnn else ("width", "width", "depth")
        self.interval = config.interval or (3 if self.is_cnn else 5)
        self.rng = random.Random(config.seed)
        self.steps = 0
        self.stopped = False
        self.ema: float | None = None
        self.ema_at_growth: float | None = None
        self.strikes = 0

    # -------------------------------------------------------------- decisions
    def _kinds_left(self, model: nn.Module) -> list[str]:
        if not isinstance(self.config.stop, str) or self.config.stop == "auto":
            return ["depth", "width"]
        target = parse_spec(self.config.stop, model)
        if self.is_cnn:
            return ["depth"] if list(target) != model.depths else []
        kinds = []
        if model.depth < target[0]:
            kinds.append("depth")
        if model.heads < target[1]:
            kinds.append("width")
        return kinds

    def _depth(self, model: nn.Module) -> dict[str, Any]:
        loc = self.config.location
        if not self.is_cnn:
            scales = [layer.norm_scale() for layer in model.layers]
            after = {"greedy": max(range(len(scales)), key=scales.__getitem__),
                     "random": self.rng.randrange(len(scales)), "sequential": self.steps % len(scales)}[loc]
            return {"kind": "depth", "after": after}
        stages = list(range(len(model.stages)))
        if isinstance(self.config.stop, str) and self.config.stop != "auto":
            target = parse_spec(self.config.stop, model)
            stages = [i for i in stages if model.depths[i] < target[i]]
        score = {i: importance(model.stages[i]) if len(model.stages[i]) else importance(model.stem) for i in stages}
        stage = {"greedy": max(stages, key=score.__getitem__), "random": self.rng.choice(stages),
                 "sequential": stages[self.steps % len(stages)]}[loc]
        layers = list(model.stages[stage])
        if not layers:
            position = 0
        elif loc == "greedy":  # after the most important layer of the stage
            position = max(range(len(layers)), key=lambda j: importance(layers[j])) + 1
        else:
            position = self.rng.randint(1 if stage else 0, len(layers))
        return {"kind": "depth", "stage": stage, "position": position}

    def _width(self, model: nn.Module) -> dict[str, Any]:
        if not self.is_cnn:
            return {"kind": "width"}
        convs = model.rep_convs()
        names = list(convs)
        n = max(1, math.ceil(self.config.width_fraction * len(names)))
        if self.config.location == "greedy":
            chosen = sorted(names, key=lambda k: importance(convs[k]), reverse=True)[:n]
        elif self.config.location == "random":
            chosen = self.rng.sample(names, n)
        else:
            start = (self.steps * n) % len(names)
            chosen = [names[(start + j) % len(names)] for j in range(n)]
        branches = {}
        for name in chosen:
            space = branch_space(convs[name], self.config.max_kernel)
            if self.config.branch_sampling == "without":
                space = [s for s in space if s not in convs[name].branches] or space
            branches[name] = self.rng.choice(space)
        return {"kind": "width", "branches": branches}

    def decide(self, model: nn.Module, val_acc: float | None) -> dict[str, Any] | None:
        """The next growth step, or None once growth has stopped (then it stays stopped)."""
        if self.stopped:
            return None
        if self.config.stop == "auto" and val_acc is not None:
            self.ema = val_acc if self.ema is None else self.config.ema * val_acc + (1 - self.config.ema) * self.ema
            if self.ema_at_growth is not None and self.ema - self.ema_at_growth < self.config.auto_threshold:
                self.strikes += 1
                if self.strikes > self.config.auto_tolerance:
                    self.stopped = True
                    return None
            self.ema_at_growth = self.ema
        kinds = self._kinds_left(model)
        if not kinds:
            self.stopped = True
            return None
        kind = self.pattern[self.steps % len(self.pattern)]
        kind = kind if kind in kinds else kinds[0]
        decision = self._depth(model) if kind == "depth" else self._width(model)
        if isinstance(self.config.stop, int):
            trial = copy.deepcopy(model)
            apply_growth(trial, decision, self.config)
            deploy, train = trial.param_counts()
            if deploy > self.config.stop or train > 1.5 * self.config.stop:
                self.stopped = True
                return None
        self.steps += 1
        return decision


def apply_growth(model: nn.Module, decision: dict[str, Any], config: GrowthConfig) -> dict:
    """Apply a decision in place; returns the optimizer carry records for widened parameters."""
    if decision["kind"] == "depth":
        if isinstance(model, GrowingCNN):
            model.insert_layer(decision["stage"], decision["position"], config.zero_init)
        else:
            model.insert_layer(decision["after"], config.zero_init)
        return {}
    if isinstance(model, GrowingTransformer):
        return model.add_head(config.zero_init)
    convs = model.rep_convs()
    for name, spec in decision["branches"].items():
        convs[name].add_branch(spec, zero_init=config.zero_init, grow_kernel=True)
    return {}


@dataclass
class GrowResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)


def _cosine(base: float, epoch: int, total: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * epoch / max(total, 1)))


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def grow(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
         epochs: int, config: GrowthConfig | None = None, lr: float | None = None, optimizer: str | None = None,
         batch_size: int = 64, weight_decay: float = 5e-4, progress: bool = True) -> GrowResult:
    """Grow ``model`` (GrowingCNN or GrowingTransformer) while training for ``epochs`` epochs.

    Defaults follow the thesis: SGD (momentum 0.9) at lr 0.1 for CNNs, AdamW at 1e-3 for
    Transformers, cosine LR over all epochs. Under torchrun (process group initialised) each rank
    trains on its shard and every growth decision comes from rank 0.
    """
    if not isinstance(model, (GrowingCNN, GrowingTransformer)):
        raise TypeError(f"grow() needs a GrowingCNN or GrowingTransformer, got {type(model).__name__}")
    config = config or GrowthConfig()
    grower = Grower(model, config)
    rank, world = _distributed()
    is_cnn = isinstance(model, GrowingCNN)
    optimizer = optimizer or ("sgd" if is_cnn else "adamw")
    lr = lr if lr is not None else (0.1 if is_cnn else 1e-3)

    def make_opt() -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
        if optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")

    def wrap() -> nn.Module:
        return nn.parallel.DistributedDataParallel(model) if world > 1 else model

    opt, net = make_opt(), wrap()
    x, y = train
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    since = 0
    for epoch in tqdm(range(epochs), desc="grow", disable=not progress or rank != 0):
        for g in opt.param_groups:
            g["lr"] = _cosine(lr, epoch, epochs)
        model.train()
        order = torch.randperm(len(x), generator=gen)[rank::world]
        for idx in order.split(batch_size):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_acc = accuracy(model, *val) if rank == 0 else None
        since += 1
        event = {"epoch": epoch + 1, "val_acc": val_acc, "spec": model.spec()}
        if since >= grower.interval and not grower.stopped and epoch < epochs - 1:
            since = 0
            payload = [grower.decide(model, val_acc) if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(payload, src=0)
                grower.stopped = payload[0] is None
            decision = payload[0]
            if decision is not None:
                carry = apply_growth(model, decision, config)
                if world > 1:  # every rank continues from rank 0's new parameters
                    for t in [*model.parameters(), *model.buffers()]:
                        dist.broadcast(t.data, src=0)
                opt, net = rebuild_optimizer(opt, model, carry), wrap()
                event.update(growth=decision, spec=model.spec())
        event["params_deploy"], event["params_train"] = model.param_counts()
        history.append(event)
    if world > 1:  # DDP keeps parameters equal; BN running statistics last moved per rank
        for t in model.buffers():
            dist.broadcast(t.data, src=0)
    return GrowResult(model.eval(), history)
