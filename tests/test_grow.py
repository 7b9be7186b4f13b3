"""Growth: schedule, greedy locations, stopping, optimizer state, function preservation,
checkpoints, and two-process DDP (gloo) agreement."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from adagrow.grow import (DeployBudget, GrowingCNN, GrowingTransformer, Grower, GrowthConfig, apply_growth,
                          build_from_arch, deploy_cost, grow, load_grown, reparameterize, save_grown)
from adagrow.grow import cnn as cnn_module
from adagrow.grow.budget import over_budget, paired_latency_ms, within_latency_of
from adagrow.grow.cnn import branch_space
from adagrow.grow.cnn import flops as cnn_flops
from adagrow.grow.flops import forward_macs, train_flops
from adagrow.grow.optim import rebuild_optimizer


# placement tests call decide() with no readings: the gain rule never stops on a missing validation
# accuracy (the default, fit_gain, needs the training accuracy that grow() passes)
NO_READINGS = {"stop": "auto", "auto_rule": "gain"}

def _data(n: int = 96, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :4].mean((1, 2, 3)) > 0).long()
    return (x[: n * 3 // 4], y[: n * 3 // 4]), (x[n * 3 // 4:], y[n * 3 // 4:])


def _cnn(family: str = "vgg") -> GrowingCNN:
    torch.manual_seed(0)
    return GrowingCNN(family, widths=(8, 8, 16), num_classes=4)


def _vit() -> GrowingTransformer:
    torch.manual_seed(0)
    return GrowingTransformer("vit", dim=16, head_dim=4, heads=2, depth=1, mlp_per_head=8, num_classes=4,
                              img_size=8, patch=4)


@pytest.mark.parametrize("make,pattern", [(_cnn, ["depth", "depth", "width"]), (_vit, ["width", "width", "depth"])])
def test_growth_follows_schedule_in_steps(make, pattern) -> None:
    train, val = _data()  # 72 training samples, batch 64: 2 optimizer steps per epoch
    res = grow(make(), train, val, epochs=7, config=GrowthConfig(stop=10**9, interval=3), lr=0.01, progress=False)
    events = [(h["step"], h["epoch"], h["growth"]["kind"]) for h in res.history if "growth" in h]
    # growth points every 3 steps, none in the last 25% of the 14 steps (after step 10.5)
    assert events == [(3, 2, pattern[0]), (6, 3, pattern[1]), (9, 5, pattern[2])]
    epochs = [h for h in res.history if "growth" not in h]
    assert [h["epoch"] for h in epochs] == list(range(1, 8)) and epochs[-1]["step"] == 14
    assert epochs[-1]["params_train"] > _cnn().param_counts()[1] if make is _cnn else True


def _set_gamma(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(value)


def test_greedy_location_is_largest_gamma_stage_ignoring_fresh_layers() -> None:
    model = _cnn()
    model.insert_layer(1, 1)
    model.insert_layer(1, 2)
    _set_gamma(model, 0.5)
    _set_gamma(model.stages[1][1], 3.0)  # the first family layer of stage 1 matters most
    decision = Grower(model, GrowthConfig(**NO_READINGS, location="greedy")).decide(model, None)
    assert decision == {"kind": "depth", "stage": 1, "position": 2}  # right after that layer
    # a just-inserted layer's gamma is its init, not a measure of importance: it is ignored ...
    grower = Grower(model, GrowthConfig(**NO_READINGS, interval=10, location="greedy"))
    fresh = model.insert_layer(2, 1, preserve=True)
    _set_gamma(fresh, 5.0)
    grower.born[id(fresh)] = 100
    assert grower.decide(model, None, step=110) == {"kind": "depth", "stage": 1, "position": 2}
    # ... until it has trained for two intervals
    assert grower.decide(model, None, step=120) == {"kind": "depth", "stage": 2, "position": 2}


class _Dead(nn.Module):
    """Kills the signal: whatever comes after it sees zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def test_probe_location_picks_the_stage_whose_layer_lowers_validation_loss(monkeypatch) -> None:
    real = cnn_module.make_layer  # a new layer in stage 0 or 2 zeroes the features; only stage 1's helps
    monkeypatch.setattr(cnn_module, "make_layer", lambda family, c: real(family, c) if c == 8
                        else nn.Sequential(real(family, c), _Dead()))
    train, val = _data(n=256)
    torch.manual_seed(0)
    model = GrowingCNN("vgg", widths=(4, 8, 16), num_classes=4)
    res = grow(model, train, val, epochs=6, lr=0.05, progress=False,
               config=GrowthConfig(stop="VGG-1-1-1", interval=9, probe_steps=2, location="probe"))  # 3 steps/epoch, one growth
    (event,) = [h["growth"] for h in res.history if "growth" in h]
    assert (event["kind"], event["stage"], event["position"]) == ("depth", 1, 1)
    dead0, alive, dead2 = event["probe_val_loss"]  # one validation loss per stage, in stage order
    assert alive < min(dead0, dead2) - 0.05  # a dead net only has the head's bias (the class priors)
    assert res.model.spec() == "VGG-0-1-0"


