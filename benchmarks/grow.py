"""Grown models against compute-matched controls on cluttered digits (CPU).

For each family (default VGG and ResNet; ViT available, its rows are mechanics only: a small ViT stays
near chance on cluttered digits in this budget) and seed, at the main difficulty:
- ``grown``: grown from its "empty" start with the defaults (the thesis' init for new layers, a
  growth every 3 / 5 epochs, depth placed by stage balance (CNN: the stage with the fewest layers,
  nearest the input first) or a probe (ViT), the cosine LR restarted after each growth,
  automatic stopping (``--auto-rule``, default ``GrowthConfig``'s, ``fit_gain``), then fine-tuning;
  decisions read a validation split carved from the training data, never the test set); its
  training FLOPs G are counted per step on the model as it was at that step, the placement
  probes included (``adagrow.grow.flops``);
- ``scratch-flops``: the grown architecture trained from scratch for G FLOPs (fewer epochs);
- ``scratch-epochs``: the same for the same epochs as the growth run;
- ``fixed`` (``--fixed-families``, default VGG): fixed nets of the same family, X-0-0-0, X-1-1-1 and
  X-2-2-2, each trained for G FLOPs (the accuracy-vs-latency front; X-0-0-0 at the main difficulty only);
- ``budget`` (``--budget-families``): grown until a batch-1 ORT CPU latency budget (the fixed
  VGG-1-1-1's latency) would break, against the fixed nets within that budget trained for the budget
  run's FLOPs (``budget-fixed``); whether a model is within the budget is decided on latencies timed
  in one interleaved pass with the reference net (``--budget-tolerance``).
Task adaptivity (``--adapt-families``): ``grown`` and ``fixed`` again at every ``--difficulties``.
Two controls are left out by default to keep the recipe (40 epochs, 3 seeds) within 60 CPU-minutes
on 2 cores (``--full-controls`` trains them): the ResNet fixed nets (about 880 CPU-s at 40 epochs;
the ResNet targets are the scratch comparisons) and X-0-0-0 at the other difficulties (416 of the
VGG runs' 2,619 CPU-s in grow_cpu_v11: its FLOPs-matched runs take 150-280 epochs, and it read
22-73%, far below the front). Controls record their validation accuracy every ``epochs // 10``
epochs (``grow(val_every=...)``: the training is the same, a validation pass costs 4-5% of an epoch).
Every model is measured in deploy form: test accuracy, deploy params, MACs at batch 1, batch-1
latency of the deploy PyTorch model and of its ONNX Runtime CPU session (1 thread, median).

Usage: ``python benchmarks/grow.py [--seeds 3] [--families vgg resnet vit] [--quick]`` (the defaults are
the full recipe: 3 seeds, 40 epochs, 3,000 images, 2 jobs)
-> ``benchmarks/results/grow_cpu.json``, ``.txt``, ``_flops.png`` and ``_latency.png``
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import matplotlib
import torch
from tqdm.auto import tqdm

from adagrow.data import cluttered_digits, train_val_split
from adagrow.files import atomic_write, write_json
from adagrow.grow import (DeployBudget, GrowingCNN, GrowingTransformer, GrowthConfig, build_from_arch, deploy_cost,
                          deploy_latency_ms, grow, reparameterize)
from adagrow.grow.budget import fits_latency, paired_latency_ms
from adagrow.grow.flops import train_flops
from adagrow.grow.grower import AUTO_RULES
from adagrow.grow.train import accuracy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

# depths / (depth, heads)
FIXED: dict[str, list[tuple[int, ...]]] = {"cnn": [(0, 0, 0), (1, 1, 1), (2, 2, 2)], "vit": [(1, 2), (2, 2), (2, 4)]}
CURVE_POINTS = 10  # validation records per control run (every epochs // 10 epochs; grown runs: every epoch)
CNN_WIDTHS = (16, 32, 64)
HEAD_DIM = 16
PAIRED = ("paired_ort_ms", "paired_reference_ms", "budget_ratio")  # budget rows: timed beside the reference


def measure(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor], runs: int) -> dict[str, Any]:
    """Deploy-form accuracy, params, MACs and 1-thread batch-1 latency (PyTorch eager, ORT CPU)."""
    x_te, y_te = test
    deploy = reparameterize(model.eval())
    cost = deploy_cost(model, x_te[:1])
    return {"spec": model.spec(), "accuracy": accuracy(deploy, x_te, y_te), "deploy_params": cost["params"],
            "train_params": cost["params_train"], "macs_b1": cost["macs"],
            "torch_ms": deploy_latency_ms(deploy, x_te[:1], "torch", runs=runs),
            "ort_ms": deploy_latency_ms(deploy, x_te[:1], "ort-cpu", runs=runs)}


def maker(family: str, size: int) -> Callable[[tuple | None], torch.nn.Module]:
    if family == "vit":
        def make(arch: tuple | None) -> torch.nn.Module:
            d, h = arch or (1, 2)  # residual width = heads x head_dim, as head growth keeps it
            return GrowingTransformer("vit", dim=h * HEAD_DIM, head_dim=HEAD_DIM, heads=h, depth=d, mlp_per_head=32,
                                      img_size=size, patch=4)
        return make
    return lambda arch: GrowingCNN(family, widths=CNN_WIDTHS, depths=arch)


def reference_net(size: int) -> torch.nn.Module:
    """The net whose ORT latency is the budget: the fixed VGG-1-1-1 (growth must beat the nets under it)."""
    return maker("vgg", size)(FIXED["cnn"][1])


def run_unit(family: str, seed: int, difficulty: float, args: argparse.Namespace,
             budget_ms: float | None) -> list[dict[str, Any]]:
    """Every model of one family, seed and task difficulty (a unit of work for ``--jobs``)."""
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = cluttered_digits(args.size, difficulty, args.n_train, n_test=args.n_train // 2)
    fit, val = train_val_split(x_tr, y_tr, 0.15, seed=0)
    make = maker(family, args.size)
    lr = None if family == "vit" else 0.05
    main_task = difficulty == args.difficulty
    rows = []

    def train(name: str, model: torch.nn.Module, config: GrowthConfig, epochs: int) -> torch.nn.Module:
        t0, c0 = time.perf_counter(), time.process_time()
        val_every = 1 if config.stop in ("auto", "budget") else max(1, epochs // CURVE_POINTS)
        res = grow(model, fit, val, epochs, config, lr=lr, progress=False, val_every=val_every)
        epoch_rows = [h for h in res.history if "growth" not in h]
        row = {"family": family, "difficulty": difficulty, "name": name, "seed": seed, "epochs": epochs,
               **measure(res.model, (x_te, y_te), args.runs), "train_flops": epoch_rows[-1]["train_flops"],
               "train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
               "curve": [(h["train_flops"], h["val_acc"]) for h in epoch_rows if h["val_acc"] is not None],
               "growth_events": [{"step": h["step"], "epoch": h["epoch"], **h["growth"]}
                                 for h in res.history if "growth" in h]}
        grew = ",".join(f"s{e['stage']}" if "stage" in e else e["kind"][0] for e in row["growth_events"])
        print(f"  {family:<7}d{difficulty:<4}{name:<15} s{seed} {row['spec']:<15} ep {epochs:>3} "
              f"acc {row['accuracy']:.4f} GFLOPs {row['train_flops'] / 1e9:7.1f} params {row['deploy_params']:>7} "
              f"ort {row['ort_ms']:6.3f} ms train {row['train_s']:5.1f}s {grew}", flush=True)
        rows.append(row)
        return res.model

    def matched(name: str, arch: Any, flops: float, fresh: bool = False) -> torch.nn.Module:
        """Train ``arch`` (a depths tuple, or an arch record with ``fresh``) for ``flops`` training FLOPs."""
        torch.manual_seed(seed + 1000)
        model = build_from_arch(arch) if fresh else make(arch)
        epochs = max(1, round(flops / train_flops(model, fit[0][:1], len(fit[0]))))
        return train(name, model, GrowthConfig(stop=model.spec(), seed=seed), epochs)

    if not args.budget_only:
        torch.manual_seed(seed)
        auto = {"auto_rule": args.auto_rule, "bn_batches": args.bn_batches,
                **({"fit_target": args.fit_target} if args.fit_target is not None else {})}
        grown = train("grown", make(None), GrowthConfig(stop="auto", seed=seed, **auto), args.epochs)
        budget_g = rows[-1]["train_flops"]
        if args.grown_only:
            return rows
        if main_task:
            matched("scratch-flops", grown.arch(), budget_g, fresh=True)
            torch.manual_seed(seed + 1000)
            train("scratch-epochs", build_from_arch(grown.arch()), GrowthConfig(stop=grown.spec(), seed=seed),
                  args.epochs)
        if family in front_families(args):
            for arch in fixed_nets(family, main_task, args.full_controls):
                matched("fixed", arch, budget_g)
    if main_task and budget_ms is not None and family in args.budget_families:
        torch.manual_seed(seed)
        budget = (DeployBudget(latency_ms=budget_ms, backend="ort-cpu", runs=args.runs) if args.budget_growth == "once"
                  else DeployBudget(latency_of=reparameterize(reference_net(args.size).eval()),
                                    latency_tolerance=args.budget_tolerance, backend="ort-cpu", runs=args.runs))
        grown_b = train("budget", make(None), GrowthConfig(stop="budget", budget=budget, seed=seed), args.epochs)
        compared = {"budget": (rows[-1], grown_b)}
        spent = rows[-1]["train_flops"]
        for arch in FIXED["cnn"][:2]:  # the nets under the default budget (X-1-1-1's latency)
            model = matched("budget-fixed", arch, spent)
            compared[model.spec()] = (rows[-1], model)
        pair_budget(compared, reference_net(args.size), x_te[:1], args.budget_runs)
    return rows


def front_families(args: argparse.Namespace) -> set[str]:
    """The families whose fixed nets are trained for the front: ``--fixed-families`` of the run's
    ``--families`` (all of them with ``--full-controls``)."""
    return set(args.families) if args.full_controls else set(args.fixed_families) & set(args.families)


def fixed_nets(family: str, main_task: bool, full: bool) -> list[tuple[int, ...]]:
    """The fixed nets trained for the front: all three at the main difficulty (or with ``full``), the
    CNNs' X-1-1-1 and X-2-2-2 at the other difficulties (X-0-0-0 is far below the front, and costly)."""
    nets = FIXED["vit" if family == "vit" else "cnn"]
    return nets if main_task or full or family == "vit" else nets[1:]


