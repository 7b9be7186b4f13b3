"""The growth loop (docs/design.md §8): train, grow on a schedule, stop, fine-tune.

Every ``interval`` (the thesis: 3 epochs for CNNs, 5 for Transformers; during the first
``grow_fraction`` of training) a growth step picks depth or width by the ratio (CNN: two depth
growths per width growth; Transformer: two width growths per depth growth), finds the location
(CNN default: balanced, the stage with the fewest layers, the one nearest the input first;
Transformer default: a probe, a candidate layer after every layer, each trained briefly on a copy,
the lowest validation loss wins; or greedy by BN/LayerNorm scale of layers that have trained at
least two intervals, or random / sequential), applies it with the thesis' init by default
(function-preserving with ``preserve``), rebuilds the optimizer with the old state (new state
zero) and restarts the cosine LR schedule over the remaining steps. Growth stops by an architecture spec,
a deploy budget (params / MACs / measured latency; a step that would break it is replaced by a
cheaper one first) or automatically; the remaining steps fine-tune. Under ``torchrun`` every rank applies rank 0's decision and
rank 0's new parameters, and the DDP wrapper is rebuilt after each growth.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .budget import DeployBudget, deploy_cost, over_budget
from .checkpoint import build_from_arch
from .cnn import SPEC_NAMES, GrowingCNN, branch_space, importance
from .flops import FlopCounter
from .optim import rebuild_optimizer
from .train import accuracy, batch_stat_accuracy, batch_stat_loss
from .transformer import Carry, GrowingTransformer

LOCATIONS = ("balanced", "probe", "greedy", "random", "sequential")
DEFAULT_LOCATION = {"cnn": "balanced", "transformer": "probe"}
LR_AFTER_GROWTH = ("continue", "restart")
AUTO_RULES = ("gap", "gain", "underfit", "fit_gain")
INTERVAL_EPOCHS = {"cnn": 3.0, "transformer": 5.0}  # the thesis' training between growths
Probe = Callable[[list[dict[str, Any]]], list[float]]  # depth options -> validation loss after a short training


@dataclass
class GrowthConfig:
    """How and when to grow.

    ``stop``: an architecture spec (``"VGG-2-3-2"``, ``"ViT-D4-H6"``), a deploy-parameter budget
    (int P: deploy params <= P and train-time params <= 1.5 P), ``"auto"`` (by ``auto_rule``) or
    ``"budget"`` (grow until ``budget`` would be broken). ``auto_rule`` picks what ``"auto"`` reads:
    ``"fit_gain"`` (default): grow while growth still buys training fit (below); it is the rule
    that grew different sizes in order of task difficulty on the 40-epoch benchmark
    (docs/growth.md). ``"gain"`` (the thesis): EMA of the (eval-mode) validation accuracy, stop once
    the gain since the previous growth stays under ``auto_threshold`` more than ``auto_tolerance``
    times; it reads training progress, and on a short recipe it grew the smallest net on the hardest task.
    ``"gap"`` compares the training error with the generalisation gap at each growth point: the
    training accuracy A over the epoch before it (the batches' own train-mode predictions, no extra
    pass) and the validation accuracy V measured the same way (BatchNorm on batch statistics, one
    forward pass over the validation split); grow while the model is underfitting,
    1 - A > (A - V) / ``gap_ratio``, stop once the gap A - V reaches ``gap_ratio`` times the training
    error (no accuracy level, so no task scale, in it; its sizes across tasks followed seed noise,
    docs/growth.md "Stop rule"). ``"underfit"``: grow while A is below ``fit_target``, an absolute
    accuracy that belongs to one recipe and task family (an easy task crosses it before the first growth).
    ``"fit_gain"``: the same strike count as ``"gain"``
    (``auto_threshold``, ``auto_tolerance``) read on A, the training accuracy over the epoch before
    each growth point (raw, no EMA: it already averages an epoch's batches), against A at the previous
    growth point; no accuracy level in it (docs/growth.md "fit_gain").
    ``budget``: a :class:`DeployBudget` (deploy params / MACs / measured latency) that every step
    must keep; a step that would break it is replaced by a cheaper one, or growth stops.
    ``interval_epochs``: epochs of training between growths (None: the thesis' 3 for CNNs, 5 for
    Transformers); ``interval``: optimizer steps between growths, overrides it. No growth after
    ``grow_fraction`` of the steps (the rest fine-tunes). ``preserve``: function-preserving new
    layers / branches / heads (see ``insert_layer``, ``add_branch``, ``add_head``); the default
    False is the thesis' init (each CNN family's own init, N(0, 0.1^2) for Transformers), which
    measured better (docs/growth.md). ``location``: where depth growth goes (None: ``"balanced"`` for
    CNNs, ``"probe"`` for Transformers); ``"balanced"`` (CNN only) appends the layer to the stage with
    the fewest family layers, the one nearest the input on a tie (so the stages grow in turn, from the
    input; measured better than the probe, docs/growth.md); ``"probe"``
    inserts a candidate layer at the end of every stage (Transformer: after every layer) into a copy
    of the model, trains each copy for ``probe_steps`` optimizer steps on the same batches (None: a
    tenth of the growth interval) and keeps the one with the lowest validation loss (the probes'
    FLOPs are charged to the run); ``"greedy"`` ranks by BN / LayerNorm scale, ``"random"`` and
    ``"sequential"`` (stage / layer after stage, one per depth growth) ignore the model. Width growth
    ranks convs by BN scale under ``"balanced"``, ``"probe"`` and ``"greedy"``. ``lr_after_growth``: ``"restart"`` (default) the cosine schedule from the base LR
    over the remaining steps after every growth (new layers start at a high LR; measured better than
    the thesis' one cosine, docs/growth.md), or ``"continue"`` it. ``max_kernel``: None keeps every conv's deploy kernel (new branches fuse into it),
    an int lets branches grow kernels up to that size. ``widen_dim``: Transformer head growth also
    widens the residual stream by one head_dim (as the thesis). ``retrain``: after growing, train
    the found architecture from scratch for the same epochs and return that model. ``bn_batches``
    (``auto_rule="gain"``): before each validation the stop rule reads, re-estimate the BatchNorm
    running statistics of a copy of the model from this many training batches (precise BN,
    ``torch.optim.swa_utils.update_bn``; their forward FLOPs are charged), so the rule reads the
    model as it is rather than statistics that lag the weights after an LR restart; 0 (default)
    reads the running statistics as they are.
    """

    stop: str | int = "auto"
    budget: DeployBudget | None = None
    interval: int | None = None
    interval_epochs: float | None = None
    grow_fraction: float = 0.75
    location: str | None = None
    probe_steps: int | None = None
    lr_after_growth: str = "restart"
    branch_sampling: str = "with"        # "with" replacement (thesis) or "without" (greedy)
    width_fraction: float = 0.7
    max_kernel: int | None = None
    preserve: bool = False
    widen_dim: bool = True
    retrain: bool = False
    auto_threshold: float = 0.03
    auto_tolerance: int = 1
    auto_rule: str = "fit_gain"
    gap_ratio: float = 1.0
    fit_target: float = 0.62
    ema: float = 0.5
    bn_batches: int = 0
    seed: int = 0

    def validate(self, model: nn.Module) -> None:
        if self.location is not None and self.location not in LOCATIONS:
            raise ValueError(f"location must be one of {LOCATIONS} or None, got {self.location!r}")
        if self.location == "balanced" and not isinstance(model, GrowingCNN):
            raise ValueError("location='balanced' balances the stages of a CNN; a Transformer has one stack of "
                             "layers: use 'probe', 'greedy', 'random' or 'sequential'")
        if self.auto_rule not in AUTO_RULES:
            raise ValueError(f"auto_rule must be one of {AUTO_RULES}, got {self.auto_rule!r}")
        if not self.gap_ratio > 0:
            raise ValueError(f"gap_ratio must be > 0 (generalisation gap / training error at the stop), "
                             f"got {self.gap_ratio}")
        if self.bn_batches < 0:
            raise ValueError(f"bn_batches must be >= 0 training batches, got {self.bn_batches}")
        if not 0 < self.fit_target <= 1:
            raise ValueError(f"fit_target must be a training accuracy in (0, 1], got {self.fit_target}")
        if self.lr_after_growth not in LR_AFTER_GROWTH:
            raise ValueError(f"lr_after_growth must be one of {LR_AFTER_GROWTH}, got {self.lr_after_growth!r}")
        if self.probe_steps is not None and self.probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1 optimizer step, got {self.probe_steps}")
        if self.branch_sampling not in ("with", "without"):
            raise ValueError(f"branch_sampling must be 'with' or 'without', got {self.branch_sampling!r}")
        if not 0 < self.width_fraction <= 1:
            raise ValueError(f"width_fraction must be in (0, 1], got {self.width_fraction}")
        if not 0 <= self.grow_fraction <= 1:
            raise ValueError(f"grow_fraction must be in [0, 1], got {self.grow_fraction}")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"interval must be >= 1 optimizer step, got {self.interval}")
        if self.interval_epochs is not None and not self.interval_epochs > 0:
            raise ValueError(f"interval_epochs must be > 0, got {self.interval_epochs}")
        if self.max_kernel is not None and (self.max_kernel < 1 or self.max_kernel % 2 == 0):
            raise ValueError(f"max_kernel must be an odd kernel size or None, got {self.max_kernel}")
        if isinstance(self.stop, bool) or not isinstance(self.stop, (str, int)):
            raise ValueError(f"stop must be a spec string, an int budget, 'auto' or 'budget', got {self.stop!r}")
        if self.budget is not None:
            self.budget.validate()
        if self.stop == "budget" and self.budget is None:
            raise ValueError("stop='budget' needs a DeployBudget in budget=")
        if isinstance(self.stop, int):
            deploy, train = model.param_counts()
            if self.stop <= 0 or deploy > self.stop or train > 1.5 * self.stop:
                raise ValueError(f"parameter budget {self.stop} is below the starting model "
                                 f"(deploy {deploy}, train-time {train})")
        elif self.stop not in ("auto", "budget"):
            parse_spec(self.stop, model)

    def budgets(self) -> DeployBudget | None:
        """The deploy budget every step must keep (an int ``stop`` is a params budget)."""
        if isinstance(self.stop, int):
            if self.budget is None:
                return DeployBudget(params=self.stop)
            return dataclasses.replace(self.budget, params=min(self.stop, self.budget.params or self.stop))
        return self.budget


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
    """Decides and applies growth steps. Decisions are plain dicts (broadcastable under DDP).

    ``total_steps``: optimizer steps of the whole run (sets the end of the growth phase).
    ``steps_per_epoch``: optimizer steps per epoch, turns ``interval_epochs`` into steps. ``example``: one input batch, for MACs and latency budgets.
    """

    def __init__(self, model: nn.Module, config: GrowthConfig, total_steps: int = 1000,
                 example: torch.Tensor | None = None, steps_per_epoch: int = 1):
        config.validate(model)
        self.config = config
        self.is_cnn = isinstance(model, GrowingCNN)
        self.pattern = ("depth", "depth", "width") if self.is_cnn else ("width", "width", "depth")
        epochs = config.interval_epochs or INTERVAL_EPOCHS["cnn" if self.is_cnn else "transformer"]
        self.interval = config.interval or max(1, round(epochs * steps_per_epoch))
        self.last_step = int(config.grow_fraction * total_steps)
        self.probe_steps = config.probe_steps or max(1, self.interval // 10)
        self.location = config.location or DEFAULT_LOCATION["cnn" if self.is_cnn else "transformer"]
        self.budget = config.budgets()
        self.example = example
        if self.budget is not None and (self.budget.macs or self.budget.latency_ms or self.budget.latency_of is not None) \
                and example is None:
            raise ValueError("a MACs or latency budget needs an example input")
        self.rng = random.Random(config.seed)
        self.growths = 0
        self.depth_growths = 0
        self.stopped = False
        self.ema: float | None = None
        self.at_growth: float | None = None  # the stop rule's reading at the previous growth point
        self.strikes = 0
        self.born: dict[int, int] = {}     # id(new layer / branch) -> optimizer step of its growth
        self.step = 0
        self.cost: dict[str, float] | None = None
        if self.budget is not None:
            self.cost = deploy_cost(model, example, self.budget)
            if over_budget(self.cost, self.budget):
                raise ValueError(f"the starting model ({self._describe(self.cost)}) already breaks the budget "
                                 f"{self.budget}")

    @staticmethod
    def _describe(cost: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in cost.items())

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is a growth point."""
        return not self.stopped and step % self.interval == 0 and step <= self.last_step

    def _fresh(self) -> set[int]:
        """Modules grown at the previous growth step: their BN scales are still their initial
        values, so importance ignores them until they have trained for two intervals."""
        return {k for k, born in self.born.items() if self.step - born <= self.interval}

    # -------------------------------------------------------------- decisions
    def _kinds_left(self, model: nn.Module) -> list[str]:
        if not isinstance(self.config.stop, str) or self.config.stop in ("auto", "budget"):
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

    def _stages(self, model: GrowingCNN) -> list[int]:
        stages = list(range(len(model.stages)))
        if isinstance(self.config.stop, str) and self.config.stop not in ("auto", "budget"):
            target = parse_spec(self.config.stop, model)
            stages = [i for i in stages if model.depths[i] < target[i]]
        return stages

    def _balanced_order(self, model: GrowingCNN) -> list[int]:
        """The stages that may still grow, fewest family layers first, the one nearest the input
        first on a tie (``location="balanced"``: the first gets the next layer)."""
        return sorted(self._stages(model), key=lambda i: (model.depths[i], i))

    def _stage_score(self, model: GrowingCNN, stage: int, fresh: set[int]) -> float:
        score = importance(model.stages[stage], fresh)
        return importance(model.stem) if score is None else score

    def _position(self, model: GrowingCNN, stage: int, fresh: set[int]) -> int:
        layers = list(model.stages[stage])
        first = 1 if stage else 0
        if self.location != "greedy":
            return self.rng.randint(first, len(layers))
        scored = [(importance(layers[j], fresh), j) for j in range(len(layers))]
        scored = [(v, j) for v, j in scored if v is not None]
        return max(scored)[1] + 1 if scored else first  # after the most important trained layer

    def _depth(self, model: nn.Module) -> dict[str, Any]:
        loc, fresh = self.location, self._fresh()
        if not self.is_cnn:
            scales = {i: layer.norm_scale() for i, layer in enumerate(model.layers) if id(layer) not in fresh}
            scales = scales or {i: layer.norm_scale() for i, layer in enumerate(model.layers)}
            after = {"greedy": max(scales, key=scales.__getitem__), "random": self.rng.randrange(model.depth),
                     "sequential": self.depth_growths % model.depth}[loc]
            return {"kind": "depth", "after": after}
        stages = self._stages(model)
        if loc == "balanced":
            stage = self._balanced_order(model)[0]
            return {"kind": "depth", "stage": stage, "position": len(model.stages[stage])}
        score = {i: self._stage_score(model, i, fresh) for i in stages}
        stage = {"greedy": max(stages, key=score.__getitem__), "random": self.rng.choice(stages),
                 "sequential": stages[self.depth_growths % len(stages)]}[loc]
        return {"kind": "depth", "stage": stage, "position": self._position(model, stage, fresh)}

    def _width(self, model: nn.Module, fraction: float | None = None, specs: list[str] | None = None) -> dict[str, Any]:
        if not self.is_cnn:
            return {"kind": "width"}
        convs = model.rep_convs()
        names = list(convs)
        n = max(1, math.ceil((fraction or self.config.width_fraction) * len(names)))
        if self.location in ("balanced", "greedy", "probe"):
            fresh = self._fresh()
            chosen = sorted(names, key=lambda k: importance(convs[k], fresh) or 0.0, reverse=True)[:n]
        elif self.location == "random":
            chosen = self.rng.sample(names, n)
        else:
            start = (self.growths * n) % len(names)
            chosen = [names[(start + j) % len(names)] for j in range(n)]
        branches = {}
        for name in chosen:
            space = branch_space(convs[name], self.config.max_kernel)
            if specs is not None:
                space = [s for s in space if s in specs] or space[:1]
            if self.config.branch_sampling == "without":
                space = [s for s in space if s not in convs[name].branches] or space
            branches[name] = self.rng.choice(space)
        return {"kind": "width", "branches": branches}

    def _depth_options(self, model: nn.Module) -> list[dict[str, Any]]:
        """Every depth step a probe compares: a layer at the end of each stage that may still grow
        (Transformer: after each layer)."""
        if not self.is_cnn:
            return [{"kind": "depth", "after": i} for i in range(model.depth)]
        return [{"kind": "depth", "stage": i, "position": len(model.stages[i])} for i in self._stages(model)]

    def _candidates(self, model: nn.Module, kind: str, kinds: list[str]) -> list[dict[str, Any]]:
        """The step(s) the schedule asks for (under ``location="probe"`` every depth option, for the
        probe to choose from), then (under a budget) cheaper ones to try if none fits."""
        probing = self.location == "probe"
        if kind == "depth":
            out = self._depth_options(model) if probing else [self._depth(model)]
        else:
            out = [self._width(model)]
        if self.budget is None:
            return out
        if self.is_cnn and kind == "depth" and not probing:  # the same layer in the next stages in turn
            fresh = self._fresh()
            if self.location == "balanced":
                order = self._balanced_order(model)
            else:  # the next most important
                order = sorted(self._stages(model), key=lambda i: -self._stage_score(model, i, fresh))
            for stage in order:
                if stage != out[0]["stage"]:
                    position = len(model.stages[stage]) if self.location == "balanced" else \
                        self._position(model, stage, fresh)
                    out.append({"kind": "depth", "stage": stage, "position": position})
        if self.is_cnn:  # width: fewer convs, cheapest branches (fused, they add no deploy cost)
            out.append(self._width(model, fraction=self.config.width_fraction / 2, specs=["bn", "conv1x1"]))
        elif "width" in kinds and kind == "depth":
            out.append(self._width(model))
        elif "depth" in kinds and kind == "width":
            out.extend(self._depth_options(model) if probing else [self._depth(model)])
        return [c for c in out if c["kind"] in kinds]

    def _fits(self, model: nn.Module, decision: dict[str, Any]) -> dict[str, float] | None:
        trial = copy.deepcopy(model)
        apply_growth(trial, decision, self.config)
        cost = deploy_cost(trial, self.example, self.budget)
        return None if over_budget(cost, self.budget) else cost

    def _choose(self, model: nn.Module, options: list[dict[str, Any]], probe: Probe | None) -> dict[str, Any] | None:
        """The first option (in order) that keeps the budget; under ``location="probe"`` the depth
        options that keep it are compared by ``probe`` (validation loss after a short training) and
        the lowest wins. Records the winner's deploy cost."""
        i = 0
        while i < len(options):
            group = options[i:i + 1]
            if self.location == "probe" and options[i]["kind"] == "depth":
                group = [c for c in options[i:] if c["kind"] == "depth"]
            i += len(group)
            costs = [None] * len(group) if self.budget is None else [self._fits(model, c) for c in group]
            fitting = [(c, k) for c, k in zip(group, costs) if self.budget is None or k is not None]
            if not fitting:
                continue
            if len(fitting) > 1:
                if probe is None:
                    raise ValueError("location='probe' compares depth options by a short training probe: pass "
                                     "decide(..., probe=...) (grow() does), or choose another location")
                losses = probe([c for c, _ in fitting])
                best = min(range(len(fitting)), key=losses.__getitem__)
                decision, cost = fitting[best]
                decision = dict(decision, probe_val_loss=[round(v, 5) for v in losses])
            else:
                decision, cost = fitting[0]
            if cost is not None:
                self.cost = cost
            return decision
        return None

    def decide(self, model: nn.Module, val_acc: float | None, step: int | None = None,
               probe: Probe | None = None, fit_acc: float | None = None,
               val_fit_acc: float | None = None) -> dict[str, Any] | None:
        """The next growth step at optimizer step ``step``, or None once growth has stopped (then
        it stays stopped). ``probe``: validation losses of the given depth options after a short
        training of each (``location="probe"``; ``grow()`` passes one). ``fit_acc``: training
        accuracy over the last epoch's batches (``auto_rule="gap"``, ``"underfit"`` and ``"fit_gain"``);
        ``val_fit_acc``: validation accuracy with BatchNorm on batch statistics, as ``fit_acc`` is
        measured (``auto_rule="gap"``); ``grow()`` passes both."""
        if self.stopped:
            return None
        self.step = self.step if step is None else step
        if self.config.stop == "auto" and self._auto_stop(val_acc, fit_acc, val_fit_acc):
            self.stopped = True
            return None
        kinds = self._kinds_left(model)
        if not kinds:
            self.stopped = True
            return None
        kind = self.pattern[self.growths % len(self.pattern)]
        kind = kind if kind in kinds else kinds[0]
        decision = self._choose(model, self._candidates(model, kind, kinds), probe)
        if decision is None:
            self.stopped = True
            return None
        self.growths += 1
        self.depth_growths += decision["kind"] == "depth"
        return decision

    def _auto_stop(self, val_acc: float | None, fit_acc: float | None, val_fit_acc: float | None) -> bool:
        """Whether ``stop="auto"`` stops growth here (see ``GrowthConfig.auto_rule``)."""
        rule = self.config.auto_rule
        if rule in ("gap", "underfit", "fit_gain") and (fit_acc is None or (rule == "gap" and val_fit_acc is None)):
            raise ValueError(f"auto_rule={rule!r} needs the training accuracy (and for 'gap' the batch-statistics "
                             "validation accuracy): pass decide(..., fit_acc=..., val_fit_acc=...) (grow() does)")
        if rule == "gap":  # the generalisation gap has caught up with the training error: no longer underfitting
            return fit_acc - val_fit_acc >= self.config.gap_ratio * (1 - fit_acc)
        if rule == "underfit":
            return fit_acc >= self.config.fit_target
        if rule == "fit_gain":  # the last growth interval raised the training fit too little, auto_tolerance + 1 times
            return self._strike(fit_acc)
        if val_acc is None:
            return False
        self.ema = val_acc if self.ema is None else self.config.ema * val_acc + (1 - self.config.ema) * self.ema
        return self._strike(self.ema)

    def _strike(self, reading: float) -> bool:
        """Count a strike when ``reading`` rose less than ``auto_threshold`` since the previous growth
        point; True once the strikes exceed ``auto_tolerance``."""
        small = self.at_growth is not None and reading - self.at_growth < self.config.auto_threshold
        self.at_growth = reading
        self.strikes += small
        return self.strikes > self.config.auto_tolerance

    def apply(self, model: nn.Module, decision: dict[str, Any], step: int) -> Carry:
        """Apply ``decision`` at optimizer step ``step``; remembers what it grew (see ``_fresh``)."""
        carry, new = apply_growth(model, decision, self.config)
        self.born.update({id(m): step for m in new})
        return carry


def apply_growth(model: nn.Module, decision: dict[str, Any], config: GrowthConfig) -> tuple[Carry, list[nn.Module]]:
    """Apply a decision in place; returns (optimizer carry records for regrown parameters, the
    new layers / branches)."""
    if decision["kind"] == "depth":
        if isinstance(model, GrowingCNN):
            return {}, [model.insert_layer(decision["stage"], decision["position"], config.preserve)]
        return {}, [model.insert_layer(decision["after"], config.preserve)]
    if isinstance(model, GrowingTransformer):
        widen = model.layers[0].head_dim if config.widen_dim else 0
        return model.add_head(config.preserve, widen=widen), []
    convs = model.rep_convs()
    new = [convs[name].add_branch(spec, zero_init=config.preserve, grow_kernel=config.max_kernel is not None)
           for name, spec in decision["branches"].items()]
    return {}, new


@dataclass
class GrowResult:
    """``model``: the result (with ``retrain``: the found architecture trained from scratch);
    ``grown``: the model as grown (with ``retrain`` only); ``history``: one record per epoch and
    one per growth step (``growth``, ``step``, ``epoch``, ``val_acc``, ``spec``, and ``train_flops``:
    the run's training FLOPs so far, :mod:`.flops`; counted on this rank's batches)."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    grown: nn.Module | None = None


def _cosine(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def grow(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
         epochs: int, config: GrowthConfig | None = None, lr: float | None = None, optimizer: str | None = None,
         batch_size: int = 64, weight_decay: float = 5e-4, progress: bool = True, val_every: int = 1) -> GrowResult:
    """Grow ``model`` (GrowingCNN or GrowingTransformer) while training for ``epochs`` epochs.

    ``val`` must not be the test set: growth decisions and automatic stopping read it (carve it
    from the training data, :func:`adagrow.data.train_val_split`). Defaults follow the thesis:
    SGD (momentum 0.9) at lr 0.1 for CNNs, AdamW at 1e-3 for Transformers, cosine LR per step over
    all steps, a growth every 3 (CNN) / 5 (Transformer) epochs until the stop rule fires or
    ``grow_fraction`` of the steps have passed, then fine-tuning. Under torchrun (process group initialised) each rank trains on its shard and every
    growth decision comes from rank 0. ``val_every``: the per-epoch history record carries the
    validation accuracy every ``val_every`` epochs and at the last epoch (None in between; a
    validation pass costs about 4-5% of a CNN epoch on CPU); growth decisions read their own.
    """
    if not isinstance(model, (GrowingCNN, GrowingTransformer)):
        raise TypeError(f"grow() needs a GrowingCNN or GrowingTransformer, got {type(model).__name__}")
    if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 1:
        raise ValueError(f"val_every must be a positive number of epochs, got {val_every!r}")
    config = config or GrowthConfig()
    rank, world = _distributed()
    x = train[0]
    total = epochs * math.ceil(len(range(rank, len(x), world)) / batch_size)
    grower = Grower(model, config, total, example=x[:1], steps_per_epoch=total // epochs)
    history = _train(model, train, val, epochs, grower, lr, optimizer, batch_size, weight_decay, progress, val_every)
    model.adagrow_input_shape = list(x.shape[1:])  # recorded by save_grown; the CLI checks data against it
    if not config.retrain:
        return GrowResult(model.eval(), history)
    fresh = build_from_arch(model.arch()).to(x.device)
    if world > 1:
        for t in [*fresh.parameters(), *fresh.buffers()]:
            dist.broadcast(t.data, src=0)
    retrain = _train(fresh, train, val, epochs, None, lr, optimizer, batch_size, weight_decay, progress, val_every)
    fresh.adagrow_input_shape = list(x.shape[1:])
    return GrowResult(fresh.eval(), history + [dict(h, retrain=True) for h in retrain], grown=model.eval())


def _train(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
           epochs: int, grower: Grower | None, lr: float | None, optimizer: str | None, batch_size: int,
           weight_decay: float, progress: bool, val_every: int = 1) -> list[dict[str, Any]]:
    """The training loop; grows at the grower's growth points (``grower=None``: plain training)."""
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
    counter = FlopCounter(model, x[:1])
    seed = grower.config.seed if grower else 0
    gen = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(len(range(rank, len(x), world)) / batch_size)
    history: list[dict[str, Any]] = []
    step = start = 0  # start: where the cosine schedule (re)started
    # (right, seen) per step over the last epoch; "right" stays a tensor (no host sync per step)
    recent: deque[tuple[torch.Tensor, int]] = deque(maxlen=total // epochs)

    def sgd_step(net: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns how many of the batch's images it classified right (a 0-d
        tensor on the model's device)."""
        logits = net(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return (logits.argmax(1) == y[idx]).sum()

    def batches_here(count: int, salt: int = 0) -> tuple[torch.Tensor, ...]:
        """``count`` training batches (index tensors) drawn for the current step (same on a rerun)."""
        picks = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 100003 + step + salt))
        return picks[rank::world][:count * batch_size].split(batch_size)

    def stop_rule_val_acc() -> float:
        """The validation accuracy the stop rule reads: eval mode, on a precise-BN copy when
        ``bn_batches`` asks for one (its forward passes are charged)."""
        if not (grower.config.bn_batches and grower.config.stop == "auto" and grower.config.auto_rule == "gain"):
            return accuracy(model, *val)
        batches = batches_here(grower.config.bn_batches, salt=1)
        settled = copy.deepcopy(model)
        torch.optim.swa_utils.update_bn([x[idx] for idx in batches], settled)
        counter.step(sum(len(idx) for idx in batches), forward_only=True)
        return accuracy(settled, *val)

    def probe(options: list[dict[str, Any]]) -> list[float]:
        """Validation loss of each depth option after ``probe_steps`` steps on a copy (same batches,
        current LR and optimizer state); their FLOPs are charged to the run."""
        batches = batches_here(grower.probe_steps)
        losses = []
        for option in options:
            trial, trial_opt = copy.deepcopy((model, opt))
            carry, _ = apply_growth(trial, option, grower.config)
            trial_opt = rebuild_optimizer(trial_opt, trial, carry)
            cost = FlopCounter(trial, x[:1])
            trial.train()
            for idx in batches:
                sgd_step(trial, trial_opt, idx)
                cost.step(len(idx))
            losses.append(batch_stat_loss(trial, *val))
            cost.step(len(val[0]), forward_only=True)
            counter.total += cost.total
        return losses

    for epoch in tqdm(range(epochs), desc="grow" if grower else "train", disable=not progress or rank != 0):
        model.train()
        order = torch.randperm(len(x), generator=gen)[rank::world]
        for idx in order.split(batch_size):
            for g in opt.param_groups:
                g["lr"] = _cosine(lr, step - start, total - start)
            recent.append((sgd_step(net, opt, idx), len(idx)))
            counter.step(len(idx))
            step += 1
            if grower is None or not grower.due(step):
                continue
            val_acc = stop_rule_val_acc() if rank == 0 else None
            fit_acc = int(torch.stack([r for r, _ in recent]).sum()) / sum(n for _, n in recent)
            reads_gap = grower.config.stop == "auto" and grower.config.auto_rule == "gap"  # the only reader
            val_fit_acc = (batch_stat_accuracy(copy.deepcopy(model), *val, batch_size)
                           if rank == 0 and reads_gap else None)
            model.train()
            payload = [grower.decide(model, val_acc, step, probe, fit_acc, val_fit_acc) if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(payload, src=0)
                grower.stopped = payload[0] is None
            decision = payload[0]
            if decision is None:
                continue
            carry = grower.apply(model, decision, step)
            if world > 1:  # every rank continues from rank 0's new parameters
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=0)
            opt, net = rebuild_optimizer(opt, model, carry), wrap()
            if grower.config.lr_after_growth == "restart":
                start = step
            counter.reset()
            deploy, params_train = model.param_counts()
            history.append({"epoch": epoch + 1, "step": step, "val_acc": val_acc, "fit_acc": fit_acc,
                            "val_fit_acc": val_fit_acc, "growth": decision,
                            "spec": model.spec(), "params_deploy": deploy, "params_train": params_train,
                            "train_flops": counter.total})
        deploy, params_train = model.param_counts()
        validate = rank == 0 and ((epoch + 1) % val_every == 0 or epoch + 1 == epochs)
        history.append({"epoch": epoch + 1, "step": step, "val_acc": accuracy(model, *val) if validate else None,
                        "spec": model.spec(), "params_deploy": deploy, "params_train": params_train,
                        "train_flops": counter.total})
    if world > 1:  # DDP keeps parameters equal; BN running statistics last moved per rank
        for t in model.buffers():
            dist.broadcast(t.data, src=0)
    return history