def test_probe_compares_only_options_within_budget_and_charges_its_flops() -> None:
    model = _cnn()
    example = torch.randn(1, 1, 8, 8)
    seen: list[list[dict]] = []

    def probe(options: list[dict]) -> list[float]:
        seen.append(options)
        return [float(o["stage"] == 0) for o in options]  # stage 0 is worst

    stage2 = deploy_cost(_grown(model, 2), example)["macs"]
    grower = Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=stage2), location="probe"),
                    example=example)
    decision = grower.decide(model, None, probe=probe)
    assert [o["stage"] for o in seen[0]] == [1, 2]  # stage 0's layer costs more MACs than the budget allows
    assert (decision["stage"], decision["position"], decision["probe_val_loss"]) == (1, 1, [0.0, 0.0])
    with pytest.raises(ValueError, match="probe"):
        Grower(model, GrowthConfig(**NO_READINGS, location="probe")).decide(model, None)
    # the probes' training steps and validation passes count in the run's FLOPs
    train, val = _data()  # 72 samples: batches of 64 and 8; one growth at step 3, one probe step each
    res = grow(_cnn(), train, val, epochs=2, config=GrowthConfig(stop="VGG-1-1-1", interval=3, probe_steps=1, location="probe"),
               lr=0.01, progress=False)
    (record,) = [h for h in res.history if "growth" in h]
    per_sample = [train_flops(_grown(_cnn(), stage), example, 1) for stage in range(3)]
    expected = train_flops(_cnn(), example, 64 + 8 + 64) + sum(64 * p + len(val[0]) * p // 3 for p in per_sample)
    assert record["train_flops"] == expected


def test_random_and_sequential_locations() -> None:
    model = _cnn()
    model.insert_layer(1, 1)
    grower = Grower(model, GrowthConfig(**NO_READINGS, location="random", seed=3))
    picks = [grower._depth(model) for _ in range(60)]
    assert {d["stage"] for d in picks} == {0, 1, 2}  # not stuck on one stage
    for d in picks:  # a valid place: after the downsampling layer of a later stage
        assert (1 if d["stage"] else 0) <= d["position"] <= len(model.stages[d["stage"]])
    again = Grower(model, GrowthConfig(**NO_READINGS, location="random", seed=3))
    assert [again._depth(model) for _ in range(60)] == picks  # seeded
    seq = Grower(model, GrowthConfig(**NO_READINGS, location="sequential"))
    decisions = [seq.decide(model, None) for _ in range(7)]  # depth, depth, width, depth, depth, width, depth
    assert [d.get("stage") for d in decisions] == [0, 1, None, 2, 0, None, 1]  # a width growth skips no stage


def test_balanced_location_grows_the_least_deep_stage_nearest_the_input_first() -> None:
    model = GrowingCNN("vgg", widths=(8, 8, 16), num_classes=4, depths=(1, 0, 1))
    grower = Grower(model, GrowthConfig(**NO_READINGS))  # the CNN default
    assert grower.location == "balanced"
    grown = []
    for _ in range(6):
        decision = grower.decide(model, None)
        if decision["kind"] == "depth":
            apply_growth(model, decision, grower.config)
            grown.append((decision["stage"], decision["position"]))
    assert grown == [(1, 1), (0, 1), (1, 2), (2, 2)]  # always appended to the stage
    assert model.spec() == "VGG-2-2-2"
    # a spec stop leaves out the stages that reached their target
    model = GrowingCNN("vgg", widths=(8, 8, 16), num_classes=4, depths=(1, 0, 1))
    grower = Grower(model, GrowthConfig(stop="VGG-1-2-1"))
    assert [grower.decide(model, None)["stage"] for _ in range(2)] == [1, 1]
    # under a budget the next stage in turn is tried when the first breaks it
    model, example = _cnn(), torch.randn(1, 1, 8, 8)
    stage1 = deploy_cost(_grown(model, 1), example)["macs"]
    assert deploy_cost(_grown(model, 0), example)["macs"] > stage1  # stage 0 runs at the full resolution
    grower = Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=stage1)), example=example)
    assert grower.decide(model, None) == {"kind": "depth", "stage": 1, "position": 1}
    with pytest.raises(ValueError, match="balanced"):
        Grower(_vit(), GrowthConfig(location="balanced"))
    assert Grower(_vit(), GrowthConfig()).location == "probe"


def test_width_growth_keeps_deploy_kernel_by_default() -> None:
    model = _cnn()
    model.insert_layer(0, 0)
    convs = model.rep_convs()
    before = model.param_counts()[0]
    decision = Grower(model, GrowthConfig(stop="auto", seed=1))._width(model)
    assert len(decision["branches"]) == -(-7 * len(convs) // 10)  # ceil(70%)
    assert all(spec in ("conv1x1", "conv3x3", "conv1x3", "conv3x1", "avg3x3", "bn")
               for spec in decision["branches"].values())
    apply_growth(model, decision, GrowthConfig())
    assert all(c.kernel_size == (3, 3) for c in model.rep_convs().values())
    assert model.param_counts()[0] == before  # new branches fuse into the existing kernels
    apply_growth(model, {"kind": "width", "branches": {n: "conv5x5" for n in convs}}, GrowthConfig(max_kernel=5))
    assert all(c.kernel_size == (5, 5) and c.branches[-1] == "conv5x5" for c in model.rep_convs().values())
    with pytest.raises(ValueError, match="does not fit"):
        apply_growth(_cnn(), {"kind": "width", "branches": {"stem.0": "conv5x5"}}, GrowthConfig())


def test_spec_and_budget_are_respected_exactly() -> None:
    train, val = _data()
    res = grow(_cnn(), train, val, epochs=12, config=GrowthConfig(stop="VGG-1-1-0", interval=1), lr=0.01,
               progress=False)
    assert res.model.spec() == "VGG-1-1-0"
    res = grow(_vit(), train, val, epochs=12, config=GrowthConfig(stop="ViT-D2-H3", interval=1), progress=False)
    assert res.model.spec() == "ViT-D2-H3"
    budget = _cnn().param_counts()[0] + 3000
    res = grow(_cnn(), train, val, epochs=6, config=GrowthConfig(stop=budget, interval=1), lr=0.01, progress=False)
    deploy, train_p = res.model.param_counts()
    assert deploy <= budget and train_p <= 1.5 * budget
    assert any(h["growth"]["kind"] == "depth" for h in res.history if "growth" in h)
    for stage in range(3):  # every further layer would have broken the budget
        trial = _copy(res.model)
        trial.insert_layer(stage, len(trial.stages[stage]))
        d2, t2 = trial.param_counts()
        assert d2 > budget or t2 > 1.5 * budget


def _copy(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


def test_budget_overflow_tries_a_cheaper_step_first() -> None:
    model = _cnn()
    example = torch.randn(1, 1, 8, 8)
    _set_gamma(model, 0.1)
    _set_gamma(model.stem, 2.0)  # greedy wants a layer in stage 0 (full resolution, the most MACs) ...
    _set_gamma(model.stages[2], 1.0)  # ... then in stage 2
    macs = deploy_cost(model, example)["macs"]
    stage0 = deploy_cost(_grown(model, 0), example)["macs"] - macs
    stage2 = deploy_cost(_grown(model, 2), example)["macs"] - macs
    assert stage2 < stage0
    unlimited = Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=10**12), location="greedy"),
                        example=example)
    assert unlimited.decide(model, None)["stage"] == 0
    grower = Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=macs + stage2), location="greedy"),
                    example=example)
    assert grower.decide(model, None) == {"kind": "depth", "stage": 2, "position": 1}
    assert grower.cost["macs"] == macs + stage2
    tight = Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=macs + stage2 - 1), location="greedy"),
                   example=example)
    width = tight.decide(model, None)  # no layer fits: a width step (fused, no deploy MACs) does
    assert width["kind"] == "width" and set(width["branches"].values()) <= {"bn", "conv1x1"}
    with pytest.raises(ValueError, match="already breaks the budget"):
        Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=macs - 1)), example=example)
    with pytest.raises(ValueError, match="needs an example"):
        Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(macs=10**9)))