def pair_budget(compared: dict[str, tuple[dict[str, Any], torch.nn.Module]], reference: torch.nn.Module,
                example: torch.Tensor, runs: int) -> None:
    """Time the budget's reference net (the architecture whose latency set the budget) and every
    model scored against the budget in one interleaved pass (``paired_latency_ms``), and record in
    each model's row its latency and its ratio to the reference's from that pass."""
    deploys = {"reference": reparameterize(reference.eval()),
               **{name: reparameterize(model.eval()) for name, (_, model) in compared.items()}}
    ms = paired_latency_ms(deploys, example, "ort-cpu", runs=runs)
    for name, (row, _) in compared.items():
        row.update(paired_ort_ms=ms[name], paired_reference_ms=ms["reference"],
                   budget_ratio=ms[name] / ms["reference"])


def summarize(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Mean / std over seeds per (family, difficulty, name, spec for fixed nets)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["family"], r["difficulty"], r["name"], r["spec"] if "fixed" in r["name"] else "")
        groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        out[key] = {"family": key[0], "difficulty": key[1], "name": key[2], "specs": sorted({r["spec"] for r in rs}),
                    "n": len(rs), "acc_mean": statistics.mean(acc),
                    "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    **{k: statistics.mean(r[k] for r in rs) for k in ("deploy_params", "macs_b1", "torch_ms", "ort_ms",
                                                                       "train_flops", "epochs", "train_cpu_s")},
                    **({k: statistics.mean(r[k] for r in rs) for k in PAIRED} | {"budget_ratios": [r["budget_ratio"] for r in rs]}
                       if all("budget_ratio" in r for r in rs) else {})}
    return out


