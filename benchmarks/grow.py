"""Grown models against fair controls on the cluttered-digits task (CPU).

For each family (VGG, ResNet, ViT) and each seed:
- ``grown``: grown from its "empty" start (greedy placement, automatic stopping; decisions read a
  validation split carved from the training data, never the test set);
- ``grown-random`` (``--random-families``): the same with random placement (checks the importance score);
- ``retrained``: the grown architecture trained from scratch with the same epochs;
- ``fixed``: fixed nets of the same family (the Pareto front);
- ``budget`` (``--budget-families``, CNNs): grown until a batch-1 latency budget on ONNX Runtime CPU (fp32
  export of the deploy model, 1 thread) would be broken.
Every model is measured in deploy form: test accuracy, deploy params, MACs at batch 1, batch-1
latency of the deploy PyTorch model and of its ONNX Runtime CPU session (1 thread, median).
Targets: grown mean accuracy on or above the fixed-net Pareto front (no fixed net with <= its
deploy params has a higher mean accuracy) and >= retrained mean - 1 std; the budget model meets
the latency budget and beats every fixed net that meets it.

Usage: ``python benchmarks/grow.py [--seeds 3] [--families vgg resnet vit] [--quick]``
-> ``benchmarks/results/grow_cpu.json`` and ``.txt``
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
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

import torch
from tqdm.auto import tqdm

from adagrow.data import cluttered_digits, train_val_split
from adagrow.files import atomic_write, write_json
from adagrow.grow import (DeployBudget, GrowingCNN, GrowingTransformer, GrowthConfig, build_from_arch, deploy_cost,
                          deploy_latency_ms, grow, reparameterize)
from adagrow.grow.train import accuracy

FIXED = {"cnn": [(0, 0, 0), (1, 1, 1), (2, 2, 2)], "vit": [(1, 2), (2, 2), (2, 4)]}  # depths / (depth, heads)
CNN_WIDTHS = (16, 32, 64)
HEAD_DIM = 16


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


def run_unit(family: str, seed: int, args: argparse.Namespace, budget_ms: float | None) -> list[dict[str, Any]]:
    """Every model of one family and one seed (a unit of work for ``--jobs``)."""
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_te, y_te = cluttered_digits(args.size, args.difficulty, args.n_train, n_test=args.n_train // 2)
    fit, val = train_val_split(x_tr, y_tr, 0.15, seed=0)
    make = maker(family, args.size)
    lr = None if family == "vit" else 0.05
    rows = []

    def train(name: str, seed: int, model: torch.nn.Module, config: GrowthConfig) -> torch.nn.Module:
        torch.manual_seed(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        res = grow(model, fit, val, args.epochs, config, lr=lr, progress=False)
        row = {"family": family, "name": name, "seed": seed, **measure(res.model, (x_te, y_te), args.runs),
               "train_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
               "growth_events": [{"step": h["step"], **h["growth"]} for h in res.history if "growth" in h]}
        print(f"  {family:<7}{name:<13} s{seed} {row['spec']:<18} acc {row['accuracy']:.4f} "
              f"params {row['deploy_params']:>7} MACs {row['macs_b1'] / 1e6:6.2f}M torch {row['torch_ms']:6.3f} ms "
              f"ort {row['ort_ms']:6.3f} ms train {row['train_s']:5.1f}s", flush=True)
        rows.append(row)
        return res.model

    torch.manual_seed(seed)
    init = {"preserve": not args.thesis_init}
    grown = train("grown", seed, make(None), GrowthConfig(stop="auto", seed=seed, **init))
    if family in args.random_families:
        torch.manual_seed(seed)
        train("grown-random", seed, make(None), GrowthConfig(stop="auto", location="random", seed=seed, **init))
    torch.manual_seed(seed + 1000)
    fresh = build_from_arch(grown.arch())
    train("retrained", seed, fresh, GrowthConfig(stop=fresh.spec(), seed=seed))
    for arch in FIXED["vit" if family == "vit" else "cnn"]:
        torch.manual_seed(seed)
        model = make(arch)
        train("fixed", seed, model, GrowthConfig(stop=model.spec(), seed=seed))  # a spec it has: no growth
    if budget_ms is not None and family in args.budget_families:
        torch.manual_seed(seed)
        budget = DeployBudget(latency_ms=budget_ms, backend="ort-cpu", runs=args.runs)
        train("budget", seed, make(None), GrowthConfig(stop="budget", budget=budget, seed=seed, **init))
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Mean / std over seeds per (family, name, spec-or-variant)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        key = (r["family"], r["name"], r["spec"] if r["name"] == "fixed" else r["name"])
        groups.setdefault(key, []).append(r)
    out = {}
    for key, rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        out[key] = {"family": key[0], "name": key[1], "specs": sorted({r["spec"] for r in rs}), "n": len(rs),
                    "acc_mean": statistics.mean(acc), "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    **{k: statistics.mean(r[k] for r in rs) for k in ("deploy_params", "macs_b1", "torch_ms", "ort_ms",
                                                                       "train_s", "train_cpu_s")}}
    return out


def _front_at(fixed: list[dict[str, Any]], params: float) -> float:
    """Accuracy of the fixed-net front at ``params``, linear in log(params) between front points
    (a stricter reading of "on the front" than dominance; flat beyond the ends)."""
    pts = sorted((s["deploy_params"], s["acc_mean"]) for s in fixed)
    front = [pts[0]]
    for p, a in pts[1:]:
        if a > front[-1][1]:
            front.append((p, a))
    for (p0, a0), (p1, a1) in zip(front, front[1:]):
        if p0 <= params <= p1:
            return a0 + (a1 - a0) * (math.log(params) - math.log(p0)) / (math.log(p1) - math.log(p0))
    return front[0][1] if params < front[0][0] else front[-1][1]


def targets(summary: dict, families: list[str], budget_ms: float | None) -> list[dict[str, Any]]:
    out = []
    for fam in families:
        grown = summary[(fam, "grown", "grown")]
        retrained = summary[(fam, "retrained", "retrained")]
        fixed = [s for k, s in summary.items() if k[0] == fam and k[1] == "fixed"]
        dominating = [s["specs"][0] for s in fixed
                      if s["deploy_params"] <= grown["deploy_params"] and s["acc_mean"] > grown["acc_mean"]]
        out.append({"family": fam, "target": "grown on or above the fixed-net Pareto front (acc vs deploy params)",
                    "met": not dominating, "dominated_by": dominating, "grown_acc": grown["acc_mean"],
                    "grown_params": grown["deploy_params"],
                    "front_acc_interpolated": _front_at(fixed, grown["deploy_params"])})
        out.append({"family": fam, "target": "grown mean acc >= retrained mean - 1 std",
                    "met": grown["acc_mean"] >= retrained["acc_mean"] - retrained["acc_std"],
                    "grown_acc": grown["acc_mean"], "retrained_acc": retrained["acc_mean"],
                    "retrained_std": retrained["acc_std"]})
        if budget_ms is not None and (fam, "budget", "budget") in summary:
            b = summary[(fam, "budget", "budget")]
            meeting = [s for s in fixed if s["ort_ms"] <= budget_ms]
            best = max((s["acc_mean"] for s in meeting), default=None)
            out.append({"family": fam, "target": f"latency budget {budget_ms:.3f} ms (ORT CPU, 1 thread): grown meets "
                        "it and beats every fixed net that meets it",
                        "met": b["ort_ms"] <= budget_ms and (best is None or b["acc_mean"] > best),
                        "budget_ort_ms": b["ort_ms"], "budget_acc": b["acc_mean"], "best_fixed_within_acc": best,
                        "fixed_within": [s["specs"][0] for s in meeting]})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=["vgg", "resnet", "vit"])
    ap.add_argument("--size", type=int, default=20, help="canvas size")
    ap.add_argument("--difficulty", type=float, default=0.6)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--random-families", nargs="*", default=["vgg"], help="families with a random-placement control")
    ap.add_argument("--budget-families", nargs="*", default=["vgg"], help="CNN families grown to a latency budget")
    ap.add_argument("--budget-latency-ms", type=float, default=None,
                    help="latency budget (ORT CPU, 1 thread); default: the fixed X-1-1-1 net's measured latency")
    ap.add_argument("--runs", type=int, default=100, help="timed calls per latency figure")
    ap.add_argument("--threads", type=int, default=1, help="training threads per job")
    ap.add_argument("--jobs", type=int, default=1, help="(family, seed) units run in parallel processes")
    ap.add_argument("--thesis-init", action="store_true", help="grow with the thesis' init (preserve=False)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 16x16, 600 images, 2 epochs, 1 seed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "grow_cpu.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.n_train, args.epochs, args.seeds, args.runs = 16, 600, 2, 1, 10
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    x_te = cluttered_digits(args.size, args.difficulty, args.n_train, n_test=args.n_train // 2)[2]
    budget_ms = args.budget_latency_ms
    if budget_ms is None:  # the middle fixed CNN's latency: growth must beat the nets that fit under it
        budget_ms = deploy_latency_ms(reparameterize(maker("vgg", args.size)(FIXED["cnn"][1]).eval()), x_te[:1],
                                      "ort-cpu", runs=args.runs)
    units = [(fam, seed) for fam in args.families for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        done = [pool.submit(run_unit, fam, seed, args, budget_ms) for fam, seed in units]
        rows = [row for fut in tqdm(done, desc="families x seeds") for row in fut.result()]
    summary = summarize(rows)
    tgts = targets(summary, args.families, budget_ms)
    lines = [f"{'family':<8} {'model':<13} {'spec(s)':<34} {'acc mean±std':>15} {'params':>8} {'MACs':>8} "
             f"{'torch ms':>8} {'ort ms':>7}"]
    for s in summary.values():
        lines.append(f"{s['family']:<8} {s['name']:<13} {','.join(s['specs'])[:34]:<34} "
                     f"{100 * s['acc_mean']:7.2f}±{100 * s['acc_std']:5.2f}% {s['deploy_params']:>8.0f} "
                     f"{s['macs_b1'] / 1e6:7.2f}M {s['torch_ms']:8.3f} {s['ort_ms']:7.3f}")
    lines.append("")
    for t in tgts:
        lines.append(f"{t['family']:<8} {t['target']}: {'met' if t['met'] else 'NOT met'} "
                     f"({', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in t.items() if k not in ('family', 'target', 'met'))})")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the finished worker processes
    cpu += children.ru_utime + children.ru_stime
    lines.append(f"\nwall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min ({args.jobs} job(s) x {args.threads} thread(s); "
                 "all processes)")
    print("\n" + "\n".join(lines))
    command = "python benchmarks/grow.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "note": "shared machine: 2 cores used by several jobs at once; latency figures are noisy"}
    result = {"benchmark": "grow", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
              "command": command, "machine": machine,
              "task": {"data": "cluttered_digits", "size": args.size, "difficulty": args.difficulty,
                       "n_train": args.n_train, "val_fraction": 0.15, "epochs": args.epochs, "seeds": args.seeds,
                       "growth_init": "thesis" if args.thesis_init else "function-preserving"},
              "budget_latency_ms": budget_ms, "wall_s": wall, "cpu_s": cpu, "rows": rows,
              "summary": list(summary.values()), "targets": tgts}
    write_json(args.out, result)
    header = f"{command}\n{result['date']}  {machine['platform']}  {machine['note']}\n\n"
    atomic_write(args.out.with_suffix(".txt"), lambda tmp: Path(tmp).write_text(header + "\n".join(lines) + "\n"))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