def _grown(model: GrowingCNN, stage: int) -> GrowingCNN:
    trial = _copy(model)
    trial.insert_layer(stage, len(trial.stages[stage]))
    return trial


def test_latency_budget_measures_the_deploy_model() -> None:
    model = _cnn()
    example = torch.randn(1, 1, 8, 8)
    for backend in ("torch", "ort-cpu"):
        cost = deploy_cost(model, example, DeployBudget(latency_ms=100.0, backend=backend, runs=5))
        assert 0 < cost["latency_ms"] < 100.0, backend
    with pytest.raises(ValueError, match="already breaks the budget"):
        Grower(model, GrowthConfig(stop="budget", budget=DeployBudget(latency_ms=1e-6, runs=5)), example=example)
    with pytest.raises(ValueError, match="backend"):
        GrowthConfig(budget=DeployBudget(latency_ms=1.0, backend="tpu")).validate(model)


class _DriftingClock:
    """A fake clock on a machine that gets 1% slower with every call (a load building up)."""

    def __init__(self) -> None:
        self.now, self.load = 0.0, 1.0

    def __call__(self) -> float:
        return self.now


class _Costs(nn.Module):
    """A 'model' whose call advances the fake clock by its cost times the current load."""

    def __init__(self, clock: _DriftingClock, cost_s: float) -> None:
        super().__init__()
        self.clock, self.cost_s = clock, cost_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.cost_s * self.clock.load
        self.clock.load *= 1.01
        return x


def test_latency_budget_is_decided_on_latencies_timed_together() -> None:
    clock, x = _DriftingClock(), torch.zeros(1, 1)
    models = {"reference": _Costs(clock, 1e-3), "same": _Costs(clock, 1e-3), "slower": _Costs(clock, 1.2e-3)}
    # timed one after the other (30 calls each), the load drift alone puts the same cost 1.35x over the reference
    apart = {n: paired_latency_ms({n: m}, x, runs=20, clock=clock)[n] for n, m in models.items()}
    assert apart["same"] / apart["reference"] == pytest.approx(1.01 ** 30, rel=0.01)
    assert "same" not in within_latency_of(apart, "reference", 0.03)
    # timed together (one call of each in turn) the drift cancels: equal cost within 3%, +20% over it
    together = paired_latency_ms(models, x, runs=20, clock=clock)
    within = within_latency_of(together, "reference", 0.03)
    assert set(within) == {"reference", "same"}
    assert within["same"] == pytest.approx(1.0, abs=0.03)
    assert together["slower"] / together["reference"] == pytest.approx(1.2, abs=0.03)
    with pytest.raises(ValueError, match="reference 'budget' is not among"):
        within_latency_of(together, "budget", 0.03)
    with pytest.raises(ValueError, match="at least one model"):
        paired_latency_ms({}, x)


def test_latency_budget_of_a_reference_model_times_both_together() -> None:
    example = torch.randn(1, 1, 8, 8)
    small, large = (GrowingCNN("vgg", widths=(8, 8, 16), num_classes=4, depths=d) for d in ((0, 0, 0), (2, 2, 2)))
    budget = DeployBudget(latency_of=reparameterize(small.eval()), latency_tolerance=0.05, backend="ort-cpu", runs=30)
    cost = deploy_cost(large, example, budget)
    assert cost["latency_ratio"] > 1.5  # 6 more 3x3 conv layers than the reference
    assert "latency_ratio" in over_budget(cost, budget)
    assert "latency_ratio" not in over_budget(dict(cost, latency_ratio=1.04), budget)
    with pytest.raises(ValueError, match="already breaks the budget"):
        Grower(large, GrowthConfig(stop="budget", budget=budget), example=example)
    with pytest.raises(ValueError, match="either as latency_ms or as latency_of"):
        DeployBudget(latency_ms=1.0, latency_of=small).validate()
    with pytest.raises(ValueError, match="latency_tolerance"):
        DeployBudget(latency_of=small, latency_tolerance=-0.1).validate()