def _dominating(fixed: list[dict[str, Any]], s: dict[str, Any]) -> list[str]:
    """Fixed nets at most as slow (ORT ms) as ``s`` with a higher mean accuracy."""
    return [f["specs"][0] for f in fixed if f["ort_ms"] <= s["ort_ms"] and f["acc_mean"] > s["acc_mean"]]


def targets(summary: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    main = args.difficulty

    def get(fam: str, d: float, name: str) -> dict[str, Any] | None:
        return summary.get((fam, d, name, ""))

    for fam in args.families:
        grown = get(fam, main, "grown")
        flops, epochs = get(fam, main, "scratch-flops"), get(fam, main, "scratch-epochs")
        if grown is None or flops is None or epochs is None:  # a run cut short (--rows) before this family's units
            continue
        out.append({"family": fam, "target": "grown mean >= same architecture from scratch at equal training FLOPs",
                    "met": grown["acc_mean"] >= flops["acc_mean"], "grown": grown["acc_mean"],
                    "scratch_flops": flops["acc_mean"], "margin": grown["acc_mean"] - flops["acc_mean"]})
        out.append({"family": fam, "target": "grown mean >= scratch at equal epochs mean - 1 std",
                    "met": grown["acc_mean"] >= epochs["acc_mean"] - epochs["acc_std"], "grown": grown["acc_mean"],
                    "scratch_epochs": epochs["acc_mean"], "scratch_epochs_std": epochs["acc_std"],
                    "margin": grown["acc_mean"] - epochs["acc_mean"] + epochs["acc_std"]})
        for d in args.difficulties if fam in args.adapt_families else [main]:
            g = get(fam, d, "grown")
            if g is None:
                continue
            fixed = [s for k, s in summary.items() if k[:3] == (fam, d, "fixed")]
            if not fixed:  # this family's fixed nets were not trained (--fixed-families)
                continue
            dom = _dominating(fixed, g)
            out.append({"family": fam, "difficulty": d, "target": "grown on or above the fixed-net front (acc vs ORT "
                        "ms, fixed nets at the grown run's FLOPs)", "met": not dom, "dominated_by": dom,
                        "grown": g["acc_mean"], "grown_specs": ",".join(g["specs"]), "grown_ort_ms": g["ort_ms"],
                        "margin": g["acc_mean"] - max((f["acc_mean"] for f in fixed if f["specs"][0] in dom),
                                                      default=g["acc_mean"])})
        if fam in args.adapt_families and len(args.difficulties) > 1 and all(get(fam, d, "grown")
                                                                             for d in args.difficulties):
            sizes = [get(fam, d, "grown")["deploy_params"] for d in args.difficulties]
            out.append({"family": fam, "target": "different grown sizes across task difficulties",
                        "met": len({round(s) for s in sizes}) == len(sizes), "deploy_params": sizes})
        b = get(fam, main, "budget")
        if b is not None and "budget_ratio" in b:  # rows of runs before the paired scoring have none
            fixed = [s for k, s in summary.items() if k[:3] == (fam, main, "budget-fixed")]
            within = [s for s in fixed if fits_latency(s["budget_ratio"], args.budget_tolerance)]
            best = max((s["acc_mean"] for s in within), default=None)
            ref = reference_net(args.size).spec()
            same_arch = [s["budget_ratio"] for s in fixed if s["specs"][0] == ref]
            out.append({"family": fam, "target": f"latency budget (ORT CPU, the fixed {ref}'s latency, "
                        f"timed with every compared model in one interleaved pass, tolerance "
                        f"{100 * args.budget_tolerance:.0f}%): grown within it and >= the best fixed net within it "
                        "(equal FLOPs)",
                        "met": fits_latency(b["budget_ratio"], args.budget_tolerance) and (best is None or b["acc_mean"] >= best),
                        "budget_ratio": b["budget_ratio"], "budget_ratios": b["budget_ratios"],
                        "reference_ort_ms": b["paired_reference_ms"], "budget_ort_ms": b["paired_ort_ms"],
                        "same_arch_ratio": same_arch[0] if same_arch else None,
                        "grown": b["acc_mean"], "best_fixed_within": best,
                        "fixed_within": {s["specs"][0]: s["budget_ratio"] for s in within},
                        "fixed_over": {s["specs"][0]: s["budget_ratio"] for s in fixed if s not in within},
                        "margin": None if best is None else b["acc_mean"] - best})
    return out


def plot(rows: list[dict[str, Any]], summary: dict, args: argparse.Namespace, out: Path) -> list[Path]:
    """Accuracy vs training FLOPs (validation curves per run, test accuracy at the end) and
    accuracy vs ORT latency (fixed-net front and grown models), one panel per family / task."""
    colors = {"grown": "C0", "scratch-flops": "C1", "scratch-epochs": "C2", "fixed": "C7", "budget": "C3"}
    fams = args.families
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for r in rows:
            if r["family"] != fam or r["difficulty"] != args.difficulty or r["name"] not in colors:
                continue
            fl, acc = zip(*r["curve"])
            ax.plot(fl, acc, color=colors[r["name"]], alpha=0.35, lw=1)
            ax.scatter([r["train_flops"]], [r["accuracy"]], color=colors[r["name"]], s=14,
                       label=r["name"] if r["seed"] == 0 and (r["name"] != "fixed" or r["spec"].endswith("-0")
                                                               or r["spec"] == "ViT-D1-H2") else None)
        ax.set(xscale="log", xlabel="training FLOPs", ylabel="accuracy (lines: val, dots: test)",
               title=f"{fam}, difficulty {args.difficulty}")
        ax.legend(fontsize=7)
    paths = [out.with_name(out.stem + "_flops.png")]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    panels = [(f, d) for f in fams for d in (args.difficulties if f in args.adapt_families else [args.difficulty])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (fam, d) in zip(axes[0], panels):
        fixed = sorted((s for k, s in summary.items() if k[:3] == (fam, d, "fixed")), key=lambda s: s["ort_ms"])
        front, best = [], -1.0
        for s in fixed:
            if s["acc_mean"] > best:
                front.append(s)
                best = s["acc_mean"]
        ax.step([s["ort_ms"] for s in front], [s["acc_mean"] for s in front], where="post", color="C7", label="fixed front")
        for s in summary.values():
            if s["family"] == fam and s["difficulty"] == d and s["name"] in colors:
                ax.errorbar(s["ort_ms"], s["acc_mean"], yerr=s["acc_std"], fmt="o", color=colors[s["name"]],
                            label=s["name"] if s["name"] != "fixed" else None)
                if s["name"] == "fixed":
                    ax.annotate(s["specs"][0], (s["ort_ms"], s["acc_mean"]), fontsize=6)
        ax.set(xlabel="ORT CPU batch-1 ms (deploy)", ylabel="test accuracy", title=f"{fam}, difficulty {d}")
        ax.legend(fontsize=7)
    paths.append(out.with_name(out.stem + "_latency.png"))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def earlier_rows(paths: list[Path]) -> tuple[list[dict[str, Any]], float | None, list[str]]:
    """The rows of earlier runs' JSON files, a later file's rows replacing an earlier file's rows of
    the same (family, difficulty, name); the last file's budget latency; each run's command."""
    key = lambda r: (r["family"], r["difficulty"], r["name"])  # noqa: E731
    rows: list[dict[str, Any]] = []
    budget_ms, commands = None, []
    for path in paths:
        run = json.loads(path.read_text())
        replaced = {key(r) for r in run["rows"]}
        rows = [r for r in rows if key(r) not in replaced] + run["rows"]
        budget_ms = run.get("budget_latency_ms", budget_ms)
        ran = run["command"]
        commands.append(ran if isinstance(ran, str) else "python " + " ".join(ran))
    return rows, budget_ms, commands


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_units(args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    """Train and measure every (family, seed, difficulty) unit, ``--jobs`` at a time; returns the
    rows and the latency budget the budget runs grew to. Rows of finished units are saved to
    ``<out>.partial.json`` as they come (``--rows`` summarizes them if the run is cut short)."""
    x_te = cluttered_digits(args.size, args.difficulty, args.n_train, n_test=args.n_train // 2)[2]
    # the budget growth keeps: the reference net's latency, timed once here (scoring times it again beside
    # every compared model, pair_budget)
    budget_ms = deploy_latency_ms(reparameterize(reference_net(args.size).eval()), x_te[:1], "ort-cpu", runs=args.runs)
    units = [(fam, seed, d) for fam in args.families for seed in range(args.seeds)
             for d in (args.difficulties if fam in args.adapt_families else [args.difficulty])
             if not args.budget_only or (fam in args.budget_families and d == args.difficulty)]
    units.sort(key=lambda u: u[2] != args.difficulty)  # the costlier main-task units first (shorter tail)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        done = [pool.submit(run_unit, fam, seed, d, args, budget_ms) for fam, seed, d in units]
        for fut in tqdm(done, desc="units"):  # a run cut short keeps the finished units
            rows.extend(fut.result())
            write_json(args.out.with_suffix(".partial.json"),
                       {"command": sys.argv, "budget_latency_ms": budget_ms, "rows": rows})
    return rows, budget_ms


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=["vgg", "resnet"],
                    help="vgg, resnet, vit (ViT rows are mechanics only: a small ViT stays near chance on this task)")
    ap.add_argument("--fixed-families", nargs="*", default=["vgg"],
                    help="families whose fixed nets are trained for the accuracy-vs-latency front (the ResNet ones "
                         "cost about 880 CPU-s at 40 epochs)")
    ap.add_argument("--full-controls", action="store_true",
                    help="train every fixed net: every family's, and X-0-0-0 at every difficulty (about +22 "
                         "CPU-minutes at 40 epochs)")
    ap.add_argument("--size", type=int, default=16, help="canvas size")
    ap.add_argument("--difficulty", type=float, default=0.6, help="the main task")
    ap.add_argument("--difficulties", type=float, nargs="+", default=[0.3, 0.6, 0.9], help="task-adaptivity tasks")
    ap.add_argument("--adapt-families", nargs="*", default=["vgg"], help="families grown on every difficulty")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--budget-families", nargs="*", default=["vgg"], help="CNN families grown to a latency budget")
    ap.add_argument("--budget-tolerance", type=float, default=0.03,
                    help="a model is within the latency budget when its latency, timed in one interleaved pass with "
                         "the budget's reference net, is at most (1 + this) x the reference's (timing noise: two "
                         "copies of one architecture differed by up to 1.3%% at 50 rounds, 0.5%% at 300, on the shared "
                         "machine)")
    ap.add_argument("--budget-growth", choices=("once", "paired"), default="paired",
                    help="how the budget run checks each growth step: against the reference net's latency timed "
                         "beside the candidate at every check (paired, DeployBudget.latency_of, with "
                         "--budget-tolerance), or timed once at the start (once: v12's budget read 1.48x the "
                         "reference's true latency under load, and the budget run grew past it)")
    ap.add_argument("--budget-only", action="store_true",
                    help="train only the budget runs and the fixed nets scored against them (the budget families, "
                         "main task); combine with an earlier run's rows by giving both files to --rows")
    ap.add_argument("--budget-runs", type=int, default=300,
                    help="interleaved rounds (one call of each compared model per round) of the budget scoring pass")
    ap.add_argument("--auto-rule", choices=AUTO_RULES, default=GrowthConfig.auto_rule,
                    help="what the grown runs' automatic stop reads (GrowthConfig.auto_rule)")
    ap.add_argument("--fit-target", type=float, default=None,
                    help="auto_rule='underfit': stop once the training accuracy reaches it (default: GrowthConfig's)")
    ap.add_argument("--bn-batches", type=int, default=GrowthConfig.bn_batches,
                    help="auto_rule='gain': training batches that re-estimate BatchNorm statistics (on a copy) "
                         "before each validation the stop rule reads (GrowthConfig.bn_batches; 0: none)")
    ap.add_argument("--grown-only", action="store_true",
                    help="train only the grown runs (no controls, no budget run; compare with an earlier run's rows "
                         "of the same seeds, training is deterministic per seed)")
    ap.add_argument("--runs", type=int, default=50, help="timed calls per latency figure")
    ap.add_argument("--threads", type=int, default=1, help="training threads per job")
    ap.add_argument("--jobs", type=int, default=2, help="(family, seed, difficulty) units run in parallel processes")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 16x16, 600 images, 4 epochs, 1 seed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "grow_cpu.json")
    ap.add_argument("--rows", type=Path, nargs="+", default=None,
                    help="summarize the rows of earlier runs' JSON (the .partial.json of a run cut short) instead "
                         "of training; give that run's other arguments. With several files, the rows of a later "
                         "file replace an earlier file's rows of the same family, difficulty and name")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.n_train, args.epochs, args.seeds, args.runs = 16, 600, 4, 1, 10
    if args.difficulty not in args.difficulties:
        args.difficulties = sorted({*args.difficulties, args.difficulty})
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    command = "python benchmarks/grow.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.rows is not None:
        rows, budget_ms, ran = earlier_rows(args.rows)
        command = f"{' + '.join(ran)}  ({len(rows)} rows of {'those runs' if len(ran) > 1 else 'that run'} summarized by: {command})"
    else:
        rows, budget_ms = run_units(args)
    summary = summarize(rows)
    tgts = targets(summary, args)
    lines = [f"{'family':<7} {'diff':>4} {'model':<15} {'spec(s)':<28} {'n':>2} {'acc mean±std':>15} {'epochs':>6} "
             f"{'GFLOPs':>7} {'params':>7} {'MACs':>7} {'ort ms':>7}"]
    for s in sorted(summary.values(), key=lambda s: (s["family"], s["difficulty"], s["name"], s["train_flops"])):
        lines.append(f"{s['family']:<7} {s['difficulty']:>4} {s['name']:<15} {','.join(s['specs'])[:28]:<28} {s['n']:>2} "
                     f"{100 * s['acc_mean']:7.2f}±{100 * s['acc_std']:5.2f}% {s['epochs']:6.1f} "
                     f"{s['train_flops'] / 1e9:7.1f} {s['deploy_params']:>7.0f} {s['macs_b1'] / 1e6:6.2f}M "
                     f"{s['ort_ms']:7.3f}")
    lines.append("")
    for t in tgts:
        rest = ", ".join(f"{k}={_fmt(v)}" for k, v in t.items() if k not in ("family", "target", "met"))
        lines.append(f"{t['family']:<7} {t['target']}: {'met' if t['met'] else 'NOT met'} ({rest})")
    wall: float | None = time.perf_counter() - t0
    cpu = time.process_time() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the finished worker processes
    cpu += children.ru_utime + children.ru_stime
    if args.rows is not None:  # the earlier run's processes are gone: its rows' own training CPU time
        wall, cpu = None, sum(r["train_cpu_s"] for r in rows)
        lines.append(f"\nCPU {cpu / 60:.1f} min: the training of the {len(rows)} rows summarized (the run's wall clock and "
                     "its measurement time are not in its rows)")
    else:
        lines.append(f"\nwall {(time.perf_counter() - t0) / 60:.1f} min, CPU {cpu / 60:.1f} min ({args.jobs} job(s) x {args.threads} "
                     "thread(s); all processes)")
    print("\n" + "\n".join(lines))
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "note": "shared machine: 2 cores used by several jobs at once; latency figures are noisy"}
    result = {"benchmark": "grow", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
              "command": command, "machine": machine,
              "task": {"data": "cluttered_digits", "size": args.size, "difficulty": args.difficulty,
                       "difficulties": args.difficulties, "n_train": args.n_train, "val_fraction": 0.15,
                       "epochs": args.epochs, "seeds": args.seeds, "growth_init": "thesis (preserve=False)",
                       "placement": {"cnn": "balanced (the stage with the fewest layers, nearest the input "
                                            "first)", "vit": "probe (a candidate layer after every layer, "
                                            "trained briefly on a copy; lowest validation loss wins; probe FLOPs "
                                            "charged)"},
                       "stop": {"rule": args.auto_rule, **({"bn_batches": args.bn_batches}
                                if args.auto_rule == "gain" else {}), **({"fit_target": args.fit_target or GrowthConfig.fit_target}
                                if args.auto_rule == "underfit" else {"gap_ratio": GrowthConfig.gap_ratio}
                                if args.auto_rule == "gap" else {}), **({"auto_threshold": GrowthConfig.auto_threshold,
                                "auto_tolerance": GrowthConfig.auto_tolerance} if args.auto_rule in ("gain", "fit_gain")
                                else {})},
                       "budget": {"growth": args.budget_growth, "tolerance": args.budget_tolerance,
                                  "scoring_rounds": args.budget_runs},
                       "lr_after_growth": "restart (cosine from the base LR over the remaining steps)",
                       "interval_epochs": {"cnn": 3, "vit": 5}, "train_flops": "3 x 2 x forward MACs x batch per step",
                       "controls": {"fixed_families": sorted(front_families(args)),
                                    "fixed_main": ["-".join(map(str, a)) for a in FIXED["cnn"]],
                                    "fixed_other_difficulties": ["-".join(map(str, a)) for a in
                                                                 fixed_nets("vgg", False, args.full_controls)],
                                    "val_every_control": f"epochs // {CURVE_POINTS} (grown and budget runs: 1)"}},
              "budget_latency_ms": budget_ms, "wall_s": wall, "cpu_s": cpu, "rows": rows,
              "summary": list(summary.values()), "targets": tgts}
    write_json(args.out, result)
    if args.rows is None:
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    header = f"{command}\n{result['date']}  {machine['platform']}  {machine['note']}\n\n"
    atomic_write(args.out.with_suffix(".txt"), lambda tmp: Path(tmp).write_text(header + "\n".join(lines) + "\n"))
    pngs = plot(rows, summary, args, args.out)
    print(f"wrote {args.out}, {', '.join(str(p) for p in pngs)}")
    return result


if __name__ == "__main__":
    main()