def test_paired_latency_times_real_deploy_models() -> None:
    small, large = (reparameterize(GrowingCNN("vgg", widths=(8, 8, 16), depths=d).eval()) for d in ((0, 0, 0), (2, 2, 2)))
    ms = paired_latency_ms({"small": small, "large": large}, torch.randn(1, 1, 8, 8), "ort-cpu", runs=20)
    assert 0 < ms["small"] < ms["large"]


def test_auto_stop_after_tolerated_small_gains() -> None:
    model = _cnn()
    grower = Grower(model, GrowthConfig(stop="auto", auto_rule="gain", auto_threshold=0.03, auto_tolerance=1, ema=1.0,
                                        location="greedy"))
    assert grower.decide(model, 0.50) is not None
    assert grower.decide(model, 0.60) is not None   # +10%: fine
    assert grower.decide(model, 0.61) is not None   # +1%: first strike, tolerated
    assert grower.decide(model, 0.615) is None      # second strike: stop
    assert grower.decide(model, 0.90) is None       # and stays stopped


def test_precise_bn_reads_a_settled_copy_and_charges_its_passes() -> None:
    train, val = _data()  # 72 training samples: one bn batch of 64 per growth point
    cfg = {"stop": "auto", "auto_rule": "gain", "auto_threshold": -1.0, "interval": 2}  # never stops
    plain = grow(_cnn(), train, val, epochs=5, config=GrowthConfig(**cfg), lr=0.01, progress=False)
    precise = grow(_cnn(), train, val, epochs=5, config=GrowthConfig(**cfg, bn_batches=1), lr=0.01, progress=False)
    # the statistics are re-estimated on a copy: the trained model (weights and running statistics) is the same
    assert precise.model.spec() == plain.model.spec()
    for (name, a), b in zip(plain.model.state_dict().items(), precise.model.state_dict().values()):
        assert torch.equal(a, b), name
    # each growth point's 64-image forward pass is charged: 2 x forward MACs x 64 of the model at that point
    points = [h for h in precise.history if "growth" in h]
    extra = precise.history[-1]["train_flops"] - plain.history[-1]["train_flops"]
    assert len(points) >= 2
    assert 0 < extra <= len(points) * 2 * 64 * forward_macs(precise.model.train(), train[0][:1])
    assert extra >= len(points) * 2 * 64 * forward_macs(_cnn(), train[0][:1])
    with pytest.raises(ValueError, match="bn_batches"):
        GrowthConfig(bn_batches=-1).validate(_cnn())


def test_underfit_stop_grows_while_training_accuracy_is_below_target() -> None:
    model = _cnn()
    grower = Grower(model, GrowthConfig(stop="auto", auto_rule="underfit", fit_target=0.8))
    assert grower.decide(model, 0.10, fit_acc=0.30) is not None
    assert grower.decide(model, 0.05, fit_acc=0.79) is not None   # val falling does not matter, only the fit
    assert grower.decide(model, 0.60, fit_acc=0.80) is None       # fits its training images: stop
    assert grower.decide(model, 0.60, fit_acc=0.10) is None       # and stays stopped
    with pytest.raises(ValueError, match="fit_acc"):
        Grower(model, GrowthConfig(stop="auto", auto_rule="underfit")).decide(model, 0.5)
    for bad in ({"auto_rule": "slope"}, {"fit_target": 0.0}, {"fit_target": 1.5}):
        with pytest.raises(ValueError, match="auto_rule|fit_target"):
            GrowthConfig(**bad).validate(model)


def test_gap_stop_grows_while_training_error_exceeds_the_generalisation_gap() -> None:
    model = _cnn()
    grower = Grower(model, GrowthConfig(stop="auto", auto_rule="gap"))
    assert grower.config.gap_ratio == 1.0
    assert grower.decide(model, 0.1, fit_acc=0.30, val_fit_acc=0.25) is not None  # error 0.70 > gap 0.05
    assert grower.decide(model, 0.9, fit_acc=0.20, val_fit_acc=0.90) is not None  # val above train: underfitting
    assert grower.decide(model, 0.1, fit_acc=0.60, val_fit_acc=0.21) is not None  # rising: error 0.40 > gap 0.39
    assert grower.decide(model, 0.1, fit_acc=0.60, val_fit_acc=0.19) is None      # gap 0.41 > error 0.40: stop
    assert grower.decide(model, 0.1, fit_acc=0.10, val_fit_acc=0.10) is None      # and stays stopped
    # scale-free: an easy and a hard task stop at the same proportion of gap to error, whatever the accuracy
    for fit, val, stops in ((0.90, 0.81, False), (0.90, 0.79, True), (0.55, 0.11, False), (0.55, 0.09, True)):
        g = Grower(model, GrowthConfig(stop="auto", auto_rule="gap"))
        assert (g.decide(model, None, fit_acc=fit, val_fit_acc=val) is None) == stops
    # gap_ratio: how large the gap may grow against the training error before growth stops
    lenient = Grower(model, GrowthConfig(stop="auto", auto_rule="gap", gap_ratio=2.0))
    assert lenient.decide(model, 0.1, fit_acc=0.70, val_fit_acc=0.20) is not None  # gap 0.50 < 2 x 0.30
    assert lenient.decide(model, 0.1, fit_acc=0.70, val_fit_acc=0.09) is None      # gap 0.61 > 2 x 0.30
    with pytest.raises(ValueError, match="val_fit_acc"):
        Grower(model, GrowthConfig(stop="auto", auto_rule="gap")).decide(model, 0.5, fit_acc=0.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="gap_ratio"):
            GrowthConfig(gap_ratio=bad).validate(model)


def test_gap_stop_in_the_loop_reads_the_generalisation_gap() -> None:
    """grow() measures the validation accuracy on batch statistics at each growth point. Checked on
    training images (no gap) it grows at every point; checked against wrong labels (the gap opens as
    the model learns) it stops once the fit passes one half."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (192,), generator=g)
    x = torch.randn(192, 1, 8, 8, generator=g)
    for c in range(4):  # an easy task: the class brightens one quadrant
        x[y == c, :, 4 * (c // 2):4 * (c // 2) + 4, 4 * (c % 2):4 * (c % 2) + 4] += 1.5
    runs = {}
    for name, val in (("no gap", (x[:64], y[:64])), ("gap", (x[128:], (y[128:] + 1) % 4))):
        res = grow(_cnn(), (x[:128], y[:128]), val, 8, GrowthConfig(stop="auto", auto_rule="gap", interval_epochs=1, seed=0),
                   lr=0.05, batch_size=16, progress=False)
        runs[name] = [h for h in res.history if "growth" in h]
        assert all(0.0 <= h["val_fit_acc"] <= 1.0 for h in runs[name])
        assert all(h["fit_acc"] - h["val_fit_acc"] < 1 - h["fit_acc"] for h in runs[name])  # grew only underfitting
    assert len(runs["no gap"]) == 6      # a growth at every point (75% of 8 epochs)
    assert 1 <= len(runs["gap"]) < 6     # grew while the fit was low, then stopped


def test_underfit_stop_in_the_loop_reads_the_training_accuracy() -> None:
    """grow() records the epoch's training accuracy at each growth point; a target the model
    reaches stops growth earlier than one it does not."""
    fit, val = _data(256)
    specs = {}
    for target in (0.05, 1.0):
        res = grow(_cnn(), fit, val, 8, GrowthConfig(stop="auto", auto_rule="underfit", fit_target=target,
                                                      interval_epochs=1, seed=0), lr=0.05, progress=False)
        growths = [h for h in res.history if "growth" in h]
        assert all(0.0 <= h["fit_acc"] <= 1.0 for h in growths)
        specs[target] = (len(growths), res.model.spec())
    assert specs[0.05] == (0, "VGG-0-0-0")   # 5% is below chance on 4 classes: never underfits
    assert specs[1.0][0] == 6                 # 100% is never reached here: a growth at every point (75% of 8 epochs)


def test_fit_gain_stop_reads_the_training_accuracy_gain_not_validation() -> None:
    """``fit_gain`` strikes when the training accuracy rose less than ``auto_threshold`` since the
    previous growth point, whatever the validation accuracy does; it stops on the second strike."""
    model = _cnn()
    grower = Grower(model, GrowthConfig(stop="auto", auto_rule="fit_gain", auto_threshold=0.03, auto_tolerance=1))
    assert grower.decide(model, 0.10, fit_acc=0.30) is not None   # first point: nothing to compare with
    assert grower.decide(model, 0.90, fit_acc=0.31) is not None   # val +0.80, fit +0.01: strike 1
    assert grower.decide(model, 0.10, fit_acc=0.40) is not None   # val -0.80, fit +0.09: no strike
    assert grower.decide(model, 0.95, fit_acc=0.42) is None       # val +0.85, fit +0.02: strike 2, stop
    assert grower.decide(model, 0.95, fit_acc=0.90) is None       # and stays stopped
    gain = Grower(model, GrowthConfig(stop="auto", auto_rule="gain", auto_threshold=0.03, auto_tolerance=1))
    readings = ((0.10, 0.30), (0.90, 0.31), (0.10, 0.40), (0.95, 0.42))
    assert all(gain.decide(model, v, fit_acc=f) is not None for v, f in readings)  # val EMA 0.1/0.5/0.3/0.625: 1 strike
    with pytest.raises(ValueError, match="fit_acc"):
        Grower(model, GrowthConfig(stop="auto", auto_rule="fit_gain")).decide(model, 0.5)


def test_fit_gain_stop_in_the_loop() -> None:
    """grow() passes the training accuracy to ``fit_gain``: a threshold no gain reaches stops at the
    second strike (two growths), one every gain passes grows at every point."""
    fit, val = _data(256)
    counts = {}
    for threshold in (-2.0, 2.0):
        res = grow(_cnn(), fit, val, 8, GrowthConfig(stop="auto", auto_rule="fit_gain", auto_threshold=threshold,
                                                      interval_epochs=1, seed=0), lr=0.05, progress=False)
        growths = [h for h in res.history if "growth" in h]
        assert all(0.0 <= h["fit_acc"] <= 1.0 for h in growths)
        counts[threshold] = len(growths)
    assert counts == {-2.0: 6, 2.0: 2}   # 6 points in 75% of 8 epochs; strikes at the 2nd and 3rd point


def test_fit_gain_is_the_default_stop_rule() -> None:
    """``stop="auto"`` reads the training-fit gain unless told otherwise: without the training
    accuracy it refuses to decide (the gain rule would not)."""
    assert GrowthConfig().auto_rule == "fit_gain"
    with pytest.raises(ValueError, match="fit_gain"):
        Grower(_cnn(), GrowthConfig(stop="auto")).decide(_cnn(), 0.5)


def test_val_every_skips_validation_records_not_training() -> None:
    """``val_every=3`` validates at epochs 3, 6 and the last one only; the training (growth steps,
    weights, FLOPs) is the one of ``val_every=1``, and the validations it keeps read the same."""
    fit, val = _data(256)
    runs = {}
    for every in (1, 3):
        torch.manual_seed(0)
        runs[every] = grow(_cnn(), fit, val, 7, GrowthConfig(stop="auto", interval_epochs=2, seed=0), lr=0.05,
                           progress=False, val_every=every)
    epochs = {e: [h for h in r.history if "growth" not in h] for e, r in runs.items()}
    assert [h["epoch"] for h in epochs[3] if h["val_acc"] is not None] == [3, 6, 7]
    assert [h["val_acc"] for h in epochs[1] if h["epoch"] in (3, 6, 7)] == [h["val_acc"] for h in epochs[3]
                                                                            if h["val_acc"] is not None]
    assert [h["growth"] for h in runs[1].history if "growth" in h] == [h["growth"] for h in runs[3].history
                                                                       if "growth" in h]
    assert epochs[1][-1]["train_flops"] == epochs[3][-1]["train_flops"]
    for a, b in zip(runs[1].model.state_dict().values(), runs[3].model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="val_every"):
        grow(_cnn(), fit, val, 1, lr=0.05, progress=False, val_every=0)


def test_bad_specs_and_budgets() -> None:
    model = _cnn()
    for spec in ("VGG-1-2", "ResNet-1-1-1", "VGG-a-b-c", "ViT-D2-H2"):
        with pytest.raises(ValueError, match="spec"):
            Grower(model, GrowthConfig(stop=spec))
    with pytest.raises(ValueError, match="below the starting model"):
        Grower(model, GrowthConfig(stop=100))
    with pytest.raises(ValueError, match="location"):
        Grower(model, GrowthConfig(location="best"))
    with pytest.raises(ValueError, match="needs a DeployBudget"):
        Grower(model, GrowthConfig(stop="budget"))
    with pytest.raises(ValueError, match="at least one of"):
        Grower(model, GrowthConfig(budget=DeployBudget()))
    with pytest.raises(ValueError, match="max_kernel"):
        Grower(model, GrowthConfig(max_kernel=4))
    with pytest.raises(ValueError, match="cannot insert"):
        model.insert_layer(1, 0)
    with pytest.raises(ValueError, match="smaller than the model"):
        Grower(_vit(), GrowthConfig(stop="ViT-D1-H1"))
    with pytest.raises(TypeError, match="GrowingCNN or GrowingTransformer"):
        grow(nn.Linear(2, 2), _data()[0], _data()[1], epochs=1)
    with pytest.raises(ValueError, match="unknown CNN family"):
        GrowingCNN("densenet")


def test_optimizer_state_is_carried() -> None:
    model = _vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()
    opt.step()
    old_qkv = model.layers[0].qkv.weight
    old_state = {k: v.clone() for k, v in opt.state[old_qkv].items()}
    embed = model.embed.weight
    carry = model.add_head()
    new = rebuild_optimizer(opt, model, carry)
    assert new.state[embed] is opt.state[embed]  # surviving parameter: same state
    st = new.state[model.layers[0].qkv.weight]
    rows = carry[model.layers[0].qkv.weight][1][0]
    assert torch.equal(st["exp_avg"][rows], old_state["exp_avg"]) and torch.equal(st["step"], old_state["step"])
    assert st["exp_avg"].shape == model.layers[0].qkv.weight.shape
    fresh = torch.ones(st["exp_avg"].shape[0], dtype=torch.bool)
    fresh[rows] = False
    assert fresh.sum() == 3 * 4 and not st["exp_avg"][fresh].any() and not st["exp_avg_sq"][fresh].any()
    assert new.param_groups[0]["lr"] == 1e-3 and new.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]
    # SGD momentum survives a CNN depth growth
    cnn = _cnn()
    sgd = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    cnn(torch.randn(2, 1, 8, 8)).sum().backward()
    sgd.step()
    buf = sgd.state[cnn.head.weight]["momentum_buffer"].clone()
    cnn.insert_layer(0, 0)
    sgd2 = rebuild_optimizer(sgd, cnn)
    assert torch.equal(sgd2.state[cnn.head.weight]["momentum_buffer"], buf)
    assert sgd2.param_groups[0]["momentum"] == 0.9 and len(sgd2.param_groups[0]["params"]) > len(sgd.param_groups[0]["params"])


@pytest.mark.parametrize("family", ["vgg", "resnet", "bottleneck", "mobilenetv3"])
def test_preserving_growth_preserves_function(family: str) -> None:
    model = _cnn(family)
    model.insert_layer(1, 1)
    x = torch.randn(3, 1, 8, 8)
    train, val = _data()
    grow(model, train, val, epochs=1, config=GrowthConfig(stop=model.spec()), lr=0.01, progress=False)  # trained BNs
    config = GrowthConfig(preserve=True)
    model.eval()
    x2 = torch.randn(5, 1, 8, 8)
    before, before2 = model(x), model(x2)
    for stage, position in ((0, 0), (1, 1), (1, 3), (2, 1)):  # after the stem, after downsampling, at the end
        apply_growth(model, {"kind": "depth", "stage": stage, "position": position}, config)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    branches = {name: branch_space(conv)[-1] for name, conv in model.rep_convs().items()}  # bn / avg3x3 / conv1x1
    apply_growth(model, {"kind": "width", "branches": branches}, config)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x2), before2, atol=1e-5, rtol=1e-5)  # inputs the new layers have not seen
    if family != "vgg":  # residual layers add exactly zero in train mode too (BN batch statistics)
        model.train()
        torch.manual_seed(1)
        ref = model(x)
        model.insert_layer(2, 1, preserve=True)
        torch.manual_seed(1)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    model.eval()
    before = model(x)
    model.insert_layer(1, 1, preserve=False)  # the thesis' init does change the function
    assert (model(x) - before).abs().max() > 1e-5


def test_default_growth_is_the_thesis_init() -> None:
    """By default new CNN layers keep their family's own init (BN gamma 1, not a Dirac kernel),
    new branches a non-zero gamma, and new Transformer parameters are drawn from N(0, 0.1^2)."""
    config = GrowthConfig()
    assert not config.preserve
    model = _cnn("resnet")
    [layer] = apply_growth(model, {"kind": "depth", "stage": 1, "position": 1}, config)[1]
    assert torch.equal(layer.last_bn().weight, torch.ones(8))
    name = next(iter(model.rep_convs()))
    [branch] = apply_growth(model, {"kind": "width", "branches": {name: "conv1x1"}}, config)[1]
    assert branch.bn.weight.abs().min() == 1.0
    vit = _vit()
    torch.manual_seed(0)
    [new] = apply_growth(vit, {"kind": "depth", "after": 0}, config)[1]
    w = torch.cat([new.qkv.weight.flatten(), new.proj.weight.flatten(), new.fc2.weight.flatten()]).detach()
    assert abs(float(w.std()) - 0.1) < 0.01 and abs(float(w.mean())) < 0.01
    carry = apply_growth(vit, {"kind": "width"}, config)[0]
    qkv = vit.layers[0].qkv.weight
    fresh = torch.ones_like(qkv, dtype=torch.bool)
    fresh[torch.meshgrid(*carry[qkv][1], indexing="ij")] = False
    assert abs(float(qkv[fresh].std()) - 0.1) < 0.02


def test_default_interval_is_the_thesis_epochs() -> None:
    """CNNs grow every 3 epochs, Transformers every 5 (in optimizer steps: epochs x steps per epoch);
    an interval in steps overrides it."""
    assert Grower(_cnn(), GrowthConfig(), 100, steps_per_epoch=4).interval == 12
    assert Grower(_vit(), GrowthConfig(), 100, steps_per_epoch=4).interval == 20
    assert Grower(_cnn(), GrowthConfig(interval_epochs=1.5), 100, steps_per_epoch=4).interval == 6
    assert Grower(_cnn(), GrowthConfig(interval=5), 100, steps_per_epoch=4).interval == 5
    with pytest.raises(ValueError, match="interval_epochs"):
        GrowthConfig(interval_epochs=0).validate(_cnn())
    train, val = _data()  # 2 steps per epoch: growth at the end of epochs 3 and 6 (step 6, 12) of 10
    res = grow(_cnn(), train, val, epochs=10, config=GrowthConfig(stop=10**9), lr=0.01, progress=False)
    assert [(h["step"], h["epoch"]) for h in res.history if "growth" in h] == [(6, 3), (12, 6)]


def test_train_flops_follow_the_model_as_it_grows() -> None:
    """The history's training FLOPs add 6 x forward MACs x batch per step of the model at that step."""
    train, val = _data()  # 72 samples: steps of 64 and 8
    model = _cnn()
    res = grow(model, train, val, epochs=4, config=GrowthConfig(stop="VGG-1-0-0", interval=2), lr=0.01,
               progress=False)
    x1 = train[0][:1]
    small = train_flops(_cnn(), x1, 72)
    events = [h for h in res.history if "growth" in h]
    assert len(events) == 1 and events[0]["train_flops"] == small  # one epoch of the starting model
    big = train_flops(res.model, x1, 72)
    assert big > small and res.history[-1]["train_flops"] == small + 3 * big
    assert forward_macs(_cnn(), x1) == cnn_flops(_cnn(), x1)  # no attention in a CNN
    vit = _vit()  # 4 tokens, 2 heads x head_dim 4: q k^T and att v are 2 x (2 heads x 4 x 4 x 4) MACs a layer
    assert forward_macs(vit, x1) - cnn_flops(vit, x1) == 2 * 2 * 4 * 4 * 4 * vit.depth


def test_transformer_growth_preserves_function() -> None:
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    model.add_head(zero_init=True)
    model.insert_layer(0, zero_init=True)
    assert model.spec() == "ViT-D2-H3"
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    model.add_head()
    assert not torch.allclose(model(x), before, atol=1e-3)


def test_transformer_head_growth_widens_the_residual() -> None:
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    apply_growth(model, {"kind": "width"}, GrowthConfig(preserve=True))  # widen_dim: one head_dim more residual width
    assert model.dim == 16 + 4 and model.layers[0].heads == 3 and model.arch()["dim"] == 20
    assert model.pos.shape == (1, 4, 20) and model.head.weight.shape == (4, 20)
    streams = []  # the residual stream entering every layer: its 4 new features are exactly 0
    hooks = [layer.norm1.register_forward_pre_hook(lambda m, inp: streams.append(inp[0])) for layer in model.layers]
    after = model(x)  # only the LayerNorm statistics move
    for h in hooks:
        h.remove()
    assert len(streams) == len(model.layers) and all(not s[..., 16:].any() and s[..., :16].any() for s in streams)
    assert (after - before).abs().max() < 0.5 * before.abs().max()
    rebuilt = build_from_arch(model.arch())
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), after)
    opt = torch.optim.AdamW(model.parameters())
    model(x).sum().backward()
    opt.step()
    carry, _ = apply_growth(model, {"kind": "width"}, GrowthConfig())
    new = rebuild_optimizer(opt, model, carry)
    pos_state = new.state[model.pos]["exp_avg"]
    assert pos_state.shape == (1, 4, 24) and not pos_state[..., 20:].any() and pos_state[..., :20].any()


def test_retrain_trains_the_found_architecture_from_scratch(monkeypatch) -> None:
    import adagrow.grow.grower as grower
    build, built = grower.build_from_arch, []  # record the fresh model grow() retrains
    monkeypatch.setattr(grower, "build_from_arch", lambda arch: built.append(build(arch)) or built[-1])
    train, val = _data()
    res = grow(_cnn(), train, val, epochs=2, config=GrowthConfig(stop="VGG-1-0-1", interval=1, retrain=True),
               lr=0.01, progress=False)
    assert len(built) == 1 and built[0] is res.model  # a model built from the grown arch, not a copy
    assert res.grown is not None and res.model is not res.grown
    assert res.model.arch() == res.grown.arch() and res.model.spec() == "VGG-1-0-1"
    assert not torch.equal(res.model.head.weight, res.grown.head.weight)
    retrain = [h for h in res.history if h.get("retrain")]
    assert len(retrain) == 2 and not any("growth" in h for h in retrain)


@pytest.mark.parametrize("make", [_cnn, _vit])
def test_grown_saved_loaded_fused_same_outputs(tmp_path, make) -> None:
    train, val = _data()
    res = grow(make(), train, val, epochs=5, config=GrowthConfig(stop=10**9, interval=1), lr=0.01, progress=False)
    path = save_grown(res.model, tmp_path / "g.safetensors")
    loaded = load_grown(path)
    x = val[0][:8]
    assert loaded.spec() == res.model.spec() and torch.equal(loaded(x), res.model(x))
    assert loaded.adagrow_input_shape == list(train[0].shape[1:])  # grow() records it: the CLI checks data
    deploy = reparameterize(loaded)
    assert (deploy(x) - res.model(x)).abs().max() < 1e-4 * res.model(x).abs().max() + 1e-6
    if isinstance(loaded, GrowingCNN):
        fused = [m for m in deploy.modules() if isinstance(m, nn.Conv2d) and hasattr(m, "reparam_overlap")]
        assert fused and any(int(m.reparam_overlap.max()) > 1 for m in fused)
    with pytest.raises(FileExistsError):
        save_grown(res.model, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_grown(path)
    with pytest.raises(FileNotFoundError):
        load_grown(tmp_path / "none.safetensors")


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # ranks start with different seeds: the growth must still agree
    model = GrowingCNN("resnet", widths=(8, 8, 16), num_classes=4)
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)
    train, val = _data()
    res = grow(model, train, val, epochs=5, config=GrowthConfig(stop=10**9, interval=1, location="random",
                                                                 seed=rank), lr=0.01, progress=False)
    torch.save({"arch": res.model.arch(), "state": res.model.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_two_ranks_agree(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"out.{r}") for r in (0, 1))
    assert a["arch"] == b["arch"] and a["arch"]["depths"] != [0, 0, 0]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert os.path.exists(tmp_path / "out.0")


def test_bert_encoder_grows_on_token_ids() -> None:
    torch.manual_seed(0)
    model = GrowingTransformer("bert", dim=16, head_dim=4, heads=2, depth=1, mlp_per_head=8, num_classes=3,
                               vocab_size=50, max_len=12)
    ids = torch.randint(0, 50, (4, 10))
    before = model(ids)
    model.add_head(zero_init=True)
    model.insert_layer(0, zero_init=True)
    assert model.spec() == "BERT-D2-H3" and torch.allclose(model(ids), before, atol=1e-6)
    model.add_head(zero_init=True, widen=4)
    assert model.embed.weight.shape == (50, 20) and model.spec() == "BERT-D2-H4"
    with pytest.raises(ValueError, match="int64 token ids"):
        model(torch.randn(4, 10))
    y = torch.randint(0, 3, (32,))
    x = torch.randint(0, 50, (32, 10))
    res = grow(model, (x[:24], y[:24]), (x[24:], y[24:]), epochs=4,
               config=GrowthConfig(stop="BERT-D3-H5", interval=1), progress=False)
    kinds = [h["growth"]["kind"] for h in res.history if "growth" in h]  # growth points: steps 1, 2, 3
    assert res.model.spec() == "BERT-D3-H5" and kinds == ["width", "depth"]


def test_cli_grows_to_a_latency_budget(tmp_path, capsys) -> None:
    import json

    from adagrow.cli import main
    out = tmp_path / "g.safetensors"
    argv = ["grow", "--family", "vgg", "--widths", "8,8,16", "--epochs", "1", "--interval", "6", "--size", "8", "--stop", "budget",
            "--budget-latency-ms", "50", "--backend", "ort-cpu", "--out", str(out), "--quiet", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert out.exists() and result["growth"] and result["spec"].startswith("VGG-")
    deploy = reparameterize(load_grown(out))
    assert deploy_cost(deploy, torch.zeros(1, 1, 8, 8), DeployBudget(latency_ms=50.0, backend="ort-cpu",
                                                                     runs=5))["latency_ms"] < 50
    argv[argv.index("50")] = "0.000001"
    assert main(argv[:-4] + ["--out", str(tmp_path / "h.safetensors")]) == 2
    assert "already breaks the budget" in capsys.readouterr().err


def test_benchmark_rows_of_a_later_run_replace_the_same_groups(tmp_path) -> None:
    """benchmarks/grow.py --rows A B: B's rows replace A's of the same (family, difficulty, name);
    A's other rows stay, and both commands are kept (the budget-only re-run of a full run)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grow.py"
    spec = importlib.util.spec_from_file_location("grow_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = lambda name, seed, acc: {"family": "vgg", "difficulty": 0.6, "name": name, "seed": seed, "accuracy": acc}  # noqa: E731
    a = {"command": "python benchmarks/grow.py", "budget_latency_ms": 0.08,
         "rows": [row("grown", 0, 0.6), row("budget", 0, 0.5), row("budget", 1, 0.55)]}
    b = {"command": ["benchmarks/grow.py", "--budget-only"], "budget_latency_ms": 0.05, "rows": [row("budget", 0, 0.7)]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    rows, budget_ms, commands = bench.earlier_rows([tmp_path / "a.json", tmp_path / "b.json"])
    assert [(r["name"], r["seed"], r["accuracy"]) for r in rows] == [("grown", 0, 0.6), ("budget", 0, 0.7)]
    assert budget_ms == 0.05 and commands == ["python benchmarks/grow.py", "python benchmarks/grow.py --budget-only"]
